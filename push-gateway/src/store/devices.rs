//! The device half of the [`Store`]: registrations by id, indexed by user;
//! the single-node [`DeviceRegistry`].

use redb::ReadableTable;

use super::{DEVICES, DEVICES_BY_USER, Store, StoreError};
use crate::devices::{DeviceRegistry, RegistryFuture};
use crate::types::{Device, DeviceToken, unix_now};

fn user_key(user: &str, device_id: &str) -> String {
    format!("{user}\0{device_id}")
}

impl Store {
    /// Registers or replaces a device after [`Device::validate`]; sets
    /// `updated_at` to now. Returns the stored record.
    pub async fn put_device(&self, device: Device) -> Result<Device, StoreError> {
        self.call(move |s| s.put_device_blocking(device)).await
    }

    /// Removes a device; `false` if there was none.
    pub async fn delete_device(&self, device_id: &str) -> Result<bool, StoreError> {
        let id = device_id.to_owned();
        self.call(move |s| s.delete_device_blocking(&id, None))
            .await
    }

    /// Removes a device if it still holds `token`; `false` otherwise.
    pub async fn remove_dead_device(
        &self,
        device_id: &str,
        token: &DeviceToken,
    ) -> Result<bool, StoreError> {
        let (id, token) = (device_id.to_owned(), token.clone());
        self.call(move |s| s.delete_device_blocking(&id, Some(&token)))
            .await
    }

    /// One device.
    pub async fn get_device(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        let id = device_id.to_owned();
        self.call(move |s| s.get_device_blocking(&id)).await
    }

    /// Every device of `user`, ordered by device id.
    pub async fn devices_for_user(&self, user: &str) -> Result<Vec<Device>, StoreError> {
        let user = user.to_owned();
        self.call(move |s| s.devices_for_user_blocking(&user)).await
    }

    fn put_device_blocking(&self, mut device: Device) -> Result<Device, StoreError> {
        device.validate()?;
        device.updated_at = unix_now();
        let bytes = serde_json::to_vec(&device)?;
        let txn = self.begin_write()?;
        {
            let mut devices = txn.open_table(DEVICES)?;
            let mut by_user = txn.open_table(DEVICES_BY_USER)?;
            let old = match devices.insert(device.device_id.as_str(), bytes.as_slice())? {
                Some(old) => Some(serde_json::from_slice::<Device>(old.value())?),
                None => None,
            };
            if let Some(old) = old
                && old.user != device.user
            {
                by_user.remove(user_key(&old.user, &old.device_id).as_str())?;
            }
            by_user.insert(user_key(&device.user, &device.device_id).as_str(), ())?;
        }
        txn.commit()?;
        Ok(device)
    }

    /// Removes a device; with `token`, only if the stored token is that one.
    fn delete_device_blocking(
        &self,
        device_id: &str,
        token: Option<&DeviceToken>,
    ) -> Result<bool, StoreError> {
        let txn = self.begin_write()?;
        let removed = {
            let mut devices = txn.open_table(DEVICES)?;
            let existing: Option<Device> = match devices.get(device_id)? {
                Some(v) => Some(serde_json::from_slice(v.value())?),
                None => None,
            };
            match existing {
                Some(d) if token.is_none_or(|t| *t == d.token) => {
                    devices.remove(device_id)?;
                    let mut by_user = txn.open_table(DEVICES_BY_USER)?;
                    by_user.remove(user_key(&d.user, device_id).as_str())?;
                    true
                }
                _ => false,
            }
        };
        txn.commit()?;
        Ok(removed)
    }

