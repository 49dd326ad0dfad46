//! The durable store of one node: registered devices ([`devices`]) and the
//! push outbox ([`outbox`]), in one redb file `{data_dir}/push.redb`. It is
//! the single-node implementation of both [`crate::DeviceRegistry`] and
//! [`crate::PushQueue`].
//!
//! Tables (values are JSON, so fields can be added without a migration):
//! - `devices`: device id → [`Device`];
//! - `devices_by_user`: `"{user}\0{device_id}"` → `()`, an index so that
//!   [`Store::devices_for_user`] is a range scan, not a full scan (users and
//!   device ids cannot contain NUL);
//! - `outbox`: job id → [`crate::OutboxEntry`] (the job, attempts so far,
//!   next attempt time, last error);
//! - `outbox_due`: `(platform, next_attempt_ms, job id)` → `()`, so the
//!   gateway reads only what is due, oldest first, per provider (a busy
//!   provider never hides the other's due jobs);
//! - `failed`: job id → [`FailedJob`], the last [`FAILED_KEEP`] permanent
//!   failures (older ones are dropped; `failed_total` keeps counting);
//! - `timers`: `(due_ms, id)` → opaque bytes: records kept until a time
//!   ([`timers`]; the broker's ack-timeout checks), at most [`MAX_TIMERS`];
//! - `meta`: counters (`next_job_id`, `failed_total`).
//!
//! Every write is one transaction committed with `Durability::Immediate`
//! (fsync): a job [`Store::enqueue`] returned an id for survives a crash.
//! Which jobs a gateway has claimed is kept in memory only: after a restart
//! every job in the outbox is due again (at-least-once delivery).
//!
//! redb is synchronous. The public methods are `async` and run the redb
//! work on tokio's blocking pool (`spawn_blocking`), so they may be called
//! from any async task; [`Store::open`] is synchronous: call it at start-up
//! (or inside `spawn_blocking`).

pub mod devices;
pub mod outbox;
pub mod timers;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use parking_lot::Mutex;
use rand::Rng;
use redb::{Database, Durability, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::devices::RegistryError;
use crate::queue::QueueError;
use crate::types::{Platform, PushJob};
use crate::validate::DeviceError;

/// File name of the store inside the data directory.
pub const FILE_NAME: &str = "push.redb";
/// How many permanently failed jobs are kept for inspection.
pub const FAILED_KEEP: u64 = 1000;
/// redb's page cache. redb's default is 1 GiB (allocated as used); the
/// store is small and mostly written, so a smaller cap is plenty.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");
const DEVICES_BY_USER: TableDefinition<&str, ()> = TableDefinition::new("devices_by_user");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const OUTBOX_DUE: TableDefinition<(u8, u64, u64), ()> = TableDefinition::new("outbox_due");
const FAILED: TableDefinition<u64, &[u8]> = TableDefinition::new("failed");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const TIMERS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("timers");

/// Most records in the `timers` table; past that [`Store::schedule_timer`]
/// refuses (its caller acts at once instead of later).
pub const MAX_TIMERS: u64 = 1_000_000;

const NEXT_JOB_ID: &str = "next_job_id";
const FAILED_TOTAL: &str = "failed_total";

/// Store failures. `InvalidDevice` is the caller's fault (HTTP 400); the
/// others are ours (HTTP 500 / 503).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid device: {0}")]
    InvalidDevice(#[from] DeviceError),
    #[error("cannot create data directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("push store {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    #[error("push store: {0}")]
    Db(Box<redb::Error>),
    #[error("push store: corrupt record: {0}")]
    Corrupt(#[from] serde_json::Error),
    #[error("push store: job ids exhausted")]
    IdsExhausted,
    #[error("push store: blocking task failed: {0}")]
    Task(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Db(Box::new(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::InvalidDevice(d) => RegistryError::Invalid(d),
            other => RegistryError::Unavailable(other.to_string()),
        }
    }
}

impl From<StoreError> for QueueError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt(_) | StoreError::IdsExhausted => {
                QueueError::Internal(e.to_string())
            }
            other => QueueError::Unavailable(other.to_string()),
        }
    }
}

