//! Resume tokens: opaque, HMAC-signed names of a session and its user.
//!
//! A token is `base64url(payload) "." base64url(HMAC-SHA256(payload))`, with
//! the payload `{session, user, nonce}`. The signing key is
//! `--resume-secret` (shared by the nodes of a cluster) or a random key per
//! start. A new nonce in every `connected` makes a used token detectable.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a valid resume token names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeClaims {
    #[serde(rename = "s")]
    pub session: String,
    /// The user id; empty for the anonymous user.
    #[serde(rename = "u")]
    pub user: String,
    #[serde(rename = "n")]
    pub nonce: u64,
}

/// The signing key of resume tokens.
#[derive(Clone)]
pub struct ResumeKeys {
    key: Vec<u8>,
}

impl std::fmt::Debug for ResumeKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResumeKeys(..)")
    }
}

impl ResumeKeys {
    pub fn new(secret: Option<Vec<u8>>) -> Self {
        let key = secret.unwrap_or_else(|| rand::random::<[u8; 32]>().to_vec());
        Self { key }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes keys of any length.
        match HmacSha256::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts keys of any length"),
        }
    }

    pub fn sign(&self, claims: &ResumeClaims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let mut mac = self.mac();
        mac.update(&payload);
        let sig = mac.finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(sig)
        )
    }

    /// The claims of a token signed with this key; `None` for anything else.
    pub fn verify(&self, token: &str) -> Option<ResumeClaims> {
        let (payload, sig) = token.split_once('.')?;
        let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let mut mac = self.mac();
        mac.update(&payload);
        mac.verify_slice(&sig).ok()?;
        serde_json::from_slice(&payload).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_with_their_key_and_intact() {
        let k = ResumeKeys::new(Some(b"0123456789abcdef".to_vec()));
        let c = ResumeClaims {
            session: "s1".into(),
            user: "alice".into(),
            nonce: 7,
        };
        let t = k.sign(&c);
        assert_eq!(k.verify(&t), Some(c.clone()));
        let other = ResumeKeys::new(Some(b"fedcba9876543210".to_vec()));
        assert_eq!(other.verify(&t), None);
        let mut forged = t.clone();
        forged.replace_range(0..1, if t.starts_with('A') { "B" } else { "A" });
        assert_eq!(k.verify(&forged), None);
        assert_eq!(k.verify("garbage"), None);
        assert_eq!(k.verify(""), None);
    }
}
