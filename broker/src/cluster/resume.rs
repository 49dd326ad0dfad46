//! Resumable sessions ([`ResumeStore`]) and messages to the node that holds
//! a live session ([`NodeBus`]).
//!
//! A session that ends leaves a [`SessionRecord`] for the resume window; a
//! resume claims it, once. A resume of a session that is still connected
//! takes it over: the claim is registered in the store, the node holding the
//! session is told ([`ControlMessage::TakeOver`]) and closes it with 4000,
//! and that session's last act, [`ResumeStore::detach`], hands its record to
//! the claimant ([`ResumeStore::await_handoff`]). No step needs the two
//! sessions to share memory, so they may be on different nodes.
//!
//! The store never sees tokens: the session verifies the token's signature
//! and user and claims by `(session, nonce)`, the nonce being the one in the
//! newest token the session was given (an older token is "used").

use std::time::Duration;

use tether_protocol::{ChannelName, Epoch, Offset};

use super::BoxFuture;

/// One subscription as a resumed session needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubRecord {
    pub channel: ChannelName,
    pub epoch: Epoch,
    /// Last offset written to the old connection.
    pub delivered: Offset,
    /// Last offset the client acked, if it ever acked this channel.
    pub acked: Option<Offset>,
}

/// What a session leaves behind when its connection ends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    pub subs: Vec<SubRecord>,
}

/// Why a resume attempt gives a fresh session instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a token of ours (forged, damaged, or signed by another key).
    Invalid,
    /// A token of another user.
    OtherUser,
    /// Unknown session, or its resume window has passed.
    Expired,
    /// The token was already used (a newer one has been issued since).
    Used,
    /// The live session did not hand over in time.
    TakeoverFailed,
    /// The store could not be reached.
    Unavailable,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Invalid => "invalid",
            Refusal::OtherUser => "other_user",
            Refusal::Expired => "expired",
            Refusal::Used => "used",
            Refusal::TakeoverFailed => "takeover_failed",
            Refusal::Unavailable => "unavailable",
        }
    }
}

/// Where a live session runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveSession {
    pub node: String,
    pub conn_id: u64,
}

/// The outcome of claiming a session.
#[derive(Debug)]
pub enum Claim {
    /// The session was detached: here is what it left (now removed).
    Ready(SessionRecord),
    /// The session is still connected there; this claim is registered. Tell
    /// its node ([`NodeBus`]), then [`ResumeStore::await_handoff`].
    Live(LiveSession),
    Refused(Refusal),
}

/// The store could not be reached: the caller gives a fresh session (a
/// resume) or logs and goes on (a detach).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("resume store unavailable: {0}")]
pub struct ResumeError(pub String);

/// Resumable sessions: live ones (for takeover) and detached ones within
/// their resume window.
pub trait ResumeStore: Send + Sync + std::fmt::Debug + 'static {
    /// `session` is live as `live` from now on, and its newest token
    /// carries `nonce` (older tokens are used up).
    fn register_live<'a>(
        &'a self,
        session: &'a str,
        live: LiveSession,
        nonce: u64,
    ) -> BoxFuture<'a, Result<(), ResumeError>>;

    /// Whether [`ResumeStore::snapshot`] keeps anything (sessions skip it
    /// where it does not).
    fn keeps_snapshots(&self) -> bool {
        false
    }

    /// The live connection `conn_id` of `session` now stands at `record`
    /// (called on every heartbeat and when its subscriptions change): what
    /// a resume gets if its node dies. `seq` grows with every snapshot of
    /// the connection: an older one arriving late is ignored. A store that
    /// dies with its node keeps nothing.
    fn snapshot<'a>(
        &'a self,
        _session: &'a str,
        _conn_id: u64,
        _seq: u64,
        _record: &'a SessionRecord,
    ) -> BoxFuture<'a, Result<(), ResumeError>> {
        Box::pin(async { Ok(()) })
    }

    /// Claims `session` with the `nonce` of a verified token. Atomic: of
    /// concurrent claims with one token at most one gets the record. A
    /// refused claim changes nothing.
    fn claim<'a>(
        &'a self,
        session: &'a str,
        nonce: u64,
    ) -> BoxFuture<'a, Result<Claim, ResumeError>>;

    /// After [`Claim::Live`]: waits up to `wait` for the live session to
    /// hand its record over. When it did not: its last snapshot, where the
    /// store keeps one (its node is dead or stuck), else `None` — the claim
    /// is withdrawn and the token stays usable.
    fn await_handoff<'a>(
        &'a self,
        session: &'a str,
        nonce: u64,
        wait: Duration,
    ) -> BoxFuture<'a, Result<Option<SessionRecord>, ResumeError>>;

    /// The connection `conn_id` of `session` ended: hands `record` to a
    /// claim that waits for it, or keeps it for `window`. A session already
    /// taken over by a newer connection is left alone.
    fn detach<'a>(
        &'a self,
        session: &'a str,
        conn_id: u64,
        record: SessionRecord,
        window: Duration,
    ) -> BoxFuture<'a, Result<(), ResumeError>>;

    /// Periodic housekeeping (expired records), never on a session's path.
    fn sweep(&self) {}
}

/// A message from one node to another about a session it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMessage {
    /// Close connection `conn_id` with 4000: a resume elsewhere takes the
    /// session over.
    TakeOver { conn_id: u64 },
}

/// What a node does with the control messages addressed to it: the
/// session table implements it.
pub trait ControlSink: Send + Sync + 'static {
    fn on_control(&self, message: ControlMessage);
}

/// Delivers control messages to the node they are for.
pub trait NodeBus: Send + Sync + std::fmt::Debug + 'static {
    fn send<'a>(
        &'a self,
        node: &'a str,
        message: ControlMessage,
    ) -> BoxFuture<'a, Result<(), ResumeError>>;
}
