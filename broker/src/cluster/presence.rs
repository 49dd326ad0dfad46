//! [`Presence`]: which devices have a live session on their user's personal
//! channel, and what those sessions acked — what the offline-push decision
//! reads (`crate::push`).
//!
//! A device is live while a session that connected with that `device` is
//! subscribed to `user:{id}`. Entries expire unless refreshed
//! ([`Presence::touch`], on every heartbeat): a node that dies takes its
//! sessions' presence with it within the expiry, even where nobody could
//! say `leave`.

use tether_protocol::{ChannelName, Offset};

use super::BoxFuture;

/// One live session of a device on a personal channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PresenceKey<'a> {
    pub device: &'a str,
    pub channel: &'a ChannelName,
    /// The connection, unique within its node.
    pub conn_id: u64,
}

/// What the push decision needs to know about a device and a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Liveness {
    /// Some session of the device is live on the channel.
    pub live: bool,
    /// Some live session of the device acked the message's offset.
    pub acked: bool,
}

/// Presence could not be read: the caller pushes (a push too many rather
/// than one too few).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("presence unavailable: {0}")]
pub struct PresenceError(pub String);

/// Live devices of users, with expiry. The writes never wait (an
/// implementation that writes elsewhere queues them); the read is async.
pub trait Presence: Send + Sync + std::fmt::Debug + 'static {
    /// The session `key` is live, having acked up to `acked`.
    fn join(&self, key: PresenceKey<'_>, acked: Option<Offset>);
    /// The session acked up to `offset` (cumulative).
    fn ack(&self, key: PresenceKey<'_>, offset: Offset);
    /// The session is still there: its entry's expiry starts again.
    fn touch(&self, key: PresenceKey<'_>);
    /// The session left the channel (or ended).
    fn leave(&self, key: PresenceKey<'_>);
    /// Whether `device` is live on `channel`, and acked `offset`.
    fn liveness<'a>(
        &'a self,
        device: &'a str,
        channel: &'a ChannelName,
        offset: Offset,
    ) -> BoxFuture<'a, Result<Liveness, PresenceError>>;
}
