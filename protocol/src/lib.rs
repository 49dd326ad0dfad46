//! The Tether wire protocol, version 1 (`../shared/PROTOCOL.md`), with no I/O.
//!
//! This crate is the one codec that the broker, the load tester, the client and
//! the tests share: typed messages ([`ClientMessage`], [`ServerMessage`]),
//! their JSON and MessagePack encodings ([`codec`]), the QUIC length framing
//! ([`frame`]), validated names ([`ChannelName`], [`UserId`], [`Epoch`],
//! [`Offset`]) and the close and error codes ([`CloseCode`], [`ErrorCode`]).
//! Nothing here touches a socket, a runtime or a clock.

pub mod codec;
pub mod codes;
pub mod frame;
pub mod messages;
pub mod names;
mod value;

pub use codec::{DecodeError, Encoding};
pub use codes::{CloseCode, ErrorCode};
pub use messages::*;
pub use names::{ChannelName, Epoch, NameError, Offset, UserId};

/// The default maximum message size (PROTOCOL.md §2), in bytes.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// Maximum nesting of maps and arrays in any message (PROTOCOL.md §2).
pub const MAX_DEPTH: usize = 64;

/// WebSocket subprotocol for JSON text frames.
pub const SUBPROTOCOL_JSON: &str = "tether.v1.json";

/// WebSocket subprotocol for MessagePack binary frames.
pub const SUBPROTOCOL_MSGPACK: &str = "tether.v1.msgpack";

/// ALPN of the QUIC transport.
pub const QUIC_ALPN: &[u8] = b"tether/1";
