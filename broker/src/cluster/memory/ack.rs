//! [`StoredAckChecks`]: a single node's ack-timeout checks, kept in its
//! embedded store (`push.redb`, the `timers` table) rather than as timers in
//! memory, so that a check scheduled before a crash or a restart is still
//! decided after it (PROTOCOL.md §11, `--ack-timeout`). The node decides
//! them as a cluster node decides its shared ones: `Push::run_shared_checks`
//! takes the due ones every 250 ms. After a restart the node knows of no
//! ack from before it, so a check that comes due then pushes unless the
//! device reconnected and acked meanwhile — a push too many rather than one
//! too few.

use std::time::Duration;

use tether_push_gateway::{Store, unix_now_ms};

use crate::cluster::ack::{AckCheck, AckChecks, TakenCheck};
use crate::cluster::{BoxFuture, BrokerError};

#[derive(Debug, Clone)]
pub struct StoredAckChecks {
    store: Store,
}

impl StoredAckChecks {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

impl AckChecks for StoredAckChecks {
    fn schedule(
        &self,
        check: AckCheck,
        after: Duration,
    ) -> BoxFuture<'_, Result<bool, BrokerError>> {
        Box::pin(async move {
            let value =
                serde_json::to_vec(&check).map_err(|e| BrokerError::Internal(e.to_string()))?;
            let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
            let due = unix_now_ms().saturating_add(after_ms);
            let id = self
                .store
                .schedule_timer(value, due)
                .await
                .map_err(unavailable)?;
            Ok(id.is_some())
        })
    }

    fn take_due(&self, max: usize) -> BoxFuture<'_, Result<Vec<TakenCheck>, BrokerError>> {
        Box::pin(async move {
            let rows = self
                .store
                .take_due_timers(unix_now_ms(), max)
                .await
                .map_err(unavailable)?;
            let mut out = Vec::with_capacity(rows.len());
            for (id, value) in rows {
                match serde_json::from_slice(&value) {
                    Ok(check) => out.push(TakenCheck {
                        id: id.to_string(),
                        check,
                    }),
                    Err(e) => {
                        tracing::error!(id, error = %e, "unreadable ack check dropped");
                        let _ = self.store.settle_timer(id).await;
                    }
                }
            }
            Ok(out)
        })
    }

    fn settle<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>> {
        Box::pin(async move {
            let id: u64 = id
                .parse()
                .map_err(|_| BrokerError::Internal(format!("not a timer id: {id:?}")))?;
            self.store.settle_timer(id).await.map_err(unavailable)
        })
    }
}
