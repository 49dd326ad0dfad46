//! The in-memory implementations of the cluster seams: what a single node
//! runs with, no Redis needed.

pub mod ack;
pub mod broker;
pub mod history;
pub mod idempotency;
pub mod presence;
pub mod resume;

pub use ack::StoredAckChecks;
pub use broker::{MemoryBroker, MemoryBrokerConfig};
pub use presence::MemoryPresence;
pub use resume::{LocalBus, MemoryResumeStore};
