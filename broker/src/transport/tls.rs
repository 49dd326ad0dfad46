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
    fingerprint: RwLock<String>,
    /// The files to read again on reload; `None` for a generated identity.
    files: Option<(PathBuf, PathBuf)>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("fingerprint", &*self.fingerprint.read())
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
            fingerprint: RwLock::new(identity.fingerprint.clone()),
            files,
        })
    }

    /// The served certificate's fingerprint.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.read().clone()
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
        *self.fingerprint.write() = identity.fingerprint.clone();
        Ok(identity.fingerprint)
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

/// Session tickets sealed with AES-256-GCM under a key every node of a
/// cluster can share (`--quic-ticket-key`), so a client resumes its TLS
/// session on any node. Tickets live 12 hours.
pub struct SharedTicketKey {
    key: LessSafeKey,
}

impl fmt::Debug for SharedTicketKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedTicketKey(..)")
    }
}

impl SharedTicketKey {
    /// From 32 bytes of key material.
    pub fn new(key: &[u8; 32]) -> Result<Self, TlsError> {
        let unbound = UnboundKey::new(&AES_256_GCM, key)
            .map_err(|_| TlsError::Config("bad ticket key".into()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
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
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce_bytes);
        let mut body = plain.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::empty(),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = cipher.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut body)
            .ok()?;
        Some(plain.to_vec())
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
