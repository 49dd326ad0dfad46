//! The outbox half of the [`Store`]: push jobs waiting for their provider,
//! due-ordered per platform; the single-node [`PushQueue`].

use std::collections::HashSet;

use redb::{ReadableTable, ReadableTableMetadata};

use super::{
    FAILED, FAILED_KEEP, FAILED_TOTAL, FailedJob, META, NEXT_JOB_ID, OUTBOX, OUTBOX_DUE, TIMERS,
};
use super::{Store, StoreError, platform_code};
use crate::queue::{Claimed, OutboxEntry, PushQueue, QueueFuture, Settlement};
use crate::types::{NewPushJob, Platform, unix_now, unix_now_ms};

fn due_key(entry: &OutboxEntry) -> (u8, u64, u64) {
    (
        platform_code(entry.job.spec.platform),
        entry.next_attempt_ms,
        entry.job.id,
    )
}

type Reply = tokio::sync::oneshot::Sender<Result<Vec<u64>, StoreError>>;

/// One caller's jobs or timers waiting for a group commit, and where their
/// ids go (in order).
pub(crate) struct PendingEnqueue {
    jobs: Vec<NewPushJob>,
    /// `(due_ms, value)` rows for the `timers` table.
    timers: Vec<(u64, Vec<u8>)>,
    now_ms: u64,
    reply: Reply,
}

impl Store {
    /// Adds jobs to the outbox, due now; returns their ids in order. Prefer
    /// [`crate::Gateway::enqueue`], which also wakes the gateway.
    pub async fn enqueue(&self, jobs: Vec<NewPushJob>) -> Result<Vec<u64>, StoreError> {
        self.enqueue_grouped(jobs, unix_now_ms()).await
    }

    /// Group commit: concurrent enqueues share one durable transaction
    /// (one fsync) instead of one each. The caller that finds no enqueue
    /// waiting starts a commit task; that task waits for the write lock
    /// (the previous commit), then takes everything that piled up meanwhile
    /// and commits it at once. Each caller gets its own ids, in its order,
    /// once the transaction holding them is durable; a failed transaction
    /// fails every enqueue in it.
    async fn enqueue_grouped(
        &self,
        jobs: Vec<NewPushJob>,
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.commit_grouped(jobs, Vec::new(), now_ms).await
    }

    /// Joins (or starts) the next group commit with these jobs or timers;
    /// their ids once the commit is durable.
    pub(super) async fn commit_grouped(
        &self,
        jobs: Vec<NewPushJob>,
        timers: Vec<(u64, Vec<u8>)>,
        now_ms: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let lead = {
            let mut pending = self.inner.pending.lock();
            pending.push(PendingEnqueue {
                jobs,
                timers,
                now_ms,
                reply: tx,
            });
            pending.len() == 1
        };
        if lead {
            let store = self.clone();
            tokio::task::spawn_blocking(move || {
                let replies = store.commit_pending();
                // The store goes before the answers: a caller that drops its
                // last handle on hearing back closes the database.
                drop(store);
                for (reply, result) in replies {
                    let _ = reply.send(result);
                }
            });
        }
        rx.await
            .map_err(|_| StoreError::Task("the enqueue's commit task ended".into()))?
    }

