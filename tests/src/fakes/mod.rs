//! Fake push providers for tests: [`apns::FakeApns`] and [`fcm::FakeFcm`]
//! are HTTP/2 cleartext (prior knowledge) servers on 127.0.0.1 with a free
//! port, [`webpush::FakeWebPush`] an HTTP/1.1 one that decrypts what it
//! gets, started in a tokio task of the caller's runtime and stopped on
//! `Drop`. They check what Apple and Google check, answer in their formats,
//! can be told to fail, and record what they accepted. [`keys`] makes the
//! key material with the `openssl` CLI.
//!
//! ```text
//! let keys = fakes::keys::es256_pair()?;
//! let apns = FakeApns::start(FakeApnsConfig {
//!     public_key_pem: keys.public_pem.clone(),
//!     key_id: "KEY1234567".into(),
//!     team_id: "TEAM123456".into(),
//!     topic: "com.example.app".into(),
//! }).await?;
//! // broker: --apns-endpoint {apns.url()} --apns-key-file <keys.private_pem in a file> …
//! apns.wait_accepted(1, WAIT).await?;
//! ```

pub mod apns;
pub mod fcm;
pub mod keys;
pub mod lossy_broker;
mod server;
pub mod webpush;

pub use apns::{ApnsFault, FakeApns, FakeApnsConfig};
pub use fcm::{FakeFcm, FakeFcmConfig, FcmFault};
pub use webpush::{FakeWebPush, Subscription, WebPushFault};
