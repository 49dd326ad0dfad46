//! Client authentication (PROTOCOL.md §9): JWT verification and the
//! channel permissions a token grants.

use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;
use tether_protocol::{ChannelName, UserId};

use crate::config::ClientAuth;

/// Clock leeway when checking `exp` and `nbf`, in seconds; also added to a
/// session's token deadline (one leeway everywhere).
pub const LEEWAY_SECS: u64 = 5;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a token is required")]
    Missing,
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
}

/// Why the verifier could not be built from the configuration.
#[derive(Debug, thiserror::Error)]
#[error("jwt-public-key: {0}")]
pub struct KeyError(String);

/// What an authenticated (or anonymous) user may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `None` for the anonymous user of a broker without client auth.
    pub user: Option<UserId>,
    /// Unix seconds when the token expires; `None` without client auth.
    pub expires: Option<u64>,
    /// The `channels` claim: exact names, or prefixes ending in `*`.
    pub channels: Option<Vec<String>>,
    pub may_publish: bool,
}

impl Grant {
    /// The grant of a broker without client auth: anyone, anything.
    pub fn anonymous() -> Grant {
        Grant {
            user: None,
            expires: None,
            channels: None,
            may_publish: true,
        }
    }

    /// May this user subscribe to `channel`?
    pub fn may_subscribe(&self, channel: &ChannelName) -> bool {
        let Some(user) = &self.user else {
            // Development mode: no identities, so no personal channels to guard.
            return true;
        };
        if let Some(owner) = channel.personal_user() {
            return owner == user.as_str();
        }
        match &self.channels {
            None => true,
            Some(patterns) => patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => channel.as_str().starts_with(prefix),
                None => p == channel.as_str(),
            }),
        }
    }

    /// May this user publish to `channel`?
    pub fn may_publish_to(&self, channel: &ChannelName) -> bool {
        self.may_publish && self.may_subscribe(channel)
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<bool>,
}

/// Verifies client tokens with the one algorithm the configuration allows.
#[derive(Clone)]
pub struct Verifier {
    inner: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("enabled", &self.inner.is_some())
            .finish()
    }
}

