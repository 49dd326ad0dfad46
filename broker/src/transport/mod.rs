//! Transports carry encoded protocol messages between a client and its
//! session. They know nothing of channels, sessions or the hub (they import
//! only the neutral `outbox` and the configuration): the session drives
//! them through [`Transport`], the one seam between a WebSocket or QUIC
//! connection and the single session implementation. The accept loops
//! (`crate::accept`) are where a transport meets a session.

pub mod quic;
pub mod stream;
pub mod tls;
pub mod ws;

use std::collections::VecDeque;
use std::future::Future;
use std::task::{Context, Poll};

use bytes::Bytes;
use tether_protocol::{CloseCode, Encoding};

use crate::outbox::{DirectWrite, Frame};

/// What arrived from the client.
#[derive(Debug)]
pub enum Inbound {
    /// One encoded protocol message.
    Message(Bytes),
    /// Something that proves the client alive but carries no message
    /// (WebSocket ping or pong control frames).
    Activity,
    /// Bytes the transport owes the client in answer, already framed (the
    /// pong to a WebSocket ping): the session queues them in order.
    Reply(Bytes),
    /// The client closed the connection.
    Closed,
}

/// Why a transport failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A message over the size limit (close 4009).
    #[error("message too large")]
    TooLarge,
    /// Bytes that break the framing or encoding rules (close 4001).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The connection is gone (reset, EOF, I/O error): nothing more to send.
    #[error("connection lost: {0}")]
    Gone(String),
}

/// A client connection as the session sees it.
pub trait Transport: Send + 'static {
    /// The transport's name in metrics and logs.
    const NAME: &'static str;

    /// The encoding negotiated for this connection.
    fn encoding(&self) -> Encoding;

    /// A path that writes frames to the connection from any thread without
    /// waiting, if the connection has one (see `session::outbox`).
    fn direct(&self) -> Option<Box<dyn DirectWrite>> {
        None
    }

    /// The next inbound item.
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound, TransportError>>;

    /// Writes the queued frames, in order, and flushes them in one go.
    /// `sent` sees each frame once it is handed to the connection. Ready
    /// only when `frames` is empty and everything is in the connection and
    /// flushed, nothing held back (a half-written frame included): the
    /// session then lets producers write through (`Transport::direct`).
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut VecDeque<Frame>,
        sent: &mut dyn FnMut(Frame),
    ) -> Poll<Result<(), TransportError>>;

    /// Sends `last` (the `disconnect` message) where the connection can still
    /// take it, then closes with `code`. Best effort; callers bound it with a
    /// timeout.
    fn close(&mut self, code: CloseCode, last: Option<Bytes>) -> impl Future<Output = ()> + Send;

    /// The peer closed the connection ([`Inbound::Closed`]): completes the
    /// closing handshake where the transport has one (WebSocket answers a
    /// Close frame with a Close frame, RFC 6455 §5.5.1). Best effort;
    /// callers bound it with a timeout.
    fn answer_close(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
