//! The device registry seam: what the broker needs of a device store.
//!
//! [`Store`] (redb, one node) implements it; a cluster keeps devices in
//! Redis behind the same trait. The gateway prunes dead tokens in its own
//! store and reports [`crate::GatewayEvent::DeviceRemoved`], so a shared
//! registry can be told as well.

use std::future::Future;
use std::pin::Pin;

use crate::store::{Store, StoreError};
use crate::types::Device;

/// A boxed future of the registry (object-safe: `Arc<dyn DeviceRegistry>`).
pub type RegistryFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Registered devices, by id and by user.
pub trait DeviceRegistry: Send + Sync + 'static {
    /// Validates and stores `device` (replacing one with the same id);
    /// returns the record as stored, `updated_at` set.
    fn put_device(&self, device: Device) -> RegistryFuture<'_, Device>;
    /// Removes a device; `false` when there was none.
    fn delete_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, bool>;
    fn get_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, Option<Device>>;
    fn devices_for_user<'a>(&'a self, user: &'a str) -> RegistryFuture<'a, Vec<Device>>;
}

impl DeviceRegistry for Store {
    fn put_device(&self, device: Device) -> RegistryFuture<'_, Device> {
        Box::pin(Store::put_device(self, device))
    }

    fn delete_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, bool> {
        Box::pin(Store::delete_device(self, device_id))
    }

    fn get_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, Option<Device>> {
        Box::pin(Store::get_device(self, device_id))
    }

    fn devices_for_user<'a>(&'a self, user: &'a str) -> RegistryFuture<'a, Vec<Device>> {
        Box::pin(Store::devices_for_user(self, user))
    }
}
