//! [`AckChecks`]: the ack-timeout checks of a cluster, kept where every
//! node can take them (PROTOCOL.md §11, `--ack-timeout`).
//!
//! A publication on `user:{id}` with `push` to a device that is live waits
//! `--ack-timeout` for an ack before it is pushed anyway. On a single node
//! that wait is a timer of the node (`crate::push`). In a cluster it is an
//! entry in Redis: every node polls for entries that are due and takes each
//! one for itself, so a check survives the death of the node that scheduled
//! it. A taken check is settled once decided; one taken by a node that died
//! before settling goes back to the others after a claim period
//! (at-least-once: that crash window may give one push too many, never one
//! too few).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_protocol::{ChannelName, Offset};
use tether_push_gateway::{Device, Notification};

use super::{BoxFuture, BrokerError};

/// One check: push `notification` to `device` unless it acked `offset` of
/// `channel` by then.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AckCheck {
    pub device: Device,
    pub channel: ChannelName,
    pub offset: Offset,
    pub notification: Notification,
}

/// A check taken by this node: decide it, then [`AckChecks::settle`] it.
#[derive(Debug, Clone, PartialEq)]
pub struct TakenCheck {
    pub id: String,
    pub check: AckCheck,
}

/// Ack-timeout checks shared by the nodes of a cluster.
pub trait AckChecks: Send + Sync + std::fmt::Debug + 'static {
    /// Keeps `check` until `after` from now. `Ok(false)`: the store is full
    /// (the caller pushes at once instead).
    fn schedule(
        &self,
        check: AckCheck,
        after: Duration,
    ) -> BoxFuture<'_, Result<bool, BrokerError>>;
    /// Takes up to `max` due checks for this node alone.
    fn take_due(&self, max: usize) -> BoxFuture<'_, Result<Vec<TakenCheck>, BrokerError>>;
    /// Forgets a taken check: it was decided.
    fn settle<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BrokerError>>;
}
