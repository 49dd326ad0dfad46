//! The durable store: registered devices and the push outbox, in one redb
//! file `{data_dir}/push.redb`.
//!
//! Tables (values are JSON, so fields can be added without a migration):
//! - `devices`: device id → [`Device`];
//! - `devices_by_user`: `"{user}\0{device_id}"` → `()`, an index so that
//!   [`Store::devices_for_user`] is a range scan, not a full scan (users and
//!   device ids cannot contain NUL);
//! - `outbox`: job id → [`OutboxEntry`] (the job, attempts so far, next
//!   attempt time, last error);
//! - `outbox_due`: `(platform, next_attempt_ms, job id)` → `()`, so the
//!   gateway reads only what is due, oldest first, per provider (a busy
//!   provider never hides the other's due jobs);
//! - `failed`: job id → [`FailedJob`], the last [`FAILED_KEEP`] permanent
//!   failures (older ones are dropped; `failed_total` keeps counting);
//! - `meta`: counters (`next_job_id`, `failed_total`).
//!
//! Every write is one transaction committed with `Durability::Immediate`
//! (fsync): a job [`Store::enqueue`] returned an id for survives a crash.
//!
//! redb is synchronous. The public methods are `async` and run the redb
//! work on tokio's blocking pool (`spawn_blocking`), so they may be called
//! from any async task; [`Store::open`] is synchronous: call it at start-up
//! (or inside `spawn_blocking`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::types::{Device, NewPushJob, Platform, PushJob, unix_now, unix_now_ms};
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

/// A job in the outbox with its delivery state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutboxEntry {
    pub job: PushJob,
    /// Attempts made so far (0 for a new job).
    pub attempts: u32,
    /// Unix milliseconds before which the job is not sent.
    pub next_attempt_ms: u64,
    /// Reason of the last failed attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
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

/// One change to the outbox after a send attempt, applied in batches by
/// the gateway (`Store::apply_blocking`). No `Debug`: it holds tokens.
#[derive(Clone, PartialEq)]
pub(crate) enum Resolution {
    /// Delivered (or dropped): remove from the outbox.
    Complete { id: u64 },
    /// Try again at `at_ms`.
    Reschedule {
        id: u64,
        at_ms: u64,
        attempts: u32,
        reason: String,
    },
    /// Give up: move to the failed table.
    Fail {
        id: u64,
        attempts: u32,
        reason: String,
    },
    /// The token is dead: remove the device if it still has this token
    /// (a device re-registered with a new token is kept).
    RemoveDevice { device_id: String, token: String },
}

/// Devices and the push outbox. Cheap to clone (one shared database).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn platform_code(p: Platform) -> u8 {
    match p {
        Platform::Apns => 0,
        Platform::Fcm => 1,
    }
}

fn due_key(entry: &OutboxEntry) -> (u8, u64, u64) {
    (
        platform_code(entry.job.spec.platform),
        entry.next_attempt_ms,
        entry.job.id,
    )
}

