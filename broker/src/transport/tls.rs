//! TLS material for wss and the QUIC listener: the configured certificate,
//! or a self-signed one generated at start (its SHA-256 fingerprint is
//! logged so that development clients can pin it), and session-ticket keys
//! for fast reconnects, shareable between the nodes of a cluster.
//!
//! The configured certificate is served through a [`CertStore`], which both
//! listeners' rustls configurations ask for it on every handshake: on
//! SIGHUP the broker reads the files again and swaps it in ([`CertStore::reload`]),
//! so new connections get the new certificate and the sessions already open
//! carry on untouched.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use parking_lot::RwLock;
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ProducesTickets;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// Why TLS material could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("setting `tls-cert`: cannot read {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("setting `tls-key`: cannot read {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// A certificate chain and its key.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// SHA-256 of the end-entity certificate (DER), lowercase hex.
    pub fingerprint: String,
    pub self_signed: bool,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("fingerprint", &self.fingerprint)
            .field("self_signed", &self.self_signed)
            .finish()
    }
}

/// SHA-256 fingerprint of a DER certificate, lowercase hex.
pub fn fingerprint(cert: &[u8]) -> String {
    hex::encode(Sha256::digest(cert))
}

impl Identity {
    /// Loads `cert` and `key` (PEM), or generates a self-signed certificate
    /// for `localhost` and the loopback addresses when neither is given.
    pub fn load_or_generate(cert: Option<&Path>, key: Option<&Path>) -> Result<Identity, TlsError> {
        match (cert, key) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| TlsError::Cert {
                        path: cert.display().to_string(),
                        reason: e.to_string(),
                    })?;
                let Some(first) = chain.first() else {
                    return Err(TlsError::Cert {
                        path: cert.display().to_string(),
                        reason: "no certificate in the file".into(),
                    });
                };
                let fingerprint = fingerprint(first);
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
                    path: key.display().to_string(),
                    reason: e.to_string(),
                })?;
                Ok(Identity {
                    chain,
                    key,
                    fingerprint,
                    self_signed: false,
                })
            }
            _ => {
                let names = vec![
                    "localhost".to_owned(),
                    "127.0.0.1".to_owned(),
                    "::1".to_owned(),
                ];
                let ck = rcgen::generate_simple_self_signed(names)
                    .map_err(|e| TlsError::Generate(e.to_string()))?;
                let der = ck.cert.der().clone();
                let fingerprint = fingerprint(&der);
                let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
                    .map_err(|e| TlsError::Generate(e.to_string()))?;
                Ok(Identity {
                    chain: vec![der],
                    key,
                    fingerprint,
                    self_signed: true,
                })
            }
        }
    }
}

/// The certificate both TLS listeners serve, swappable while they run.
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    /// The files to read again on reload; `None` for a generated identity.
    files: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("fingerprint", &self.fingerprint())
            .field("files", &self.files)
            .finish()
    }
}

fn certified(identity: &Identity) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = rustls::crypto::aws_lc_rs::sign::any_supported_type(&identity.key)
        .map_err(|e| TlsError::Config(format!("setting `tls-key`: {e}")))?;
    let ck = CertifiedKey::new(identity.chain.clone(), key);
    // A key that is not the certificate's would fail every handshake.
    ck.keys_match().map_err(|e| {
        TlsError::Config(format!("setting `tls-key` does not match `tls-cert`: {e}"))
    })?;
    Ok(Arc::new(ck))
}

impl CertStore {
    /// Serves `identity`; `files` (cert, key) are read again by
    /// [`CertStore::reload`].
    pub fn new(identity: &Identity, files: Option<(PathBuf, PathBuf)>) -> Result<Self, TlsError> {
        Ok(Self {
            current: RwLock::new(certified(identity)?),
            files,
        })
    }

    /// The served certificate's fingerprint (of its end-entity
    /// certificate: `Identity` never has an empty chain).
    pub fn fingerprint(&self) -> String {
        self.current
            .read()
            .cert
            .first()
            .map(|c| fingerprint(c))
            .unwrap_or_default()
    }

    /// Reads the certificate and key files again and serves them from the
    /// next handshake on; returns the new fingerprint. On any error the
    /// certificate served stays as it was.
    pub fn reload(&self) -> Result<String, TlsError> {
        let Some((cert, key)) = &self.files else {
            return Err(TlsError::Config(
                "no tls-cert/tls-key configured: nothing to reload".into(),
            ));
        };
        let identity = Identity::load_or_generate(Some(cert), Some(key))?;
        let ck = certified(&identity)?;
        *self.current.write() = ck;
        Ok(identity.fingerprint)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Session tickets sealed with AES-256-GCM under keys every node of a
/// cluster derives alike from `--quic-ticket-key`, so a client resumes its
/// TLS session on any node. The key **rotates** every [`TICKET_PERIOD`]
/// seconds with no coordination: the key of period `n` (unix time / period)
/// is HKDF-SHA-256 of the master key with `n`, a ticket carries its period,
/// and tickets of this period and the one before open (those of the next
/// one too, for clocks a little ahead). Tickets live 12 hours, so a period
/// key seals for 12 hours and opens for 24 at most; the master key itself
/// never seals anything.
pub struct SharedTicketKey {
    master: [u8; 32],
    /// Derived period keys, a few at most (the periods around now).
    keys: parking_lot::Mutex<Vec<(u64, Arc<LessSafeKey>)>>,
}

/// Seconds a ticket key seals for before the next one takes over.
pub const TICKET_PERIOD: u64 = 12 * 60 * 60;

impl fmt::Debug for SharedTicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedTicketKey(..)")
    }
}

