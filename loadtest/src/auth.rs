//! Who the simulated users are: the client tokens `loadtest` mints for
//! them (`--jwt-secret` or `--jwt-key`), one per simulated user
//! `loadtest-<i>`, for a broker with client auth configured (PROTOCOL.md
//! §9). The API key (`--api-key`) goes with every API request
//! ([`crate::publisher::api_client`]).

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::publisher::unix_micros;

/// How long a token minted for a fleet scenario (idle, fanout,
/// connect-rate, resume) stays valid: longer than any such run (a session
/// whose token expires is closed with 4011). `churn` mints for its own
/// duration plus an hour.
pub const FLEET_TOKEN_LIFE: Duration = Duration::from_secs(24 * 3600);

/// How client tokens are signed: a shared secret (HS256) or a private key
/// (RS256 or ES256, PEM) whose public half the broker has.
#[derive(Clone)]
pub struct Signer {
    key: jsonwebtoken::EncodingKey,
    alg: jsonwebtoken::Algorithm,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

impl Signer {
    pub fn secret(secret: &str) -> Signer {
        Signer {
            key: jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
            alg: jsonwebtoken::Algorithm::HS256,
        }
    }

    /// A PEM private key: `es256` (EC P-256) or `rs256` (RSA). Checked by
    /// signing one token now, so that a wrong key fails before the run.
    pub fn key(pem: &[u8], alg: &str) -> Result<Signer> {
        let (key, alg) = match alg {
            "es256" => (
                jsonwebtoken::EncodingKey::from_ec_pem(pem)
                    .context("--jwt-key is not an EC PEM key")?,
                jsonwebtoken::Algorithm::ES256,
            ),
            "rs256" => (
                jsonwebtoken::EncodingKey::from_rsa_pem(pem)
                    .context("--jwt-key is not an RSA PEM key")?,
                jsonwebtoken::Algorithm::RS256,
            ),
            other => bail!("--jwt-alg {other}: es256 or rs256"),
        };
        let s = Signer { key, alg };
        s.mint(0, Duration::from_secs(60))
            .context("--jwt-key cannot sign with --jwt-alg")?;
        Ok(s)
    }

    /// A token for simulated user `i`, valid for `valid`.
    pub fn mint(&self, i: usize, valid: Duration) -> Result<String> {
        let exp = unix_micros() / 1_000_000 + valid.as_secs();
        let claims = json!({"sub": format!("loadtest-{i}"), "exp": exp});
        jsonwebtoken::encode(&jsonwebtoken::Header::new(self.alg), &claims, &self.key)
            .context("minting a client token")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_names_its_user_and_expires() {
        let s = Signer::secret("lt-secret-0123456789abcdef-0123456789");
        let t = s.mint(7, Duration::from_secs(60)).expect("token");
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"lt-secret-0123456789abcdef-0123456789"),
            &v,
        )
        .expect("valid")
        .claims;
        assert_eq!(claims["sub"], "loadtest-7");
        let exp = claims["exp"].as_u64().expect("exp");
        let now = unix_micros() / 1_000_000;
        assert!((now + 55..=now + 65).contains(&exp), "{exp} vs {now}");
        assert!(Signer::key(b"not a key", "es256").is_err());
        assert!(Signer::key(b"", "hs512").is_err());
    }
}
