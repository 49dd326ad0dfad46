//! The seam between the gateway and a push service: [`Provider`] sends one
//! job and says what happened. The APNs and FCM clients implement it;
//! tests and the broker can substitute their own.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use crate::outcome::Outcome;
use crate::types::{Platform, PushJob};

/// The future returned by [`Provider::send`].
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// Sends push jobs to one push service.
///
/// Boxed futures keep the trait object-safe (`Arc<dyn Provider>`); one
/// allocation per push is noise next to an HTTP/2 request.
pub trait Provider: Send + Sync + 'static {
    /// The platform this provider serves.
    fn platform(&self) -> Platform;

    /// Sends one job. Never panics on provider or network errors: every
    /// failure is an [`Outcome`]. May be called concurrently.
    fn send<'a>(&'a self, job: &'a PushJob) -> SendFuture<'a>;
}

/// A provider that cannot be built from its settings. The message names the
/// setting (the broker's flag) so an operator knows what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: cannot read {path}: {source}")]
    Read {
        setting: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
}

pub(crate) fn read_file(
    setting: &'static str,
    path: &std::path::Path,
) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        setting,
        path: path.to_owned(),
        source,
    })
}

/// The outcome for a request that got no HTTP answer. The error is logged
/// without its URL (which holds the APNs device token).
pub(crate) fn network_outcome(platform: Platform, err: reqwest::Error) -> Outcome {
    let reason = if err.is_timeout() {
        "timeout"
    } else if err.is_connect() {
        "connect"
    } else {
        "network"
    };
    let err = err.without_url();
    tracing::debug!(%platform, reason, error = %err, "push request failed");
    Outcome::retry(reason)
}

/// Default time limit for one provider request.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time limit for opening a connection to a provider.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PING interval on idle provider connections (keeps them open
/// through NATs and lets a dead one be noticed).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