    fn get_device_blocking(&self, device_id: &str) -> Result<Option<Device>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let devices = txn.open_table(DEVICES)?;
        match devices.get(device_id)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value())?)),
            None => Ok(None),
        }
    }

    fn devices_for_user_blocking(&self, user: &str) -> Result<Vec<Device>, StoreError> {
        let txn = self.inner.db.begin_read()?;
        let by_user = txn.open_table(DEVICES_BY_USER)?;
        let devices = txn.open_table(DEVICES)?;
        let start = format!("{user}\0");
        let end = format!("{user}\u{1}");
        let mut out = Vec::new();
        for row in by_user.range::<&str>(start.as_str()..end.as_str())? {
            let (key, _) = row?;
            let key = key.value();
            let device_id = &key[start.len()..];
            if let Some(v) = devices.get(device_id)? {
                out.push(serde_json::from_slice(v.value())?);
            }
        }
        Ok(out)
    }
}

impl DeviceRegistry for Store {
    fn put_device(&self, device: Device) -> RegistryFuture<'_, Device> {
        Box::pin(async move { Ok(Store::put_device(self, device).await?) })
    }

    fn delete_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, bool> {
        Box::pin(async move { Ok(Store::delete_device(self, device_id).await?) })
    }

    fn remove_dead<'a>(
        &'a self,
        device_id: &'a str,
        token: &'a DeviceToken,
    ) -> RegistryFuture<'a, bool> {
        Box::pin(async move { Ok(self.remove_dead_device(device_id, token).await?) })
    }

    fn get_device<'a>(&'a self, device_id: &'a str) -> RegistryFuture<'a, Option<Device>> {
        Box::pin(async move { Ok(Store::get_device(self, device_id).await?) })
    }

    fn devices_for_user<'a>(&'a self, user: &'a str) -> RegistryFuture<'a, Vec<Device>> {
        Box::pin(async move { Ok(Store::devices_for_user(self, user).await?) })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::tests::device;
    use super::*;
    use crate::devices::RegistryError;
    use crate::validate::DeviceError;

    #[tokio::test]
    async fn devices_are_indexed_by_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = store.put_device(device("a", "alice")).await.unwrap();
        assert!(a.updated_at > 0);
        store.put_device(device("b", "alice")).await.unwrap();
        store.put_device(device("c", "alicia")).await.unwrap();
        store.put_device(device("d", "bob")).await.unwrap();
        let ids = |v: Vec<Device>| v.into_iter().map(|d| d.device_id).collect::<Vec<_>>();
        assert_eq!(
            ids(store.devices_for_user("alice").await.unwrap()),
            ["a", "b"]
        );
        // Moving a device to another user updates the index.
        store.put_device(device("b", "bob")).await.unwrap();
        assert_eq!(ids(store.devices_for_user("alice").await.unwrap()), ["a"]);
        assert_eq!(
            ids(store.devices_for_user("bob").await.unwrap()),
            ["b", "d"]
        );
        assert!(store.delete_device("a").await.unwrap());
        assert!(!store.delete_device("a").await.unwrap());
        assert!(store.devices_for_user("alice").await.unwrap().is_empty());
        assert!(store.get_device("a").await.unwrap().is_none());
        assert_eq!(
            store.get_device("d").await.unwrap().unwrap().user,
            "bob".to_owned()
        );
    }

    #[tokio::test]
    async fn invalid_devices_are_refused_as_the_callers_fault() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d = device("a", "alice");
        d.token = "nothex".into();
        let registry: &dyn DeviceRegistry = &store;
        let err = registry.put_device(d).await.unwrap_err();
        assert!(matches!(
            err,
            RegistryError::Invalid(DeviceError::BadApnsToken)
        ));
    }

    #[tokio::test]
    async fn a_dead_token_removes_only_a_device_still_holding_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut d = device("a", "alice");
        store.put_device(d.clone()).await.unwrap();
        let old_token = d.token.clone();
        d.token = "ab".repeat(32).into();
        store.put_device(d.clone()).await.unwrap();
        assert!(!store.remove_dead_device("a", &old_token).await.unwrap());
        assert!(store.get_device("a").await.unwrap().is_some());
        assert!(store.remove_dead_device("a", &d.token).await.unwrap());
        assert!(store.devices_for_user("alice").await.unwrap().is_empty());
    }
}
