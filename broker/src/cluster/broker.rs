//! [`Broker`]: the one owner of a channel's position. It numbers every
//! publication (epoch + offset, the same on every node), keeps the bounded
//! history that recoveries read, answers repeated idempotency keys, and
//! hands each publication to the node's hub through [`Deliver`] — whichever
//! node it was published on.
//!
//! The hub tells the broker which channels this node has local subscribers
//! for ([`Broker::watch`], [`Broker::unwatch`]): the in-memory broker keeps
//! a watched channel's epoch alive; a Redis broker subscribes the node to
//! the channel only while it is watched.
//!
//! Deliveries of one channel reach [`Deliver::deliver`] one at a time and
//! in offset order. They may lag behind [`Broker::history`] (a Redis node
//! reads history on one connection and receives pub/sub on another): the
//! hub's subscribe algorithm (`hub::merge`) copes with either order.

use std::time::Instant;

use serde_json::Value;
use serde_json::value::RawValue;
use tether_protocol::{ChannelName, Epoch, ErrorCode, Offset};

use super::BoxFuture;

/// A channel's position: its epoch and latest offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Epoch,
    pub offset: Offset,
}

/// A publication to make.
#[derive(Debug)]
pub struct Publish<'a> {
    pub channel: &'a ChannelName,
    /// `data` as a value, when the publisher has one; `None`: parsed from
    /// `raw` only where needed (for MessagePack subscribers).
    pub data: Option<&'a Value>,
    /// `data` as compact JSON (`hub::encode_data`): what history keeps and
    /// what JSON subscribers receive.
    pub raw: Box<RawValue>,
    /// A repeated key on the same channel within the history TTL gets the
    /// first publication's answer and publishes nothing (§10).
    pub idempotency_key: Option<&'a str>,
}

/// The answer to a publication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub position: Position,
    /// `false`: a repeated idempotency key; nothing was published now.
    pub fresh: bool,
}

/// A publication on its way to the local subscribers.
#[derive(Debug, Clone, Copy)]
pub struct Publication<'a> {
    pub epoch: &'a Epoch,
    pub offset: Offset,
    /// Unix milliseconds when published.
    pub ts: u64,
    /// The data as compact JSON.
    pub raw: &'a RawValue,
    /// The data as a value, when the publishing node has it (MessagePack
    /// subscribers are encoded from it; otherwise from `raw`).
    pub data: Option<&'a Value>,
    /// When the publication entered this node, for the publish → deliver
    /// latency; `None` when it came from another node.
    pub published_at: Option<Instant>,
}

/// What to read of a channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRead {
    /// Return the retained publications after this offset; `None`: only
    /// the position.
    pub since: Option<Offset>,
    /// At most this many publications, oldest first.
    pub limit: usize,
}

/// One retained publication.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub offset: Offset,
    pub ts: u64,
    pub data: Box<RawValue>,
}

/// A channel's position and the history asked for.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// The epoch is empty and the offset 0 for a channel the broker does
    /// not know.
    pub position: Position,
    /// Whether history holds every publication after `since` (and `since`
    /// is not beyond the latest offset); `false` without `since`.
    pub recovered: bool,
    pub messages: Vec<HistoryEntry>,
}

/// Why the broker could not answer. Both are ours, not the caller's: the
/// API answers 503 `unavailable` or 500 `internal`, a session `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The shared state cannot be reached now (Redis down): try again later.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The shared state answered something this node cannot use.
    #[error("broker error: {0}")]
    Internal(String),
}

impl BrokerError {
    /// The protocol error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            BrokerError::Unavailable(_) => ErrorCode::Unavailable,
            BrokerError::Internal(_) => ErrorCode::Internal,
        }
    }
}

/// The owner of channel positions and history.
pub trait Broker: Send + Sync + std::fmt::Debug + 'static {
    /// Publishes: assigns the next offset (creating the channel's epoch if
    /// it has none), appends to history and delivers to every node that
    /// watches the channel. Never waits on a client.
    fn publish<'a>(&'a self, publish: Publish<'a>)
    -> BoxFuture<'a, Result<Published, BrokerError>>;

    /// Publishes several in order (offsets of one channel follow the order
    /// given), answering each. The default publishes one after the other;
    /// a Redis broker sends them in one pipeline.
    fn publish_many<'a>(
        &'a self,
        publishes: Vec<Publish<'a>>,
    ) -> BoxFuture<'a, Vec<Result<Published, BrokerError>>> {
        Box::pin(async move {
            let mut answers = Vec::with_capacity(publishes.len());
            for p in publishes {
                answers.push(self.publish(p).await);
            }
            answers
        })
    }

    /// The channel's position and, with `since`, the retained publications
    /// after it. Does not create the channel.
    fn history<'a>(
        &'a self,
        channel: &'a ChannelName,
        read: HistoryRead,
    ) -> BoxFuture<'a, Result<HistoryPage, BrokerError>>;

    /// This node has local subscribers for `channel` from now on: its
    /// publications must reach [`Deliver`]. Resolves once they do (a
    /// publication made after this resolves is delivered). Creates the
    /// channel's epoch if it has none.
    fn watch<'a>(&'a self, channel: &'a ChannelName) -> BoxFuture<'a, Result<(), BrokerError>>;

    /// This node's last local subscriber of `channel` left. Never waits.
    fn unwatch(&self, channel: &ChannelName);

    /// Periodic housekeeping (expired history, forgotten channels), called
    /// by the node's maintenance task, never on the publish path.
    fn sweep(&self) {}

    /// Whether the shared state is reachable and deliveries arrive (the
    /// node's `/readyz`). Always true in memory.
    fn ready(&self) -> bool {
        true
    }
}

/// Where a broker hands publications for the local subscribers: the hub.
pub trait Deliver: Send + Sync + 'static {
    /// One publication of `channel`, in offset order per channel.
    fn deliver(&self, channel: &ChannelName, publication: &Publication<'_>);
}
