//! The Tether broker: WebSocket and QUIC sessions, the hub, the backend
//! HTTP API, offline push.
//!
//! Rooms and their rules (ARCHITECTURE.md): [`hub`] knows nothing of sockets
//! or sessions; [`transport`] knows nothing of channels, sessions or the
//! hub; [`session`] is the one place that holds both, and [`accept`] the one
//! place that starts sessions on transports. [`outbox`] is neutral ground
//! both sides use. [`cluster`] holds the seams to state a cluster shares
//! (broker, resume store, presence, node bus) with their in-memory
//! implementations. [`server`] wires them under one root cancellation token
//! and shutdown order.

pub mod accept;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod hub;
mod json_text;
pub mod lifecycle;
pub mod metrics;
pub mod outbox;
pub mod push;
pub(crate) mod rate;
pub mod server;
pub mod session;
pub mod transport;

pub use config::Config;
pub use server::{Server, ServerError};