/// A job that will not be delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedJob {
    pub job: PushJob,
    pub attempts: u32,
    pub reason: String,
    /// Unix seconds.
    pub failed_at: u64,
}

/// Devices and the push outbox. Cheap to clone (one shared database).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Jobs handed to a gateway and not settled yet (not handed out again).
    claimed: Mutex<HashSet<u64>>,
    /// Enqueues waiting for the next group commit (see `outbox`): at most
    /// one commit runs and one waits to take what piled up meanwhile.
    pending: Mutex<Vec<outbox::PendingEnqueue>>,
    /// Timers taken and not settled yet: id → due time (their key).
    claimed_timers: Mutex<HashMap<u64, u64>>,
    /// Rows in `timers` (kept in step with the table).
    timers_len: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn platform_code(p: Platform) -> u8 {
    // 0, 1, 2: the codes stored in `outbox_due` keys.
    p.index() as u8
}

impl Store {
    /// Opens (or creates) `{data_dir}/push.redb`, creating `data_dir` if
    /// needed. Blocking: may take a while on a large or unclean file.
    pub fn open(data_dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        let dir = data_dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| StoreError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|e| StoreError::Open {
                path: path.clone(),
                source: Box::new(e.into()),
            })?;
        let txn = db.begin_write()?;
        {
            txn.open_table(DEVICES)?;
            txn.open_table(DEVICES_BY_USER)?;
            txn.open_table(OUTBOX)?;
            txn.open_table(OUTBOX_DUE)?;
            txn.open_table(FAILED)?;
            txn.open_table(TIMERS)?;
            let mut meta = txn.open_table(META)?;
            if meta.get(NEXT_JOB_ID)?.is_none() {
                // A random start makes job ids (and the apns-ids derived
                // from them) distinct across the nodes of a cluster.
                let start: u64 = rand::rng().random_range(1..1u64 << 62);
                meta.insert(NEXT_JOB_ID, start)?;
            }
        }
        txn.commit()?;
        let timers_len = {
            use redb::ReadableTableMetadata;
            db.begin_read()?.open_table(TIMERS)?.len()?
        };
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                path,
                claimed: Mutex::new(HashSet::new()),
                pending: Mutex::new(Vec::new()),
                claimed_timers: Mutex::new(HashMap::new()),
                timers_len: AtomicU64::new(timers_len),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` on the blocking pool with this store.
    pub async fn call<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.inner.db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        Ok(txn)
    }

    /// The most recent permanent failures (newest first), at most `limit`.
    pub async fn failed_jobs(&self, limit: usize) -> Result<Vec<FailedJob>, StoreError> {
        self.call(move |s| {
            let txn = s.inner.db.begin_read()?;
            let failed = txn.open_table(FAILED)?;
            let mut out = Vec::new();
            for row in failed.iter()?.rev().take(limit) {
                let (_, v) = row?;
                out.push(serde_json::from_slice(v.value())?);
            }
            Ok(out)
        })
        .await
    }

    /// Permanent failures since the store was created.
    pub async fn failed_total(&self) -> Result<u64, StoreError> {
        self.call(|s| {
            let txn = s.inner.db.begin_read()?;
            let meta = txn.open_table(META)?;
            Ok(meta.get(FAILED_TOTAL)?.map_or(0, |v| v.value()))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use crate::types::{Device, NewPushJob, Notification, Platform};

    pub(super) fn device(id: &str, user: &str) -> Device {
        Device {
            device_id: id.into(),
            user: user.into(),
            platform: Platform::Apns,
            token: format!("{:0>64}", id.len()).into(),
            topic: None,
            sandbox: false,
            updated_at: 0,
        }
    }

    pub(super) fn job(device: &Device, offset: u64) -> NewPushJob {
        NewPushJob::for_device(device, Notification::default(), "user:u", offset)
    }
}
