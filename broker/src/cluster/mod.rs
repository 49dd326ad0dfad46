//! The seams between what a node does alone — the hub's local fan-out, the
//! sessions, the transports — and the state that the nodes of a cluster
//! share: a channel's position and history ([`Broker`]), resumable sessions
//! ([`ResumeStore`]), which devices are live ([`Presence`]) and messages to
//! the node that holds a session ([`NodeBus`]).
//!
//! Each is a trait with an in-memory implementation in [`memory`]: that is
//! what a single node runs with, no Redis needed. Cluster mode puts Redis
//! behind the same traits, one module per trait; nothing else moves.
//!
//! The traits are object-safe (`Arc<dyn Broker>`): their async methods
//! return a boxed future ([`BoxFuture`]), one allocation per call.

pub mod ack;
pub mod broker;
pub mod memory;
pub mod presence;
pub mod redis;
pub mod resume;

use std::future::Future;
use std::pin::Pin;

pub use broker::{
    Broker, BrokerError, Deliver, HistoryEntry, HistoryPage, HistoryRead, Position, Publication,
    Publish, Published,
};
pub use presence::{Liveness, Presence, PresenceError, PresenceKey};
pub use resume::{
    Claim, ControlMessage, ControlSink, LiveSession, NodeBus, Refusal, ResumeError, ResumeStore,
    SessionRecord, SubRecord,
};

/// A boxed, sendable future: what the traits' async methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
