//! RFC 8292 VAPID: the application server's P-256 key and the short-lived
//! ES256 JWT that identifies it to a push service
//! (`Authorization: vapid t=<jwt>, k=<public key>`).
//!
//! A JWT is signed per push-service origin (its `aud`) and reused until an
//! hour before it expires, so signing is not on the per-push path.

use std::collections::HashMap;
use std::time::Duration;

use aws_lc_rs::agreement::{ECDH_P256, PrivateKey};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use parking_lot::Mutex;
use reqwest::header::HeaderValue;

use crate::types::unix_now;

/// How long a VAPID JWT is valid (RFC 8292 §2: at most 24 hours).
pub const JWT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A JWT is replaced once less than this is left of it.
const RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// Push-service origins whose JWT is kept; past that the cache starts over
/// (browsers use a handful of push services).
const MAX_AUDIENCES: usize = 256;

/// Why a VAPID key cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VapidError {
    #[error(
        "not a P-256 private key: expected a PEM file (`PRIVATE KEY` or `EC PRIVATE KEY`) or the 32-byte key in base64url"
    )]
    BadKey,
    #[error("the subject must be a mailto: or https: URL, got {0:?}")]
    BadSubject(String),
    #[error("cannot sign the VAPID token")]
    Signing,
}

/// The application server's identity: its key and contact (`sub`).
pub struct Vapid {
    key: EcdsaKeyPair,
    /// `k=` of the header: the public key, uncompressed, base64url.
    public_b64: String,
    subject: String,
    rng: SystemRandom,
    cache: Mutex<HashMap<String, (HeaderValue, u64)>>,
}

