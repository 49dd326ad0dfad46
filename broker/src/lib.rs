//! The Tether broker: WebSocket sessions, the hub, the backend HTTP API.
//!
//! Rooms and their rules: [`hub`] knows nothing of sockets; [`transport`]
//! knows nothing of channels; [`session`] is the one place that holds both.
//! [`server`] wires them under one cancellation and shutdown order.

pub mod accept;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod hub;
pub mod lifecycle;
pub mod metrics;
pub mod outbox;
pub mod push;
pub mod server;
pub mod session;
pub mod transport;

pub use config::Config;
pub use server::{Server, ServerError};