    /// Commits every waiting enqueue in one transaction (blocking);
    /// returns each one's answer, for its reply channel.
    fn commit_pending(&self) -> Vec<(Reply, Result<Vec<u64>, StoreError>)> {
        let txn = match self.begin_write() {
            Ok(t) => t,
            Err(e) => {
                let msg = e.to_string();
                return std::mem::take(&mut *self.inner.pending.lock())
                    .into_iter()
                    .map(|p| (p.reply, Err(StoreError::Task(msg.clone()))))
                    .collect();
            }
        };
        // Taken only now that the write lock is ours: what arrived while the
        // previous transaction committed joins this one.
        let mut batch = std::mem::take(&mut *self.inner.pending.lock());
        let new_timers: u64 = batch.iter().map(|p| p.timers.len() as u64).sum();
        let result = (|| {
            let mut all_ids = Vec::with_capacity(batch.len());
            {
                let mut meta = txn.open_table(META)?;
                let mut outbox = txn.open_table(OUTBOX)?;
                let mut due = txn.open_table(OUTBOX_DUE)?;
                let mut timers = txn.open_table(TIMERS)?;
                let mut next = meta.get(NEXT_JOB_ID)?.map_or(1, |v| v.value());
                for p in &mut batch {
                    let mut ids = Vec::with_capacity(p.jobs.len() + p.timers.len());
                    for (due_ms, value) in std::mem::take(&mut p.timers) {
                        let id = next;
                        next = next.checked_add(1).ok_or(StoreError::IdsExhausted)?;
                        timers.insert((due_ms, id), value.as_slice())?;
                        ids.push(id);
                    }
                    for job in std::mem::take(&mut p.jobs) {
                        let id = next;
                        next = next.checked_add(1).ok_or(StoreError::IdsExhausted)?;
                        let entry = OutboxEntry {
                            job: job.with_id(id),
                            attempts: 0,
                            next_attempt_ms: p.now_ms,
                            last_error: None,
                        };
                        outbox.insert(id, serde_json::to_vec(&entry)?.as_slice())?;
                        due.insert(due_key(&entry), ())?;
                        ids.push(id);
                    }
                    all_ids.push(ids);
                }
                meta.insert(NEXT_JOB_ID, next)?;
            }
            txn.commit()?;
            Ok::<_, StoreError>(all_ids)
        })();
        if result.is_ok() {
            self.inner
                .timers_len
                .fetch_add(new_timers, std::sync::atomic::Ordering::Relaxed);
        }
        match result {
            Ok(all_ids) => batch
                .into_iter()
                .zip(all_ids)
                .map(|(p, ids)| (p.reply, Ok(ids)))
                .collect(),
            Err(e) => {
                let msg = e.to_string();
                batch
                    .into_iter()
                    .map(|p| (p.reply, Err(StoreError::Task(msg.clone()))))
                    .collect()
            }
        }
    }

    /// Up to `limit` jobs due at `now_ms` (unix ms), earliest first,
    /// claimed or not (for inspection).
    pub async fn due(&self, now_ms: u64, limit: usize) -> Result<Vec<OutboxEntry>, StoreError> {
        self.call(move |s| {
            let skip = HashSet::new();
            let mut all = Vec::new();
            for p in Platform::ALL {
                all.extend(s.scan_due(p, now_ms, limit, &skip)?.0);
            }
            all.sort_by_key(|e| (e.next_attempt_ms, e.job.id));
            all.truncate(limit);
            Ok(all)
        })
        .await
    }

    /// Jobs waiting in the outbox (due or scheduled for later).
    pub async fn outbox_len(&self) -> Result<u64, StoreError> {
        self.call(|s| {
            let txn = s.inner.db.begin_read()?;
            Ok(txn.open_table(OUTBOX)?.len()?)
        })
        .await
    }

    /// Settles jobs (claimed or not) in one transaction; returns how many
    /// were in the outbox.
    pub async fn settle_jobs(&self, settlements: Vec<Settlement>) -> Result<usize, StoreError> {
        self.call(move |s| s.settle_blocking(settlements)).await
    }