impl Verifier {
    pub fn new(auth: &ClientAuth) -> Result<Verifier, KeyError> {
        let (key, alg) = match auth {
            ClientAuth::Anonymous => return Ok(Verifier { inner: None }),
            ClientAuth::Secret(s) => (DecodingKey::from_secret(s), Algorithm::HS256),
            ClientAuth::PublicKey(pem) => {
                if let Ok(k) = DecodingKey::from_rsa_pem(pem) {
                    (k, Algorithm::RS256)
                } else if let Ok(k) = DecodingKey::from_ec_pem(pem) {
                    (k, Algorithm::ES256)
                } else {
                    return Err(KeyError(
                        "not a PEM RSA or EC (P-256) public key".to_owned(),
                    ));
                }
            }
        };
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Verifier {
            inner: Some((key, validation)),
        })
    }

    /// Also requires the `aud` claim to hold `audience` and the `iss` claim
    /// to be `issuer` (`--jwt-audience`, `--jwt-issuer`), when given.
    pub fn expecting(mut self, audience: Option<&str>, issuer: Option<&str>) -> Verifier {
        if let Some((_, v)) = &mut self.inner {
            let mut required = vec!["exp", "sub"];
            if let Some(aud) = audience {
                v.set_audience(&[aud]);
                v.validate_aud = true;
                required.push("aud");
            }
            if let Some(iss) = issuer {
                v.set_issuer(&[iss]);
                required.push("iss");
            }
            v.set_required_spec_claims(&required);
        }
        self
    }

    /// Whether client auth is configured.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Checks a `connect` or `refresh` token.
    pub fn verify(&self, token: Option<&str>) -> Result<Grant, AuthError> {
        let Some((key, validation)) = &self.inner else {
            return Ok(Grant::anonymous());
        };
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not allowed".into()),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("not valid yet (`nbf` in the future)".into())
                }
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience (`aud`)".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (`iss`)".into()),
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("missing claim `{c}`"))
                }
                _ => AuthError::Invalid("malformed token".into()),
            })?;
        let c = data.claims;
        let user = UserId::new(c.sub).map_err(|e| AuthError::Invalid(format!("sub: {e}")))?;
        Ok(Grant {
            user: Some(user),
            expires: Some(c.exp),
            channels: c.channels,
            may_publish: c.publish.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn token(alg: Algorithm, secret: &[u8], claims: serde_json::Value) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .expect("signs")
    }

    fn chan(s: &str) -> ChannelName {
        ChannelName::new(s).expect("valid")
    }

    #[test]
    fn hs256_tokens_grant_their_claims() {
        let v = Verifier::new(&ClientAuth::Secret(b"s3cret".to_vec())).expect("key");
        let t = token(
            Algorithm::HS256,
            b"s3cret",
            json!({"sub": "alice", "exp": now() + 60, "channels": ["news", "team:*"], "publish": true}),
        );
        let g = v.verify(Some(&t)).expect("valid");
        assert_eq!(g.user.as_ref().map(UserId::as_str), Some("alice"));
        assert!(g.may_subscribe(&chan("news")));
        assert!(g.may_subscribe(&chan("team:red")));
        assert!(g.may_subscribe(&chan("user:alice")));
        assert!(!g.may_subscribe(&chan("user:bob")));
        assert!(!g.may_subscribe(&chan("sports")));
        assert!(g.may_publish_to(&chan("news")));
    }

    #[test]
    fn refusals_are_typed() {
        let v = Verifier::new(&ClientAuth::Secret(b"s3cret".to_vec())).expect("key");
        assert_eq!(v.verify(None), Err(AuthError::Missing));
        let expired = token(
            Algorithm::HS256,
            b"s3cret",
            json!({"sub": "a", "exp": now() - 60}),
        );
        assert_eq!(v.verify(Some(&expired)), Err(AuthError::Expired));
        let within_leeway = token(
            Algorithm::HS256,
            b"s3cret",
            json!({"sub": "a", "exp": now() - 2}),
        );
        assert!(v.verify(Some(&within_leeway)).is_ok());
        let forged = token(
            Algorithm::HS256,
            b"other",
            json!({"sub": "a", "exp": now() + 60}),
        );
        assert!(matches!(
            v.verify(Some(&forged)),
            Err(AuthError::Invalid(_))
        ));
        let other_alg = token(
            Algorithm::HS512,
            b"s3cret",
            json!({"sub": "a", "exp": now() + 60}),
        );
        assert!(matches!(
            v.verify(Some(&other_alg)),
            Err(AuthError::Invalid(_))
        ));
        let no_exp = token(Algorithm::HS256, b"s3cret", json!({"sub": "a"}));
        assert!(matches!(
            v.verify(Some(&no_exp)),
            Err(AuthError::Invalid(_))
        ));
        let bad_sub = token(
            Algorithm::HS256,
            b"s3cret",
            json!({"sub": "a b", "exp": now() + 60}),
        );
        assert!(matches!(
            v.verify(Some(&bad_sub)),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.verify(Some("garbage")),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn without_the_publish_claim_clients_may_not_publish() {
        let v = Verifier::new(&ClientAuth::Secret(b"k".to_vec())).expect("key");
        let t = token(
            Algorithm::HS256,
            b"k",
            json!({"sub": "a", "exp": now() + 60}),
        );
        let g = v.verify(Some(&t)).expect("valid");
        assert!(g.may_subscribe(&chan("anything")));
        assert!(!g.may_publish_to(&chan("anything")));
    }

    #[test]
    fn anonymous_without_auth() {
        let v = Verifier::new(&ClientAuth::Anonymous).expect("no key");
        let g = v.verify(None).expect("anonymous");
        assert!(g.user.is_none());
        assert!(g.may_publish_to(&chan("anything")));
    }
}
