//! The device registry seam: what the broker (the devices API, the offline
//! decision) and the gateway (dead-token pruning) need of a device store.
//!
//! [`crate::Store`] (redb, one node) implements it; a cluster keeps devices
//! in Redis behind the same trait. Errors are [`RegistryError`], not the
//! redb store's: callers learn only whose fault it is.

use std::future::Future;
use std::pin::Pin;

use crate::types::{Device, DeviceToken};
use crate::validate::DeviceError;

/// Why the registry refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device is not valid: the caller's fault (HTTP 400).
    #[error("invalid device: {0}")]
    Invalid(#[from] DeviceError),
    /// The registry cannot be reached or read now: ours (HTTP 503).
    #[error("device registry unavailable: {0}")]
    Unavailable(String),
}

/// A boxed future of the registry (object-safe: `Arc<dyn DeviceRegistry>`).
pub type RegistryFuture<'a, T> =
    Pin<Box<dyn Future<Output = Result<T, RegistryError>> + Send + 'a>>;

/// Registered devices, by id and by user.
pub trait DeviceRegistry: Send + Sync + 'static {
    /// Validates and stores `device` (replacing one with the same id);
    /// returns the record as stored, `updated_at` set.
    fn put_device(&self, device: Device) -> RegistryFuture<'_, Device>;
    /// Removes a device; `false` when there was none.
    fn delete_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, bool>;
    /// Removes a device whose provider said `token` is dead, if it still
    /// has that token (a device registered again meanwhile is kept).
    fn remove_dead<'a>(
        &'a self,
        device_id: &'a str,
        token: &'a DeviceToken,
    ) -> RegistryFuture<'a, bool>;
    fn get_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, Option<Device>>;
    fn devices_for_user<'a>(&'a self, user: &'a str) -> RegistryFuture<'a, Vec<Device>>;
}
