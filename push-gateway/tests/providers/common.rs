//! Shared set-up: keys, fakes, clients, a gateway with fast retries.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, bail};
use tether_push_gateway::{
    ApnsClient, ApnsConfig, Device, FcmClient, FcmConfig, Gateway, GatewayConfig, GatewayEvent,
    NewPushJob, Notification, Platform, Provider, ServiceAccount, Store,
};
use tether_tests::fakes::{FakeApns, FakeApnsConfig, FakeFcm, FakeFcmConfig, keys};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How long a test waits for any one expected event.
pub const WAIT: Duration = Duration::from_secs(20);
pub const KEY_ID: &str = "KEY1234567";
pub const TEAM_ID: &str = "TEAM123456";
pub const TOPIC: &str = "com.example.tether";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A fake APNs expecting the shared ES256 key, and a client for it.
pub async fn apns() -> Result<(FakeApns, Arc<ApnsClient>)> {
    init_tracing();
    let keys = keys::es256_pair()?;
    let fake = FakeApns::start(FakeApnsConfig {
        public_key_pem: keys.public_pem.clone(),
        key_id: KEY_ID.into(),
        team_id: TEAM_ID.into(),
        topic: TOPIC.into(),
    })
    .await?;
    let client = ApnsClient::new(
        ApnsConfig::new(keys.private_pem, KEY_ID, TEAM_ID)
            .with_topic(TOPIC)
            .with_endpoint(fake.url()),
    )?;
    Ok((fake, Arc::new(client)))
}

/// A fake FCM expecting the shared RSA key, and a client for it.
pub async fn fcm() -> Result<(FakeFcm, Arc<FcmClient>)> {
    init_tracing();
    let keys = keys::rsa_pair()?;
    let fake = FakeFcm::start(FakeFcmConfig::new(keys.public_pem.clone())).await?;
    let account = ServiceAccount::from_json(&fake.service_account_json(&keys.private_pem))?;
    let client = FcmClient::new(FcmConfig::new(account).with_endpoint(fake.url()))?;
    Ok((fake, Arc::new(client)))
}

/// An APNs device token (64 hex digits) numbered `n`.
pub fn apns_token(n: u32) -> String {
    format!("{n:08x}{}", "ab".repeat(28))
}

pub fn device(id: &str, user: &str, platform: Platform, token: String) -> Device {
    Device {
        device_id: id.into(),
        user: user.into(),
        platform,
        token: token.into(),
        topic: None,
        sandbox: false,
        updated_at: 0,
    }
}

pub fn alert(title: &str) -> Notification {
    Notification {
        title: Some(title.into()),
        ..Default::default()
    }
}

pub fn job(device: &Device, notification: Notification, offset: u64) -> NewPushJob {
    NewPushJob::for_device(
        device,
        notification,
        format!("user:{}", device.user),
        offset,
    )
}

/// Retries after tens of milliseconds instead of seconds.
pub fn fast_config() -> GatewayConfig {
    GatewayConfig {
        base_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
        ..GatewayConfig::default()
    }
}

pub struct Running {
    pub gateway: Gateway,
    pub events: mpsc::Receiver<GatewayEvent>,
    pub shutdown: CancellationToken,
}

impl Running {
    /// Waits for an event matching `pred`, skipping others.
    pub async fn event(&mut self, pred: impl Fn(&GatewayEvent) -> bool) -> Result<GatewayEvent> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) if pred(&e) => return Ok(e),
                Ok(Some(_)) => {}
                Ok(None) => bail!("event channel closed"),
                Err(_) => bail!("no matching gateway event within {WAIT:?}"),
            }
        }
    }

    /// Waits for `n` outcome events; returns their labels in order.
    pub async fn outcomes(&mut self, n: usize) -> Result<Vec<&'static str>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            if let GatewayEvent::Outcome { outcome, .. } = self
                .event(|e| matches!(e, GatewayEvent::Outcome { .. }))
                .await?
            {
                out.push(outcome);
            }
        }
        Ok(out)
    }

    /// Cancels and waits for the gateway to stop.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.gateway.stopped()).await?;
        Ok(())
    }
}

pub fn start(
    store: Store,
    apns: Option<Arc<dyn Provider>>,
    fcm: Option<Arc<dyn Provider>>,
    config: GatewayConfig,
) -> Running {
    let (tx, events) = mpsc::channel(4096);
    let shutdown = CancellationToken::new();
    let providers = [apns, fcm].into_iter().flatten().collect();
    let gateway = Gateway::start(store, providers, config, tx, shutdown.clone());
    Running {
        gateway,
        events,
        shutdown,
    }
}
