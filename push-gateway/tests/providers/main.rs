//! Integration tests: the APNs and FCM clients and the gateway against the
//! fake providers of `tether-tests`, over real HTTP/2 on loopback ports.

#![allow(clippy::unwrap_used)]

mod apns;
mod common;
mod durability;
mod fcm;