    /// Up to `limit` jobs of `platform` due at `now_ms` and not in `skip`,
    /// and the earliest next-attempt time among the jobs of `platform` not
    /// returned and not in `skip` (when to look again).
    fn scan_due(
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

    fn claim_blocking(
        &self,
        platform: Platform,
        now_ms: u64,
        limit: usize,
    ) -> Result<Claimed, StoreError> {
        let mut claimed = self.inner.claimed.lock();
        let (jobs, next_at) = self.scan_due(platform, now_ms, limit, &claimed)?;
        claimed.extend(jobs.iter().map(|e| e.job.id));
        Ok(Claimed { jobs, next_at })
    }

    /// Applies settlements in one transaction.
    fn settle_blocking(&self, settlements: Vec<Settlement>) -> Result<usize, StoreError> {
        if settlements.is_empty() {
            return Ok(0);
        }
        let ids: Vec<u64> = settlements
            .iter()
            .map(|s| match s {
                Settlement::Ack { id }
                | Settlement::RetryAt { id, .. }
                | Settlement::Fail { id, .. } => *id,
            })
            .collect();
        let result = self.apply(settlements);
        // Settled or not, the jobs may be handed out again: on an error
        // they are still in the outbox and are sent again.
        let mut claimed = self.inner.claimed.lock();
        for id in ids {
            claimed.remove(&id);
        }
        result
    }

    fn apply(&self, settlements: Vec<Settlement>) -> Result<usize, StoreError> {
        let mut touched = 0;
        let txn = self.begin_write()?;
        {
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut due = txn.open_table(OUTBOX_DUE)?;
            let mut failed = txn.open_table(FAILED)?;
            let mut meta = txn.open_table(META)?;
            for s in settlements {
                match s {
                    Settlement::Ack { id } => {
                        if take_entry(&mut outbox, &mut due, id)?.is_some() {
                            touched += 1;
                        }
                    }
                    Settlement::RetryAt {
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
                            touched += 1;
                        }
                    }
                    Settlement::Fail {
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
                            touched += 1;
                        }
                    }
                }
            }
        }
        txn.commit()?;
        Ok(touched)
    }
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

