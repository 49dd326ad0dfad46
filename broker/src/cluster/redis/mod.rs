//! Cluster mode: the seams of [`crate::cluster`] implemented on Redis — one
//! Redis (`--redis-url`) or a Redis Cluster (`--redis-cluster`), so that any
//! node can publish, deliver and resume.
//!
//! Two kinds of connection per node: [`Conn`] for commands (a
//! `ConnectionManager`, or a `ClusterConnection` that routes each command to
//! the shard of its key), and a dedicated pub/sub connection per shard
//! owned by the subscriber task ([`pubsub`]). Every key of a channel carries
//! the channel's name as its hash tag (`tether:{news}:p`), so that a
//! channel's position, history and pub/sub channel share one slot of a
//! Redis Cluster and one script can touch them all.
//!
//! Files: [`broker`] (the `Broker`: the publish script, history),
//! [`budget`] (what stops being kept while Redis is near full),
//! [`batch`] (publications pipelined, one round at a time),
//! [`pubsub`] (the node's subscriptions, gap checks, the probe), [`keys`],
//! [`presence`], [`resume`] (sessions, the node bus), [`push`] (devices and
//! the push queue), [`ack`] (ack-timeout checks).

pub mod ack;
pub mod batch;
pub mod broker;
pub mod budget;
pub mod keys;
pub mod presence;
pub mod pubsub;
pub mod push;
pub mod resume;

use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::cluster::BrokerError;
use crate::config::RedisTarget;

/// How long one command may take before the caller is told "unavailable".
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection for commands, to one Redis or to a Redis Cluster. Cheap to
/// clone: clones share the connection (commands are pipelined on it).
#[derive(Clone)]
pub enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Conn::Single(_) => "Conn::Single",
            Conn::Cluster(_) => "Conn::Cluster",
        })
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// What cluster mode needs to reach Redis.
#[derive(Debug, Clone)]
pub struct Redis {
    pub target: RedisTarget,
    pub conn: Conn,
}

impl Redis {
    /// Connects the command connection (waits until Redis answers: a node
    /// that cannot reach Redis at start says so instead of starting).
    pub async fn connect(target: &RedisTarget) -> Result<Redis, RedisError> {
        let conn = match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_max_delay(Duration::from_secs(2));
                Conn::Single(ConnectionManager::new_with_config(client, config).await?)
            }
            RedisTarget::Cluster(seeds) => {
                let client = redis::cluster::ClusterClient::builder(seeds.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()?;
                Conn::Cluster(client.get_async_connection().await?)
            }
        };
        Ok(Redis {
            target: target.clone(),
            conn,
        })
    }

    /// Whether this is a Redis Cluster (sharded pub/sub: `SPUBLISH`).
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, RedisTarget::Cluster(_))
    }
}

/// A Redis failure as the seams report it: unreachable, timed out or
/// refused (loading, a failover) is "unavailable"; anything else an
/// internal error.
pub fn broker_error(e: &RedisError) -> BrokerError {
    use redis::ServerErrorKind as S;
    let busy = matches!(
        e.kind(),
        redis::ErrorKind::Server(
            S::BusyLoading | S::TryAgain | S::ClusterDown | S::MasterDown | S::ReadOnly
        ) | redis::ErrorKind::ClusterConnectionNotFound
    );
    if busy
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
    {
        BrokerError::Unavailable(e.to_string())
    } else {
        BrokerError::Internal(e.to_string())
    }
}

/// Runs `f` under [`RESPONSE_TIMEOUT`], mapping its failure.
pub async fn timed<T>(
    f: impl std::future::Future<Output = Result<T, RedisError>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(RESPONSE_TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(broker_error(&e)),
        Err(_) => Err(BrokerError::Unavailable(format!(
            "no answer from Redis within {RESPONSE_TIMEOUT:?}"
        ))),
    }
}
