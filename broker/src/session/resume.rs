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

/// One subscription as a resumed session needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubRecord {
    pub channel: tether_protocol::ChannelName,
    pub epoch: tether_protocol::Epoch,
    /// Last offset written to the old connection.
    pub delivered: tether_protocol::Offset,
    /// Last offset the client acked, if it ever acked this channel.
    pub acked: Option<tether_protocol::Offset>,
}

/// What a session leaves behind when its connection ends.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SessionRecord {
    pub subs: Vec<SubRecord>,
}

/// Why a resume attempt gives a fresh session instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a token of ours (forged, damaged, or signed by another key).
    Invalid,
    /// A token of another user.
    OtherUser,
    /// Unknown session, or its resume window has passed.
    Expired,
    /// The token was already used (a newer one has been issued since).
    Used,
    /// The live session did not hand over in time.
    TakeoverFailed,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Invalid => "invalid",
            Refusal::OtherUser => "other_user",
            Refusal::Expired => "expired",
            Refusal::Used => "used",
            Refusal::TakeoverFailed => "takeover_failed",
        }
    }
}

/// The outcome of claiming a session with a valid token.
#[derive(Debug)]
pub enum Claim {
    /// The session was detached: here is what it left.
    Ready(SessionRecord),
    /// The session is still connected: it has been told to close (4000) and
    /// will hand its record over through this receiver.
    TakeOver(tokio::sync::oneshot::Receiver<SessionRecord>),
    Refused(Refusal),
}

#[derive(Debug)]
enum Entry {
    Live {
        conn_id: u64,
        nonce: u64,
        outbox: std::sync::Arc<crate::outbox::Outbox>,
        takeover: Option<tokio::sync::oneshot::Sender<SessionRecord>>,
    },
    Detached {
        nonce: u64,
        record: SessionRecord,
        expires: std::time::Instant,
    },
}

/// Sessions that can be resumed on this node: live ones (for takeover) and
/// detached ones within their resume window. The in-memory implementation
/// of a single node; a cluster keeps the same records in Redis.
#[derive(Debug, Default)]
pub struct ResumeRegistry {
    map: parking_lot::Mutex<std::collections::HashMap<String, Entry>>,
}

impl ResumeRegistry {
    /// Records a live session and the nonce of the token it was just given.
    pub fn register_live(
        &self,
        session: &str,
        conn_id: u64,
        nonce: u64,
        outbox: std::sync::Arc<crate::outbox::Outbox>,
    ) {
        self.map.lock().insert(
            session.to_owned(),
            Entry::Live {
                conn_id,
                nonce,
                outbox,
                takeover: None,
            },
        );
    }

    /// Claims the session a valid token names, for `user`. A refused claim
    /// changes nothing: the token stays usable by its owner.
    pub fn claim(&self, claims: &ResumeClaims, user: &str) -> Claim {
        if claims.user != user {
            return Claim::Refused(Refusal::OtherUser);
        }
        let mut map = self.map.lock();
        let Some(entry) = map.get_mut(&claims.session) else {
            return Claim::Refused(Refusal::Expired);
        };
        match entry {
            Entry::Detached { nonce, expires, .. } => {
                if *nonce != claims.nonce {
                    return Claim::Refused(Refusal::Used);
                }
                if std::time::Instant::now() > *expires {
                    map.remove(&claims.session);
                    return Claim::Refused(Refusal::Expired);
                }
                match map.remove(&claims.session) {
                    Some(Entry::Detached { record, .. }) => Claim::Ready(record),
                    _ => Claim::Refused(Refusal::Expired),
                }
            }
            Entry::Live {
                nonce,
                outbox,
                takeover,
                ..
            } => {
                if *nonce != claims.nonce || takeover.is_some() {
                    return Claim::Refused(Refusal::Used);
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                *takeover = Some(tx);
                outbox.close(tether_protocol::CloseCode::Normal);
                Claim::TakeOver(rx)
            }
        }
    }

    /// Called when a session's connection ends: hands the record to a
    /// session taking it over, or keeps it for `window`.
    pub fn detach(
        &self,
        session: &str,
        conn_id: u64,
        record: SessionRecord,
        window: std::time::Duration,
    ) {
        let mut map = self.map.lock();
        let Some(Entry::Live { conn_id: live, .. }) = map.get(session) else {
            return;
        };
        if *live != conn_id {
            // Already taken over and registered by a newer connection.
            return;
        }
        match map.remove(session) {
            Some(Entry::Live {
                takeover: Some(tx), ..
            }) => {
                let _ = tx.send(record);
            }
            Some(Entry::Live { nonce, .. }) => {
                map.insert(
                    session.to_owned(),
                    Entry::Detached {
                        nonce,
                        record,
                        expires: std::time::Instant::now() + window,
                    },
                );
            }
            _ => {}
        }
    }

    /// Forgets detached sessions whose window has passed.
    pub fn sweep(&self) {
        let now = std::time::Instant::now();
        self.map
            .lock()
            .retain(|_, e| !matches!(e, Entry::Detached { expires, .. } if *expires < now));
    }

    /// Number of detached (resumable) sessions.
    pub fn detached(&self) -> usize {
        self.map
            .lock()
            .values()
            .filter(|e| matches!(e, Entry::Detached { .. }))
            .count()
    }
}

#[cfg(test)]
mod registry_tests {
    use super::*;
    use crate::outbox::Outbox;
    use std::time::Duration;

    fn claims(nonce: u64, user: &str) -> ResumeClaims {
        ResumeClaims {
            session: "s".into(),
            user: user.into(),
            nonce,
        }
    }

    #[test]
    fn a_detached_session_is_claimed_once_within_its_window() {
        let r = ResumeRegistry::default();
        r.register_live("s", 1, 42, Outbox::new(1000, 10));
        r.detach("s", 1, SessionRecord::default(), Duration::from_secs(60));
        assert!(matches!(
            r.claim(&claims(42, "bob"), "alice"),
            Claim::Refused(Refusal::OtherUser)
        ));
        assert!(matches!(
            r.claim(&claims(41, "alice"), "alice"),
            Claim::Refused(Refusal::Used)
        ));
        assert!(matches!(
            r.claim(&claims(42, "alice"), "alice"),
            Claim::Ready(_)
        ));
        assert!(matches!(
            r.claim(&claims(42, "alice"), "alice"),
            Claim::Refused(Refusal::Expired)
        ));
    }

    #[test]
    fn after_the_window_the_session_is_gone() {
        let r = ResumeRegistry::default();
        r.register_live("s", 1, 1, Outbox::new(1000, 10));
        r.detach("s", 1, SessionRecord::default(), Duration::ZERO);
        std::thread::sleep(Duration::from_millis(2));
        assert!(matches!(
            r.claim(&claims(1, ""), ""),
            Claim::Refused(Refusal::Expired)
        ));
    }

    #[test]
    fn a_live_session_is_taken_over_and_hands_its_record_over() {
        let r = ResumeRegistry::default();
        let old = Outbox::new(1000, 10);
        r.register_live("s", 1, 7, old.clone());
        let Claim::TakeOver(mut rx) = r.claim(&claims(7, "u"), "u") else {
            panic!("expected takeover")
        };
        assert!(old.is_closed());
        // A second claim with the same token while the first is pending is refused.
        assert!(matches!(
            r.claim(&claims(7, "u"), "u"),
            Claim::Refused(Refusal::Used)
        ));
        r.detach("s", 1, SessionRecord::default(), Duration::from_secs(60));
        assert_eq!(rx.try_recv().ok(), Some(SessionRecord::default()));
        assert_eq!(r.detached(), 0);
    }
}