impl PushQueue for Store {
    fn enqueue(&self, jobs: Vec<NewPushJob>, now_ms: u64) -> QueueFuture<'_, Vec<u64>> {
        Box::pin(async move { Ok(self.enqueue_grouped(jobs, now_ms).await?) })
    }

    fn claim(&self, platform: Platform, now_ms: u64, limit: usize) -> QueueFuture<'_, Claimed> {
        Box::pin(async move {
            Ok(self
                .call(move |s| s.claim_blocking(platform, now_ms, limit))
                .await?)
        })
    }

    fn settle(&self, settlements: Vec<Settlement>) -> QueueFuture<'_, usize> {
        Box::pin(async move { Ok(self.settle_jobs(settlements).await?) })
    }

    fn depth(&self) -> QueueFuture<'_, u64> {
        Box::pin(async move { Ok(self.outbox_len().await?) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::tests::{device, job};
    use super::*;

    fn retry(id: u64, at_ms: u64) -> Settlement {
        Settlement::RetryAt {
            id,
            at_ms,
            attempts: 1,
            reason: "http_500".into(),
        }
    }

    /// Concurrent enqueues share commits: every caller still gets its own
    /// ids, consecutive and in its order, none shared, all durable.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_enqueues_get_their_own_ids_and_all_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = device("a", "alice");
        let mut tasks = tokio::task::JoinSet::new();
        for caller in 0..64u64 {
            let (store, d) = (store.clone(), d.clone());
            tasks.spawn(async move {
                let jobs = (0..3).map(|k| job(&d, caller * 10 + k)).collect();
                (caller, store.enqueue(jobs).await.unwrap())
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let (_, ids) = r.unwrap();
            assert_eq!(ids.len(), 3);
            assert_eq!((ids[1], ids[2]), (ids[0] + 1, ids[0] + 2), "{ids:?}");
            all.extend(ids);
        }
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 64 * 3, "no id given twice");
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.outbox_len().await.unwrap(), 64 * 3);
        let due = store.due(unix_now_ms(), 1000).await.unwrap();
        let mut offsets: Vec<u64> = due.iter().map(|e| e.job.spec.offset).collect();
        offsets.sort_unstable();
        let want: Vec<u64> = (0..64)
            .flat_map(|c| (0..3).map(move |k| c * 10 + k))
            .collect();
        assert_eq!(offsets, want);
    }

    #[tokio::test]
    async fn jobs_are_claimed_once_until_settled() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let queue: &dyn PushQueue = &store;
        let d = device("a", "alice");
        let now = unix_now_ms();
        let ids = queue
            .enqueue(vec![job(&d, 1), job(&d, 2), job(&d, 3)], now)
            .await
            .unwrap();
        assert_eq!(ids.len(), 3);
        assert_eq!(ids[1], ids[0] + 1);
        let first = queue.claim(Platform::Apns, now, 2).await.unwrap();
        let offsets = |c: &Claimed| c.jobs.iter().map(|e| e.job.spec.offset).collect::<Vec<_>>();
        assert_eq!(offsets(&first), [1, 2]);
        assert_eq!(first.next_at, Some(now), "the third is due too");
        // Claimed jobs are not handed out again.
        let second = queue.claim(Platform::Apns, now, 10).await.unwrap();
        assert_eq!(offsets(&second), [3]);
        assert!(
            queue
                .claim(Platform::Fcm, now, 10)
                .await
                .unwrap()
                .jobs
                .is_empty()
        );
        // Settled: acked, retried later, failed.
        let settled = queue
            .settle(vec![
                Settlement::Ack { id: ids[0] },
                retry(ids[1], now + 60_000),
                Settlement::Fail {
                    id: ids[2],
                    attempts: 1,
                    reason: "BadTopic".into(),
                },
            ])
            .await
            .unwrap();
        assert_eq!(settled, 3);
        assert_eq!(queue.depth().await.unwrap(), 1);
        let early = queue.claim(Platform::Apns, now, 10).await.unwrap();
        assert!(early.jobs.is_empty());
        assert_eq!(early.next_at, Some(now + 60_000));
        let later = queue.claim(Platform::Apns, now + 60_000, 10).await.unwrap();
        assert_eq!(later.jobs[0].job.id, ids[1]);
        assert_eq!(later.jobs[0].attempts, 1);
        assert_eq!(store.failed_total().await.unwrap(), 1);
        let failed = store.failed_jobs(10).await.unwrap();
        assert_eq!(
            (failed[0].reason.as_str(), failed[0].job.spec.offset),
            ("BadTopic", 3)
        );
        // Settling a job that is gone counts nothing.
        assert_eq!(
            queue
                .settle(vec![Settlement::Ack { id: ids[0] }])
                .await
                .unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn the_outbox_survives_reopening_and_claims_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let d = device("a", "alice");
        let ids = {
            let store = Store::open(dir.path()).unwrap();
            store.put_device(d.clone()).await.unwrap();
            let ids = store.enqueue(vec![job(&d, 7)]).await.unwrap();
            let claimed = PushQueue::claim(&store, Platform::Apns, u64::MAX, 10)
                .await
                .unwrap();
            assert_eq!(claimed.jobs.len(), 1);
            ids
        };
        let store = Store::open(dir.path()).unwrap();
        let again = PushQueue::claim(&store, Platform::Apns, u64::MAX, 10)
            .await
            .unwrap();
        assert_eq!(again.jobs[0].job.id, ids[0], "due again after a restart");
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
            .settle_jobs(
                ids.iter()
                    .map(|&id| Settlement::Fail {
                        id,
                        attempts: 1,
                        reason: "x".into(),
                    })
                    .collect(),
            )
            .await
            .unwrap();
        assert_eq!(store.failed_total().await.unwrap(), n as u64);
        let kept = store.failed_jobs(usize::MAX).await.unwrap();
        assert_eq!(kept.len() as u64, FAILED_KEEP);
        assert_eq!(kept[0].job.spec.offset, n as u64 - 1);
        assert_eq!(store.outbox_len().await.unwrap(), 0);
    }
}
