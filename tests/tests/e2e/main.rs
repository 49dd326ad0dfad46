//! End-to-end tests: real broker processes, real sockets.

#![allow(clippy::unwrap_used)]

mod api;
mod auth;
mod bad_input;
mod cluster;
mod lifecycle;
mod loadtest;
mod push;
mod quic;
mod resume;
mod sessions;
mod tls;
mod webpush;
