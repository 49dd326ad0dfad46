//! The in-memory implementations of the cluster seams: what a single node
//! runs with, no Redis needed.

pub mod broker;
pub mod history;
pub mod idempotency;

pub use broker::{MemoryBroker, MemoryBrokerConfig};
