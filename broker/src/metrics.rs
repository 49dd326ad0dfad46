//! Prometheus metrics of one broker node, in an explicit registry so that
//! several nodes can live in one process (tests).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecoveredLabel {
    pub recovered: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PushLabel {
    pub provider: &'static str,
    pub outcome: &'static str,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabel {
    pub provider: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Every metric of the node. Clones share the same series.
#[derive(Clone, Debug)]
pub struct Metrics {
    pub connections: Family<TransportLabel, Gauge>,
    pub connections_accepted: Family<TransportLabel, Counter>,
    pub connections_refused: Family<ReasonLabel, Counter>,
    pub messages_in: Family<TransportLabel, Counter>,
    pub messages_out: Family<TransportLabel, Counter>,
    pub publications: Family<SourceLabel, Counter>,
    pub disconnects: Family<CodeLabel, Counter>,
    pub delivery_latency: Histogram,
    pub outbox_drops: Counter,
    pub channels: Gauge,
    pub channels_refused: Counter,
    pub resume_records_evicted: Counter,
    pub history_not_retained: Counter,
    pub subscriptions: Gauge,
    pub resumes: Family<OutcomeLabel, Counter>,
    pub recoveries: Family<RecoveredLabel, Counter>,
    pub replayed: Counter,
    pub replays_too_large: Counter,
    pub quic_handshakes: Family<ReasonLabel, Counter>,
    pub quic_migrations: Counter,
    pub history_bytes: Gauge,
    pub history_messages: Gauge,
    pub pushes: Family<PushLabel, Counter>,
    pub push_devices_removed: Family<ProviderLabel, Counter>,
    pub pushes_coalesced: Family<ProviderLabel, Counter>,
    pub push_enqueue_failures: Counter,
    pub push_outbox_depth: Gauge,
    pub push_token_refreshes: Family<ProviderLabel, Gauge>,
    pub cluster_reconnects: Counter,
    pub cluster_probes_failed: Counter,
    pub cluster_gaps_filled: Counter,
    pub cluster_gaps_unfilled: Counter,
    pub cluster_redis_latency: Histogram,
    /// The process's resident set size, read at each scrape.
    pub resident_memory: Gauge,
    /// Cluster mode: Redis's `used_memory` (the largest shard's), and
    /// whether it is over the budget (1) or not (0).
    pub cluster_redis_used_memory: Gauge,
    pub cluster_redis_over_budget: Gauge,
    pub cluster_presence_dropped: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics {
            connections: Family::default(),
            connections_accepted: Family::default(),
            connections_refused: Family::default(),
            messages_in: Family::default(),
            messages_out: Family::default(),
            publications: Family::default(),
            disconnects: Family::default(),
            // 100 µs … ~1.6 s
            delivery_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15),
            ),
            outbox_drops: Counter::default(),
            channels: Gauge::default(),
            channels_refused: Counter::default(),
            resume_records_evicted: Counter::default(),
            history_not_retained: Counter::default(),
            subscriptions: Gauge::default(),
            resumes: Family::default(),
            recoveries: Family::default(),
            replayed: Counter::default(),
            replays_too_large: Counter::default(),
            quic_handshakes: Family::default(),
            quic_migrations: Counter::default(),
            history_bytes: Gauge::default(),
            history_messages: Gauge::default(),
            pushes: Family::default(),
            push_devices_removed: Family::default(),
            pushes_coalesced: Family::default(),
            push_enqueue_failures: Counter::default(),
            push_outbox_depth: Gauge::default(),
            push_token_refreshes: Family::default(),
            cluster_reconnects: Counter::default(),
            cluster_probes_failed: Counter::default(),
            cluster_gaps_filled: Counter::default(),
            cluster_gaps_unfilled: Counter::default(),
            // 100 µs … ~1.6 s
            cluster_presence_dropped: Counter::default(),
            cluster_redis_latency: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15),
            ),
            resident_memory: Gauge::default(),
            cluster_redis_used_memory: Gauge::default(),
            cluster_redis_over_budget: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("tether");
        r.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "connections_accepted",
            "Client connections accepted",
            m.connections_accepted.clone(),
        );
        r.register(
            "connections_refused",
            "Client connections refused before a session started",
            m.connections_refused.clone(),
        );
        r.register(
            "messages_in",
            "Protocol messages received from clients",
            m.messages_in.clone(),
        );
        r.register(
            "messages_out",
            "Protocol messages written to clients",
            m.messages_out.clone(),
        );
        r.register(
            "publications",
            "Publications accepted, by source",
            m.publications.clone(),
        );
        r.register(
            "disconnects",
            "Sessions closed by the server, by close code",
            m.disconnects.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "Time from a publication entering the broker to its write to a client",
            m.delivery_latency.clone(),
        );
        r.register(
            "outbox_drops",
            "Clients closed because their outbox was full (slow consumers)",
            m.outbox_drops.clone(),
        );
        r.register(
            "channels",
            "Channels with state on this node",
            m.channels.clone(),
        );
        r.register(
            "channels_refused",
            "Publishes and subscribes to a new channel refused because the node held --max-channels",
            m.channels_refused.clone(),
        );
        r.register(
            "history_not_retained",
            "Publications delivered but not kept in history (their channel's history dropped) because the node held --max-history-bytes",
            m.history_not_retained.clone(),
        );
        r.register(
            "resume_records_evicted",
            "Records of ended sessions forgotten before their resume window because the node held --max-resume-bytes of them (those sessions start afresh)",
            m.resume_records_evicted.clone(),
        );
        r.register(
            "subscriptions",
            "Subscriptions on this node",
            m.subscriptions.clone(),
        );
        r.register(
            "resumes",
            "Resume attempts by outcome: resumed, or the reason a fresh session was given",
            m.resumes.clone(),
        );
        r.register(
            "recoveries",
            "Channel recoveries (subscribe with since, or resume), by whether history reached back",
            m.recoveries.clone(),
        );
        r.register(
            "replayed_messages",
            "Messages replayed from history by recoveries",
            m.replayed.clone(),
        );
        r.register(
            "replays_too_large",
            "Recoveries answered recovered: false because the replay did not fit in the client's outbox (--max-outbox-bytes / --max-outbox-messages)",
            m.replays_too_large.clone(),
        );
        r.register(
            "quic_handshakes",
            "QUIC handshakes: completed, and of those resumed from a session ticket",
            m.quic_handshakes.clone(),
        );
        r.register(
            "quic_migrations",
            "QUIC sessions that continued from a new client address",
            m.quic_migrations.clone(),
        );
        r.register(
            "history_bytes",
            "Payload bytes retained in channel histories",
            m.history_bytes.clone(),
        );
        r.register(
            "history_messages",
            "Messages retained in channel histories",
            m.history_messages.clone(),
        );
        r.register(
            "pushes",
            "Push attempts by provider and outcome (delivered, retry, dead_token, failed, skipped) and reason",
            m.pushes.clone(),
        );
        r.register(
            "push_devices_removed",
            "Devices removed because the provider said their token is dead",
            m.push_devices_removed.clone(),
        );
        r.register(
            "pushes_coalesced",
            "Pushes held back by coalescing (summed up in one later push per device, collapse key and window)",
            m.pushes_coalesced.clone(),
        );
        r.register(
            "push_enqueue_failures",
            "Push jobs that could not be written to the outbox",
            m.push_enqueue_failures.clone(),
        );
        r.register(
            "push_outbox_depth",
            "Push jobs waiting in the durable outbox",
            m.push_outbox_depth.clone(),
        );
        r.register(
            "push_token_refreshes",
            "Provider tokens made: APNs provider JWTs signed, FCM OAuth grants",
            m.push_token_refreshes.clone(),
        );
        r.register(
            "cluster_reconnects",
            "Cluster mode: Redis pub/sub connections lost or replaced",
            m.cluster_reconnects.clone(),
        );
        r.register(
            "cluster_probes_failed",
            "Cluster mode: probes of this node's pub/sub connection that did not come back in time",
            m.cluster_probes_failed.clone(),
        );
        r.register(
            "cluster_gaps_filled",
            "Cluster mode: publications this node missed on pub/sub and read from history instead",
            m.cluster_gaps_filled.clone(),
        );
        r.register(
            "cluster_gaps_unfilled",
            "Cluster mode: publications this node missed that history no longer held",
            m.cluster_gaps_unfilled.clone(),
        );
        r.register(
            "cluster_presence_dropped",
            "Cluster mode: presence writes dropped because their queue was full",
            m.cluster_presence_dropped.clone(),
        );
        r.register(
            "cluster_redis_latency_seconds",
            "Cluster mode: round trip of the periodic position check to Redis",
            m.cluster_redis_latency.clone(),
        );
        r.register(
            "cluster_redis_used_memory_bytes",
            "Cluster mode: Redis's used_memory as last read (the largest shard's)",
            m.cluster_redis_used_memory.clone(),
        );
        r.register(
            "cluster_redis_over_budget",
            "Cluster mode: 1 while Redis is over --redis-max-memory (history, idempotency keys and ended sessions' records not kept), else 0",
            m.cluster_redis_over_budget.clone(),
        );
        r.register(
            "resident_memory_bytes",
            "The broker's resident memory (VmRSS of /proc/self/status), read at each scrape",
            m.resident_memory.clone(),
        );
        m
    }

    /// Reads what is read at each scrape (the resident memory; left as it
    /// was where /proc is not there).
    pub fn refresh_process(&self) {
        let rss = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| vm_rss_bytes(&s));
        if let Some(bytes) = rss {
            self.resident_memory
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

/// `VmRSS` of a `/proc/<pid>/status` text, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_resident_memory_is_read_from_vm_rss() {
        let status = "Name:\tbroker\nVmPeak:\t  9000 kB\nVmRSS:\t  12345 kB\nThreads:\t3\n";
        assert_eq!(vm_rss_bytes(status), Some(12345 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
        let m = Metrics::new(&mut prometheus_client::registry::Registry::default());
        m.refresh_process();
        assert!(
            m.resident_memory.get() > 0,
            "this test's own process has memory"
        );
    }
}
