//! Timed records of the [`Store`]: opaque values kept until their due time,
//! durably. [`Store::schedule_timer`] writes one (in the outbox's group
//! commit: it survives a crash once it returns), [`Store::take_due_timers`]
//! hands out the due ones — each once, until it is settled or the process
//! restarts (claims are kept in memory, as the outbox's are) — and
//! [`Store::settle_timer`] removes one. The broker keeps its single-node
//! ack-timeout checks here, so that a check outlives a crash.

use std::sync::atomic::Ordering;

use super::{MAX_TIMERS, Store, StoreError, TIMERS};

impl Store {
    /// Keeps `value` until `due_ms` (unix ms). `None`: the table holds
    /// [`MAX_TIMERS`] records already and nothing was written.
    pub async fn schedule_timer(
        &self,
        value: Vec<u8>,
        due_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        if self.inner.timers_len.load(Ordering::Relaxed) >= MAX_TIMERS {
            return Ok(None);
        }
        let ids = self
            .commit_grouped(Vec::new(), vec![(due_ms, value)], due_ms)
            .await?;
        Ok(ids.first().copied())
    }

    /// Up to `max` records due at `now_ms` that are not taken, earliest
    /// first, now taken: `(id, value)`.
    pub async fn take_due_timers(
        &self,
        now_ms: u64,
        max: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        self.call(move |s| {
            let txn = s.inner.db.begin_read()?;
            let table = txn.open_table(TIMERS)?;
            let mut claimed = s.inner.claimed_timers.lock();
            let mut out = Vec::new();
            for row in table.range((0, 0)..=(now_ms, u64::MAX))? {
                if out.len() >= max {
                    break;
                }
                let (key, value) = row?;
                let (due, id) = key.value();
                if claimed.contains_key(&id) {
                    continue;
                }
                claimed.insert(id, due);
                out.push((id, value.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    /// Removes a taken record. Not fsynced on its own (the next durable
    /// commit carries it): after a crash a settled record may come due
    /// again — the caller decides it twice, never not at all.
    pub async fn settle_timer(&self, id: u64) -> Result<(), StoreError> {
        self.call(move |s| {
            let Some(due) = s.inner.claimed_timers.lock().remove(&id) else {
                return Ok(());
            };
            let mut txn = s.inner.db.begin_write()?;
            txn.set_durability(redb::Durability::Eventual);
            let removed = {
                let mut table = txn.open_table(TIMERS)?;
                table.remove((due, id))?.is_some()
            };
            txn.commit()?;
            if removed {
                s.inner.timers_len.fetch_sub(1, Ordering::Relaxed);
            }
            Ok(())
        })
        .await
    }

    /// Records kept (due or not).
    pub fn timers_len(&self) -> u64 {
        self.inner.timers_len.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn timers_come_due_once_survive_a_reopen_and_go_when_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store
            .schedule_timer(b"a".to_vec(), 1000)
            .await
            .unwrap()
            .unwrap();
        let b = store
            .schedule_timer(b"b".to_vec(), 2000)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(store.timers_len(), 2);
        assert!(store.take_due_timers(999, 10).await.unwrap().is_empty());
        assert_eq!(
            store.take_due_timers(1500, 10).await.unwrap(),
            vec![(a, b"a".to_vec())]
        );
        // Taken: not handed out again.
        assert!(store.take_due_timers(1500, 10).await.unwrap().is_empty());
        store.settle_timer(a).await.unwrap();
        assert_eq!(store.timers_len(), 1);
        drop(store);
        // After a restart the unsettled one is still there, due as before.
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.timers_len(), 1);
        assert_eq!(
            store.take_due_timers(5000, 10).await.unwrap(),
            vec![(b, b"b".to_vec())]
        );
    }
}
