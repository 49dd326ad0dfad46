//! The state one broker node shares between its tasks: configuration, hub,
//! token verifier, metrics and the table of live sessions.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus_client::registry::Registry;
use tether_protocol::CloseCode;

use crate::auth::{KeyError, Verifier};
use crate::cluster::Broker;
use crate::cluster::memory::{MemoryBroker, MemoryBrokerConfig};
use crate::config::Config;
use crate::hub::{Hub, HubConfig};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::session::resume::{ResumeKeys, ResumeRegistry};

const SESSION_SHARDS: usize = 16;

type SessionShard = Mutex<HashMap<u64, Arc<Outbox>>>;

/// Live sessions of this node, by connection id, reachable through their
/// outbox (to close them at shutdown or on takeover).
#[derive(Debug)]
pub struct SessionTable {
    shards: Box<[SessionShard]>,
}

impl SessionTable {
    fn new() -> Self {
        Self {
            shards: (0..SESSION_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
        }
    }

    fn shard(&self, id: u64) -> &SessionShard {
        &self.shards[(id as usize) % self.shards.len()]
    }

    pub fn insert(&self, id: u64, outbox: Arc<Outbox>) {
        self.shard(id).lock().insert(id, outbox);
    }

    pub fn remove(&self, id: u64) {
        self.shard(id).lock().remove(&id);
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks every session to close with `code`.
    pub fn close_all(&self, code: CloseCode) {
        for shard in self.shards.iter() {
            let outboxes: Vec<Arc<Outbox>> = shard.lock().values().cloned().collect();
            for o in outboxes {
                o.close(code);
            }
        }
    }
}

/// One broker node.
#[derive(Debug)]
pub struct Node {
    pub config: Config,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub verifier: Verifier,
    pub metrics: Metrics,
    pub registry: Registry,
    pub sessions: SessionTable,
    pub resume_keys: ResumeKeys,
    pub resumes: ResumeRegistry,
    pub push: crate::push::Push,
    next_conn: AtomicU64,
    ready: AtomicBool,
    shutting_down: AtomicBool,
}

impl Node {
    /// Builds a node; `make_push` gets the node's metrics and builds the push
    /// side (it needs a running tokio runtime for the gateway).
    pub fn new(
        config: Config,
        make_push: impl FnOnce(&Config, &Metrics) -> crate::push::Push,
    ) -> Result<Arc<Node>, KeyError> {
        let mut registry = Registry::default();
        let metrics = Metrics::new(&mut registry);
        let push = make_push(&config, &metrics);
        let verifier = Verifier::new(&config.client_auth)?;
        let broker_metrics = metrics.clone();
        let broker_config = MemoryBrokerConfig::from_config(&config);
        let hub = Hub::with_broker(
            HubConfig {
                history_limit: config.history_size,
                max_buffered: config.max_outbox_messages,
            },
            metrics.clone(),
            |sink| MemoryBroker::new(broker_config, broker_metrics, sink),
        );
        let broker = hub.broker().clone();
        let resume_keys = ResumeKeys::new(config.resume_secret.clone());
        Ok(Arc::new(Node {
            config,
            hub,
            broker,
            verifier,
            metrics,
            registry,
            sessions: SessionTable::new(),
            resume_keys,
            resumes: ResumeRegistry::default(),
            push,
            next_conn: AtomicU64::new(1),
            ready: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        }))
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Ready: accepting clients and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.shutting_down.load(Ordering::Acquire)
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}
