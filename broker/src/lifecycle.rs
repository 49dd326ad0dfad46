//! Where the node is in its life: starting, ready (accepting clients), or
//! shutting down. Read by the accept loops, the sessions and `/readyz`.

use std::sync::atomic::{AtomicBool, Ordering};

/// Readiness and shutdown flags of one node.
#[derive(Debug, Default)]
pub struct Lifecycle {
    ready: AtomicBool,
    shutting_down: AtomicBool,
}

impl Lifecycle {
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