impl std::fmt::Debug for Vapid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vapid")
            .field("public_key", &self.public_b64)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl Vapid {
    /// The key from the bytes of `--vapid-private-key` (PKCS#8 or SEC 1 PEM,
    /// as `openssl` writes them, or the base64url private key that
    /// `web-push generate-vapid-keys` prints) and the `--vapid-subject`.
    pub fn new(key_file: &[u8], subject: &str) -> Result<Self, VapidError> {
        if !(subject.starts_with("mailto:") || subject.starts_with("https:")) {
            return Err(VapidError::BadSubject(subject.to_owned()));
        }
        let key = parse_key(key_file)?;
        let public_b64 = URL_SAFE_NO_PAD.encode(key.public_key().as_ref());
        Ok(Self {
            key,
            public_b64,
            subject: subject.to_owned(),
            rng: SystemRandom::new(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The public key, base64url (the `applicationServerKey` a web app
    /// subscribes with).
    pub fn public_key(&self) -> &str {
        &self.public_b64
    }

    /// The `Authorization` header for a push service at `audience` (the
    /// endpoint's origin, `https://host[:port]`).
    pub fn authorization(&self, audience: &str) -> Result<HeaderValue, VapidError> {
        let now = unix_now();
        let mut cache = self.cache.lock();
        if let Some((header, exp)) = cache.get(audience)
            && now + RENEW_BEFORE.as_secs() < *exp
        {
            return Ok(header.clone());
        }
        let exp = now + JWT_LIFETIME.as_secs();
        let jwt = self.sign(audience, exp)?;
        let mut header = HeaderValue::try_from(format!("vapid t={jwt}, k={}", self.public_b64))
            .map_err(|_| VapidError::Signing)?;
        header.set_sensitive(true);
        if cache.len() >= MAX_AUDIENCES {
            cache.clear();
        }
        cache.insert(audience.to_owned(), (header.clone(), exp));
        Ok(header)
    }

    /// A JWT `{"typ":"JWT","alg":"ES256"}.{"aud","exp","sub"}` signed with
    /// the key (ES256: the 64-byte r‖s signature).
    pub fn sign(&self, audience: &str, exp: u64) -> Result<String, VapidError> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"ES256"}"#);
        let claims = serde_json::json!({ "aud": audience, "exp": exp, "sub": self.subject });
        let claims = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{header}.{claims}");
        let sig = self
            .key
            .sign(&self.rng, input.as_bytes())
            .map_err(|_| VapidError::Signing)?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

/// The DER inside a PEM file's first block, and its label.
fn pem_block(text: &str) -> Option<(&str, Vec<u8>)> {
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + 11..];
    let label_end = rest.find("-----")?;
    let label = &rest[..label_end];
    let body = &rest[label_end + 5..];
    let end = body.find("-----END ")?;
    let b64: String = body[..end].split_whitespace().collect();
    Some((label, STANDARD.decode(b64).ok()?))
}

fn parse_key(file: &[u8]) -> Result<EcdsaKeyPair, VapidError> {
    let text = std::str::from_utf8(file).map_err(|_| VapidError::BadKey)?;
    let alg = &ECDSA_P256_SHA256_FIXED_SIGNING;
    if let Some((label, der)) = pem_block(text) {
        return match label {
            "PRIVATE KEY" | "EC PRIVATE KEY" => {
                EcdsaKeyPair::from_private_key_der(alg, &der).map_err(|_| VapidError::BadKey)
            }
            _ => Err(VapidError::BadKey),
        };
    }
    let raw = URL_SAFE_NO_PAD
        .decode(text.trim().trim_end_matches('='))
        .map_err(|_| VapidError::BadKey)?;
    let private = PrivateKey::from_private_key(&ECDH_P256, &raw).map_err(|_| VapidError::BadKey)?;
    let public = private
        .compute_public_key()
        .map_err(|_| VapidError::BadKey)?;
    EcdsaKeyPair::from_private_key_and_public_key(alg, &raw, public.as_ref())
        .map_err(|_| VapidError::BadKey)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

    use super::*;

    /// The RFC 8291 example's application-server key, as base64url.
    const RAW: &str = "yfWPiYE-n46HLnH0KqZOF1fJJU3MYrct3AELtAQ-oRw";
    const PUBLIC: &str =
        "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";

    #[test]
    fn a_raw_key_signs_a_token_its_public_key_verifies() {
        let v = Vapid::new(RAW.as_bytes(), "mailto:ops@example.com").unwrap();
        assert_eq!(v.public_key(), PUBLIC);
        let jwt = v.sign("https://push.example.net", 1_900_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header, serde_json::json!({"typ": "JWT", "alg": "ES256"}));
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(
            claims,
            serde_json::json!({"aud": "https://push.example.net", "exp": 1_900_000_000u64,
                               "sub": "mailto:ops@example.com"})
        );
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(sig.len(), 64);
        UnparsedPublicKey::new(
            &ECDSA_P256_SHA256_FIXED,
            URL_SAFE_NO_PAD.decode(PUBLIC).unwrap(),
        )
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .unwrap();
    }

    #[test]
    fn the_header_is_reused_per_audience() {
        let v = Vapid::new(RAW.as_bytes(), "https://example.com/contact").unwrap();
        let a = v.authorization("https://a.example").unwrap();
        assert_eq!(v.authorization("https://a.example").unwrap(), a);
        let b = v.authorization("https://b.example").unwrap();
        assert_ne!(a, b);
        let text = a.to_str().unwrap();
        assert!(text.starts_with("vapid t="), "{text}");
        assert!(text.ends_with(&format!(", k={PUBLIC}")), "{text}");
    }

    fn pem(label: &str, der: &[u8]) -> String {
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            STANDARD.encode(der)
        )
    }

    #[test]
    fn pkcs8_and_sec1_pem_files_are_read() {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let from_pkcs8 = Vapid::new(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes(), "mailto:a@b");
        assert_eq!(from_pkcs8.unwrap().public_key().len(), 87);
        let sec1 = PrivateKey::generate(&ECDH_P256).unwrap();
        let public = URL_SAFE_NO_PAD.encode(sec1.compute_public_key().unwrap().as_ref());
        let der: aws_lc_rs::encoding::EcPrivateKeyRfc5915Der<'_> =
            aws_lc_rs::encoding::AsDer::as_der(&sec1).unwrap();
        let from_sec1 = Vapid::new(pem("EC PRIVATE KEY", der.as_ref()).as_bytes(), "mailto:a@b");
        assert_eq!(from_sec1.unwrap().public_key(), public);
    }

    #[test]
    fn bad_keys_and_subjects_are_refused() {
        assert_eq!(
            Vapid::new(RAW.as_bytes(), "ops@example.com").unwrap_err(),
            VapidError::BadSubject("ops@example.com".into())
        );
        for bad in [
            "",
            "not base64 !",
            "AAAA",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        ] {
            assert_eq!(
                Vapid::new(bad.as_bytes(), "mailto:a@b").unwrap_err(),
                VapidError::BadKey,
                "{bad:?}"
            );
        }
    }
}