fn user_key(user: &str, device_id: &str) -> String {
    format!("{user}\0{device_id}")
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
            let mut meta = txn.open_table(META)?;
            if meta.get(NEXT_JOB_ID)?.is_none() {
                // A random start makes job ids (and the apns-ids derived
                // from them) distinct across the nodes of a cluster.
                let start: u64 = rand::rng().random_range(1..1u64 << 62);
                meta.insert(NEXT_JOB_ID, start)?;
            }
        }
        txn.commit()?;
        Ok(Store {
            inner: Arc::new(Inner { db, path }),
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

    // ---- devices -------------------------------------------------------

    /// Registers or replaces a device after [`Device::validate`]; sets
    /// `updated_at` to now. Returns the stored record.
    pub async fn put_device(&self, device: Device) -> Result<Device, StoreError> {
        self.call(move |s| s.put_device_blocking(device)).await
    }

    /// Removes a device; `false` if there was none.
    pub async fn delete_device(&self, device_id: &str) -> Result<bool, StoreError> {
        let id = device_id.to_owned();
        self.call(move |s| s.delete_device_blocking(&id, None))
            .await
    }

    /// One device.
    pub async fn get_device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        let id = device_id.to_owned();
        self.call(move |s| s.get_device_blocking(&id)).await
    }

    /// Every device of `user`, ordered by device id.
    pub async fn devices_for_user(&self, user: &str) -> Result<Vec<Device>, StoreError> {
        let user = user.to_owned();
        self.call(move |s| s.devices_for_user_blocking(&user)).await
    }

    // ---- outbox --------------------------------------------------------

    /// Adds jobs to the outbox in one transaction, due now; returns their
    /// ids in order. Prefer [`crate::Gateway::enqueue`], which also wakes
    /// the gateway.
    pub async fn enqueue(&self, jobs: Vec<NewPushJob>) -> Result<Vec<u64>, StoreError> {
        self.call(move |s| s.enqueue_blocking(jobs, unix_now_ms()))
            .await
    }

    /// Up to `limit` jobs due at `now_ms` (unix ms), earliest first.
    pub async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.call(move |s| {
            let skip = HashSet::new();
            let mut all = s.scan_due(Platform::Apns, now_ms, limit, &skip)?.0;
            all.extend(s.scan_due(Platform::Fcm, now_ms, limit, &skip)?.0);
            all.sort_by_key(|e| (e.next_attempt_ms, e.job.id));
            all.truncate(limit);
            Ok(all)
        })
        .await
    }

    /// Sets when a job is tried next and how many attempts it has had;
    /// `false` if the job is not in the outbox.
    pub async fn reschedule(
        &self,
        id: u64,
        at_ms: u64,
        attempts: u32,
        reason: String,
    ) -> Result<bool, StoreError> {
        self.call(move |s| {
            s.apply_blocking(vec![Resolution::Reschedule {
                id,
                at_ms,
                attempts,
                reason,
            }])
            .map(|r| r.touched > 0)
        })
        .await
    }

    /// Removes a delivered job; `false` if it was not in the outbox.
    pub async fn complete(&self, id: u64) -> Result<bool, StoreError> {
        self.call(move |s| {
            s.apply_blocking(vec![Resolution::Complete { id }])
                .map(|r| r.touched > 0)
        })
        .await
    }

    /// Moves a job to the (bounded) failed table; `false` if it was not in
    /// the outbox.
    pub async fn fail(&self, id: u64, reason: String) -> Result<bool, StoreError> {
        self.call(move |s| {
            let attempts = s.outbox_entry(id)?.map_or(0, |e| e.attempts);
            s.apply_blocking(vec![Resolution::Fail {
                id,
                attempts,
                reason,
            }])
            .map(|r| r.touched > 0)
        })
        .await
    }

    /// Jobs waiting in the outbox (due or scheduled for later).
    pub async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.call(|s| s.outbox_len_blocking()).await
    }

    /// The most recent permanent failures (newest first), at most `limit`.
    pub async fn failed_jobs(&self, limit: usize) -> Result<Vec<FailedJob>, StoreError> {
        self.call(move |s| s.failed_jobs_blocking(limit)).await
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

    // ---- blocking implementations ---------------------------------------

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.inner.db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        Ok(txn)
    }

    pub(crate) fn put_device_blocking(&self, mut device: Device) -> Result<Device, StoreError> {
        device.validate()?;
        device.updated_at = unix_now();
        let bytes = serde_json::to_vec(&device)?;
        let txn = self.begin_write()?;
        {
            let mut devices = txn.open_table(DEVICES)?;
            let mut by_user = txn.open_table(DEVICES_BY_USER)?;
            let old = match devices.insert(device.device_id.as_str(), bytes.as_slice())? {
                Some(old) => Some(serde_json::from_slice::<Device>(old.value())?),
                None => None,
            };
            if let Some(old) = old
                && old.user != device.user
            {
                by_user.remove(user_key(&old.user, &old.device_id).as_str())?;
            }
            by_user.insert(user_key(&device.user, &device.device_id).as_str(), ())?;
        }
        txn.commit()?;
        Ok(device)
    }

    /// Removes a device; with `token`, only if the stored token is that one.
    fn delete_device_blocking(
        &self,
        device_id: &str,
        token: Option<&str>,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_write()?;
        let removed = remove_device(&txn, device_id, token)?;
        txn.commit()?;
        Ok(removed)
    }

    fn get_device_blocking(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        match devices.get(device_id)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    fn devices_for_user_blocking(&self, user: &str) -> Result<Vec<Device>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let by_user = txn.open_table(DEVICES_BY_USER)?;
        let devices = txn.open_table(DEVICES)?;
        let start = format!("{user}\0");
        let end = format!("{user}\u{1}");
        let mut out = Vec::new();
        for row in by_user.range::<&str>(start.as_str()..end.as_str())? {
            let (key, _) = row?;
            let key = key.value();
            let device_id = &key[start.len()..];
            if let Some(v) = devices.get(device_id)? {
                out.push(serde_json::from_slice(v.value())?);
            }
        }
        Ok(out)
    }

    pub(crate) fn enqueue_blocking(
        &self,
        jobs: Vec<NewPushJob>,
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let txn = self.begin_write()?;
        let mut ids = Vec::with_capacity(jobs.len());
        {
            let mut meta = txn.open_table(META)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut due = txn.open_table(OUTBOX_DUE)?;
            let mut next = meta.get(NEXT_JOB_ID)?.map_or(1, |v| v.value());
            for job in jobs {
                let id = next;
                next = next.checked_add(1).ok_or(StoreError::IdsExhausted)?;
                let entry = OutboxEntry {
                    job: job.with_id(id),
                    attempts: 0,
                    next_attempt_ms: now_ms,
                    last_error: None,
                };
                outbox.insert(id, serde_json::to_vec(&entry)?.as_slice())?;
                due.insert(due_key(&entry), ())?;
                ids.push(id);
            }
            meta.insert(NEXT_JOB_ID, next)?;
        }
        txn.commit()?;
        Ok(ids)
    }

    fn outbox_entry(&self, id: u64) -> Result<Option<OutboxEntry>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let outbox = txn.open_table(OUTBOX)?;
        match outbox.get(id)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` jobs of `platform` due at `now_ms` and not in `skip`
    /// (those in flight), and the earliest next-attempt time among the jobs
    /// of `platform` not returned and not in `skip` (when to look again).
    pub(crate) fn scan_due(
        &self,
        platform: Platform,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<u64>,
    ) -> Result<(Vec<OutboxEntry>, Option<u64>), StoreError> {
        let txn = self.inner.db.begin_read()?;
        let due = txn.open_table(OUTBOX_DUE)?;
        let outbox = txn.open_table(OUTBOX)?;
        let p = platform_code(platform);
        let mut out = Vec::new();
        let mut next_at = None;
        for row in due.range((p, 0, 0)..=(p, u64::MAX, u64::MAX))? {
            let (key, _) = row?;
            let (_, at, id) = key.value();
            if skip.contains(&id) {
                continue;
            }
            if at > now_ms || out.len() >= limit {
                next_at = Some(at);
                break;
            }
            // A due key without a readable job (see `take_entry`) is skipped
            // rather than stopping the whole outbox.
            if let Some(v) = outbox.get(id)? {
                match serde_json::from_slice(v.value()) {
                    Ok(entry) => out.push(entry),
                    Err(e) => tracing::error!(job = id, error = %e, "unreadable push job skipped"),
                }
            }
        }
        Ok((out, next_at))
    }

    pub(crate) fn outbox_len_blocking(&self) -> Result<u64, StoreError> {
        let txn = self.inner.db.begin_read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    fn failed_jobs_blocking(&self, limit: usize) -> Result<Vec<FailedJob>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let failed = txn.open_table(FAILED)?;
        let mut out = Vec::new();
        for row in failed.iter()?.rev().take(limit) {
            let (_, v) = row?;
            out.push(serde_json::from_slice(v.value())?);
        }
        Ok(out)
    }

    /// Applies a batch of resolutions in one transaction.
    pub(crate) fn apply_blocking(
        &self,
        resolutions: Vec<Resolution>,
    ) -> Result<Applied, StoreError> {
        let mut applied = Applied::default();
        if resolutions.is_empty() {
            return Ok(applied);
        }
        let txn = self.begin_write()?;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut due = txn.open_table(OUTBOX_DUE)?;
            let mut failed = txn.open_table(FAILED)?;
            let mut meta = txn.open_table(META)?;
            for r in resolutions {
                match r {
                    Resolution::RemoveDevice { device_id, token } => {
                        if remove_device(&txn, &device_id, Some(&token))? {
                            applied.removed_devices.push(device_id);
                        }
                    }
                    Resolution::Complete { id } => {
                        if take_entry(&mut outbox, &mut due, id)?.is_some() {
                            applied.touched += 1;
                        }
                    }
                    Resolution::Reschedule {
                        id,
                        at_ms,
                        attempts,
                        reason,
                    } => {
                        if let Some(mut entry) = take_entry(&mut outbox, &mut due, id)? {
                            entry.attempts = attempts;
                            entry.next_attempt_ms = at_ms;
                            entry.last_error = Some(reason);
                            outbox.insert(id, serde_json::to_vec(&entry)?.as_slice())?;
                            due.insert(due_key(&entry), ())?;
                            applied.touched += 1;
                        }
                    }
                    Resolution::Fail {
                        id,
                        attempts,
                        reason,
                    } => {
                        if let Some(entry) = take_entry(&mut outbox, &mut due, id)? {
                            let record = FailedJob {
                                job: entry.job,
                                attempts,
                                reason,
                                failed_at: unix_now(),
                            };
                            failed.insert(id, serde_json::to_vec(&record)?.as_slice())?;
                            while failed.len()? > FAILED_KEEP {
                                if failed.pop_first()?.is_none() {
                                    break;
                                }
                            }
                            let total = meta.get(FAILED_TOTAL)?.map_or(0, |v| v.value());
                            meta.insert(FAILED_TOTAL, total.saturating_add(1))?;
                            applied.touched += 1;
                        }
                    }
                }
            }
        }
        txn.commit()?;
        Ok(applied)
    }
}

/// What [`Store::apply_blocking`] did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// Outbox entries completed, rescheduled or failed.
    pub touched: usize,
    /// Devices removed for a dead token.
    pub removed_devices: Vec<String>,
}

fn take_entry(
    outbox: &mut redb::Table<u64, &[u8]>,
    due: &mut redb::Table<(u8, u64, u64), ()>,
    id: u64,
) -> Result<Option<OutboxEntry>, StoreError> {
    let entry: OutboxEntry = match outbox.remove(id)? {
        Some(v) => match serde_json::from_slice(v.value()) {
            Ok(entry) => entry,
            Err(e) => {
                // Drop it: it can never be sent. Its due key is skipped.
                tracing::error!(job = id, error = %e, "unreadable push job dropped");
                return Ok(None);
            }
        },
        None => return Ok(None),
    };
    due.remove(due_key(&entry))?;
    Ok(Some(entry))
}

fn remove_device(
    txn: &redb::WriteTransaction,
    device_id: &str,
    token: Option<&str>,
) -> Result<bool, StoreError> {
    let mut devices = txn.open_table(DEVICES)?;
    let existing: Device = match devices.get(device_id)? {
        Some(v) => serde_json::from_slice(v.value())?,
        None => return Ok(false),
    };
    if token.is_some_and(|t| t != existing.token) {
        return Ok(false);
    }
    devices.remove(device_id)?;
    let mut by_user = txn.open_table(DEVICES_BY_USER)?;
    by_user.remove(user_key(&existing.user, device_id).as_str())?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::types::{Notification, Platform};

    fn device(id: &str, user: &str) -> Device {
        Device {
            device_id: id.into(),
            user: user.into(),
            platform: Platform::Apns,
            token: format!("{:0>64}", id.len()),
            topic: None,
            sandbox: false,
            updated_at: 0,
        }
    }

    fn job(device: &Device, offset: u64) -> NewPushJob {
        NewPushJob::for_device(device, Notification::default(), "user:u", offset)
    }

    #[tokio::test]
    async fn devices_are_indexed_by_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.put_device(device("a", "alice")).await.unwrap();
        assert!(a.updated_at > 0);
        store.put_device(device("b", "alice")).await.unwrap();
        store.put_device(device("c", "alicia")).await.unwrap();
        store.put_device(device("d", "bob")).await.unwrap();
        let ids = |v: Vec<Device>| v.into_iter().map(|d| d.device_id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.devices_for_user("alice").await.unwrap()),
            ["a", "b"]
        );
        // Moving a device to another user updates the index.
        store.put_device(device("b", "bob")).await.unwrap();
        assert_eq!(ids(store.devices_for_user("alice").await.unwrap()), ["a"]);
        assert_eq!(
            ids(store.devices_for_user("bob").await.unwrap()),
            ["b", "d"]
        );
        assert!(store.delete_device("a").await.unwrap());
        assert!(!store.delete_device("a").await.unwrap());
        assert!(store.devices_for_user("alice").await.unwrap().is_empty());
        assert!(store.get_device("a").await.unwrap().is_none());
        assert_eq!(
            store.get_device("d").await.unwrap().unwrap().user,
            "bob".to_owned()
        );
    }

    #[tokio::test]
    async fn invalid_devices_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d = device("a", "alice");
        d.token = "nothex".into();
        let err = store.put_device(d).await.unwrap_err();
        assert!(matches!(
            err,
            StoreError::InvalidDevice(DeviceError::BadApnsToken)
        ));
    }

    #[tokio::test]
    async fn a_dead_token_removes_only_a_device_still_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d = device("a", "alice");
        store.put_device(d.clone()).await.unwrap();
        let old_token = d.token.clone();
        d.token = "ab".repeat(32);
        store.put_device(d).await.unwrap();
        let applied = store
            .call(move |s| {
                s.apply_blocking(vec![Resolution::RemoveDevice {
                    device_id: "a".into(),
                    token: old_token,
                }])
            })
            .await
            .unwrap();
        assert!(applied.removed_devices.is_empty());
        assert!(store.get_device("a").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn outbox_enqueue_due_reschedule_complete_fail() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = device("a", "alice");
        let ids = store
            .enqueue(vec![job(&d, 1), job(&d, 2), job(&d, 3)])
            .await
            .unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1], ids[0] + 1);
        let now = unix_now_ms() + 1;
        let due = store.due(now, 10).await.unwrap();
        assert_eq!(
            due.iter().map(|e| e.job.spec.offset).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(store.due(now, 2).await.unwrap().len(), 2);
        assert!(
            store
                .reschedule(ids[0], now + 60_000, 1, "http_500".into())
                .await
                .unwrap()
        );
        let due = store.due(now, 10).await.unwrap();
        assert_eq!(due.len(), 2);
        let later = store.due(now + 60_000, 10).await.unwrap();
        assert_eq!(later.last().unwrap().job.id, ids[0]);
        assert_eq!(later.last().unwrap().attempts, 1);
        assert!(store.complete(ids[1]).await.unwrap());
        assert!(!store.complete(ids[1]).await.unwrap());
        assert!(store.fail(ids[2], "BadTopic".into()).await.unwrap());
        assert_eq!(store.outbox_len().await.unwrap(), 1);
        assert_eq!(store.failed_total().await.unwrap(), 1);
        let failed = store.failed_jobs(10).await.unwrap();
        assert_eq!(failed[0].reason, "BadTopic");
        assert_eq!(failed[0].job.spec.offset, 3);

        // In-flight jobs are skipped and the next time accounts for the rest.
        let skip: HashSet<u64> = [ids[0]].into();
        let (entries, next) = store
            .call(move |s| s.scan_due(Platform::Apns, now, 10, &skip))
            .await
            .unwrap();
        assert!(entries.is_empty());
        assert_eq!(next, None);
    }

    #[tokio::test]
    async fn the_outbox_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let d = device("a", "alice");
        let ids = {
            let store = Store::open(dir.path()).unwrap();
            store.put_device(d.clone()).await.unwrap();
            store.enqueue(vec![job(&d, 7)]).await.unwrap()
        };
        let store = Store::open(dir.path()).unwrap();
        let due = store.due(u64::MAX, 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].job.id, ids[0]);
        assert!(store.get_device("a").await.unwrap().is_some());
        let more = store.enqueue(vec![job(&d, 8)]).await.unwrap();
        assert!(more[0] > ids[0]);
    }

    #[tokio::test]
    async fn the_failed_table_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = device("a", "alice");
        let n = FAILED_KEEP as usize + 5;
        let ids = store
            .enqueue((0..n as u64).map(|i| job(&d, i)).collect())
            .await
            .unwrap();
        store
            .call(move |s| {
                s.apply_blocking(
                    ids.iter()
                        .map(|&id| Resolution::Fail {
                            id,
                            attempts: 1,
                            reason: "x".into(),
                        })
                        .collect(),
                )
            })
            .await
            .unwrap();
        assert_eq!(store.failed_total().await.unwrap(), n as u64);
        let kept = store.failed_jobs(usize::MAX).await.unwrap();
        assert_eq!(kept.len() as u64, FAILED_KEEP);
        assert_eq!(kept[0].job.spec.offset, n as u64 - 1);
        assert_eq!(store.outbox_len().await.unwrap(), 0);
    }
}