struct KeyLen;

impl aws_lc_rs::hkdf::KeyType for KeyLen {
    fn len(&self) -> usize {
        32
    }
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl SharedTicketKey {
    /// From 32 bytes of key material.
    pub fn new(key: &[u8; 32]) -> Result<Self, TlsError> {
        let t = Self {
            master: *key,
            keys: parking_lot::Mutex::new(Vec::new()),
        };
        t.key_for(0)
            .ok_or_else(|| TlsError::Config("bad ticket key".into()))?;
        Ok(t)
    }

    /// The key of `period`, derived once and kept while it is recent.
    fn key_for(&self, period: u64) -> Option<Arc<LessSafeKey>> {
        let mut keys = self.keys.lock();
        if let Some((_, k)) = keys.iter().find(|(p, _)| *p == period) {
            return Some(k.clone());
        }
        let mut bytes = [0u8; 32];
        aws_lc_rs::hkdf::Salt::new(aws_lc_rs::hkdf::HKDF_SHA256, b"tether quic tickets")
            .extract(&self.master)
            .expand(&[&period.to_be_bytes()], KeyLen)
            .and_then(|okm| okm.fill(&mut bytes))
            .ok()?;
        let key = Arc::new(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, &bytes).ok()?,
        ));
        if keys.len() >= 4 {
            keys.sort_by_key(|(p, _)| std::cmp::Reverse(*p));
            keys.truncate(3);
        }
        keys.push((period, key.clone()));
        Some(key)
    }

    /// Seals `plain` with the key of the period `now` (unix seconds) is in:
    /// `period (8, big-endian) ‖ nonce ‖ sealed`, the period as AAD.
    pub fn encrypt_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let period = now / TICKET_PERIOD;
        let key = self.key_for(period)?;
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(8 + NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&period.to_be_bytes());
        out.extend_from_slice(&nonce_bytes);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce_bytes),
            Aad::from(period.to_be_bytes()),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    /// Opens a ticket sealed in this period, the one before or the next.
    pub fn decrypt_at(&self, cipher: &[u8], now: u64) -> Option<Vec<u8>> {
        if cipher.len() < 8 + NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (period, rest) = cipher.split_at(8);
        let period = u64::from_be_bytes(period.try_into().ok()?);
        let current = now / TICKET_PERIOD;
        if period + 1 < current || period > current + 1 {
            return None;
        }
        let key = self.key_for(period)?;
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = key
            .open_in_place(nonce, Aad::from(period.to_be_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

impl ProducesTickets for SharedTicketKey {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        12 * 60 * 60
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(plain, unix_secs())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, unix_secs())
    }
}

/// Counts successful ticket decryptions: each one is a resumed handshake.
#[derive(Debug)]
pub struct CountingTickets {
    pub inner: Arc<dyn ProducesTickets>,
    pub resumed: Counter,
}

impl ProducesTickets for CountingTickets {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        self.inner.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.inner.decrypt(cipher);
        if plain.is_some() {
            self.resumed.inc();
        }
        plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_keys_rotate_each_period_and_open_the_previous_periods_tickets() {
        let a = SharedTicketKey::new(&[7; 32]).expect("key");
        let b = SharedTicketKey::new(&[7; 32]).expect("key");
        let t0 = 1_000 * TICKET_PERIOD + 5;
        let sealed = a.encrypt_at(b"state", t0).expect("sealed");
        // Same period on another node, and the next period: opens.
        assert_eq!(
            b.decrypt_at(&sealed, t0 + 60).as_deref(),
            Some(&b"state"[..])
        );
        assert_eq!(
            b.decrypt_at(&sealed, t0 + TICKET_PERIOD).as_deref(),
            Some(&b"state"[..])
        );
        // Two periods on: its key is retired.
        assert!(b.decrypt_at(&sealed, t0 + 2 * TICKET_PERIOD).is_none());
        // Each period seals under its own key: a ticket relabelled with
        // another period does not open.
        let mut moved = sealed.clone();
        moved[7] ^= 1;
        assert!(b.decrypt_at(&moved, t0).is_none());
        let next = a.encrypt_at(b"state", t0 + TICKET_PERIOD).expect("sealed");
        assert_ne!(next[..8], sealed[..8]);
    }

    #[test]
    fn shared_ticket_keys_open_each_others_tickets_and_nothing_else() {
        let a = SharedTicketKey::new(&[7; 32]).expect("key");
        let b = SharedTicketKey::new(&[7; 32]).expect("key");
        let c = SharedTicketKey::new(&[8; 32]).expect("key");
        let t = a.encrypt(b"session state").expect("sealed");
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        assert_eq!(c.decrypt(&t), None);
        assert_eq!(a.decrypt(&t[..5]), None);
        let mut tampered = t.clone();
        if let Some(last) = tampered.last_mut() {
            *last ^= 1;
        }
        assert_eq!(a.decrypt(&tampered), None);
    }

    #[test]
    fn a_self_signed_identity_has_a_fingerprint() {
        let id = Identity::load_or_generate(None, None).expect("generated");
        assert!(id.self_signed);
        assert_eq!(id.fingerprint.len(), 64);
        assert_eq!(id.fingerprint, fingerprint(&id.chain[0]));
    }
}
