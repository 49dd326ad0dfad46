//! Tether's push gateway: delivers notifications to offline devices through
//! APNs, FCM and Web Push, durably, with retries, dead-token pruning and
//! coalescing of bursts.
//!
//! The broker registers devices and *enqueues* [`NewPushJob`]s; everything
//! after that happens here:
//! - [`store`]: devices and the push outbox in one embedded redb file,
//!   `{data_dir}/push.redb`. redb because it is pure Rust (no C library to
//!   build, unlike SQLite through rusqlite's `bundled`), ACID with
//!   crash-safe commits, and a typed key–value API that fits three small
//!   tables; what we need (point lookups, one index range scan, an ordered
//!   due-queue) needs no SQL.
//! - [`gateway`]: the delivery task — bounded concurrency per provider,
//!   jittered exponential backoff honouring `Retry-After`, removal of
//!   devices whose token is dead, events for metrics, bounded shutdown.
//! - [`apns`], [`fcm`] and [`webpush`]: the three [`Provider`]s, written
//!   by hand on reqwest (HTTP/2, rustls with aws-lc-rs); Web Push encrypts
//!   (RFC 8291) and signs (VAPID, RFC 8292) with aws-lc-rs.
//! - [`coalesce`]: at most one push per device and collapse key within a
//!   window, the rest summed up in one later push with their `count`.
//! - [`outcome`]: what a provider's answer means ([`Outcome`]).
//! - [`validate`]: checks for device registrations (typed errors for
//!   HTTP 400).
//!
//! Nothing here logs device tokens, keys or JWTs.

pub mod apns;
pub mod backoff;
pub mod coalesce;
pub mod devices;
pub mod fcm;
pub mod gateway;
pub mod outcome;
pub mod provider;
pub mod queue;
pub mod store;
pub mod types;
pub mod validate;
pub mod webpush;

pub use apns::{ApnsClient, ApnsConfig};
pub use devices::{DeviceRegistry, RegistryError, RegistryFuture};
pub use fcm::{FcmClient, FcmConfig, ServiceAccount};
pub use gateway::{Backend, Gateway, GatewayConfig, GatewayEvent};
pub use outcome::Outcome;
pub use provider::{ConfigError, Provider, SendFuture};
pub use queue::{Claimed, OutboxEntry, PushQueue, QueueError, QueueFuture, Settlement};
pub use store::{FailedJob, Store, StoreError};
pub use types::{
    Device, NewPushJob, Notification, Platform, Priority, PushJob, PushMode, unix_now, unix_now_ms,
};
pub use validate::{DeviceError, NotificationError};
pub use webpush::{WebPushClient, WebPushConfig};
