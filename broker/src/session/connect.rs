//! `connect`: the token and the grant it gives, the device, and a resume —
//! claiming the old session (taking it over from whichever node holds it,
//! if it is still connected) and restoring its subscriptions with their
//! replays behind the `connected` reply.

use std::collections::BTreeMap;

use tether_protocol::codec::encode_server;
use tether_protocol::{
    ChannelName, ChannelRecovery, CloseCode, Connected, Offset, ServerMessage, StreamPosition,
    Unsubscribed,
};
use tokio::time::Instant;
use tracing::debug;

use super::token::ResumeClaims;
use super::{End, Phase, Session, TAKEOVER_WAIT, deadline_after, deadline_at_unix};
use crate::auth::AuthError;
use crate::cluster::{Claim, ControlMessage, LiveSession, Refusal, SessionRecord};
use crate::hub::SubscribeError;
use crate::metrics::OutcomeLabel;
use crate::outbox::Frame;

impl Session {
    pub(super) async fn on_connect(&mut self, c: tether_protocol::Connect) -> Result<(), End> {
        let grant = match self.shared.verifier.verify(c.token.as_deref()) {
            Ok(g) => g,
            Err(AuthError::Expired) => return Err(End::Close(CloseCode::TokenExpired, None)),
            Err(e) => {
                debug!(error = %e, "connect refused");
                return Err(End::Close(CloseCode::Unauthorized, None));
            }
        };
        let user = grant
            .user
            .as_ref()
            .map(|u| u.as_str().to_owned())
            .unwrap_or_default();
        tracing::Span::current().record("user", user.as_str());
        self.token_deadline = grant.expires.map(deadline_at_unix);
        self.grant = Some(grant);
        self.device = match c.device.as_deref() {
            Some(d) if tether_push_gateway::validate::validate_device_id(d).is_ok() => {
                Some(d.to_owned())
            }
            Some(_) => {
                debug!("connect.device is not a valid device id: ignored");
                None
            }
            None => None,
        };

        let mut restored: Option<(String, SessionRecord)> = None;
        if let Some(resume) = &c.resume {
            let outcome = self.claim(&resume.token, &user).await;
            let label = match &outcome {
                Ok(_) => "resumed",
                Err(r) => r.as_str(),
            };
            self.shared
                .metrics
                .resumes
                .get_or_create(&OutcomeLabel { outcome: label })
                .inc();
            match outcome {
                Ok(r) => restored = Some(r),
                Err(r) => debug!(reason = r.as_str(), "resume refused: fresh session"),
            }
        }

        let resumed = restored.is_some();
        let (session_id, record) = match restored {
            Some((id, record)) => (id, Some(record)),
            None => (
                format!("{:016x}{:08x}", rand::random::<u64>(), self.conn_id as u32),
                None,
            ),
        };
        self.session_id = session_id;
        let nonce = rand::random::<u64>();
        let resume_token = self.shared.keys.sign(&ResumeClaims {
            session: self.session_id.clone(),
            user,
            nonce,
        });
        let live = LiveSession {
            node: self.shared.config.node_id.clone(),
            conn_id: self.conn_id,
        };
        if let Err(e) = self
            .shared
            .resumes
            .register_live(&self.session_id, live, nonce)
            .await
        {
            debug!(error = %e, "session not registered: its token will not resume it");
        }
        let hb = self.shared.config.heartbeat;
        let now = Instant::now();
        // The first ping lands somewhere in the second half of the period, so
        // that a wave of reconnects does not ping in step.
        self.next_ping = deadline_after(now, hb.mul_f64(0.5 + rand::random::<f64>() * 0.5));
        self.phase = Phase::Active;

        // Replays are queued behind the `connected` pushed in front of them
        // below: nothing may be written through meanwhile.
        self.outbox.hold();
        let mut ended = Vec::new();
        let channels = match record {
            Some(r) => {
                let named = c.resume.as_ref().and_then(|r| r.channels.as_ref());
                Some(self.restore(r, named, &mut ended).await)
            }
            None => None,
        };
        let connected = ServerMessage::Connected(Connected {
            id: c.id,
            session: self.session_id.clone(),
            resume_token,
            heartbeat: hb.as_secs(),
            resumed,
            channels,
            node: self.shared.config.node_id.clone(),
        });
        let _ = self
            .outbox
            .push_front(Frame::reply(encode_server(&connected, self.encoding)));
        // Subscriptions that could not be restored (the broker was out of
        // reach): the client hears that they ended, and may subscribe again.
        for (channel, reason) in ended {
            self.reply(&ServerMessage::Unsubscribed(Unsubscribed {
                id: None,
                channel,
                reason: Some(reason),
            }));
        }
        debug!(session = %self.session_id, resumed, "connected");
        self.snapshot();
        Ok(())
    }

    /// Claims the session a resume token names, for `user`: a detached one
    /// at once, a live one by taking it over. A refusal leaves the token as
    /// it was.
    async fn claim(&self, token: &str, user: &str) -> Result<(String, SessionRecord), Refusal> {
        let claims = self.shared.keys.verify(token).ok_or(Refusal::Invalid)?;
        if claims.user != user {
            return Err(Refusal::OtherUser);
        }
        let resumes = &self.shared.resumes;
        let claim = resumes
            .claim(&claims.session, claims.nonce)
            .await
            .map_err(|_| Refusal::Unavailable)?;
        let at = match claim {
            Claim::Ready(record) => return Ok((claims.session, record)),
            Claim::Refused(r) => return Err(r),
            Claim::Live(at) => at,
        };
        let told = self
            .shared
            .bus
            .send(
                &at.node,
                ControlMessage::TakeOver {
                    conn_id: at.conn_id,
                },
            )
            .await;
        // Not told: withdraw the claim at once (a zero wait).
        let wait = if told.is_ok() {
            TAKEOVER_WAIT
        } else {
            std::time::Duration::ZERO
        };
        match resumes
            .await_handoff(&claims.session, claims.nonce, wait)
            .await
        {
            Ok(Some(record)) => Ok((claims.session, record)),
            _ => Err(Refusal::TakeoverFailed),
        }
    }

    /// Re-subscribes the channels of a resumed session, replaying what the
    /// client missed on each; returns the per-channel outcome for
    /// `connected`. Channels that cannot be restored now go to `ended`.
    async fn restore(
        &mut self,
        record: SessionRecord,
        named: Option<&BTreeMap<ChannelName, Offset>>,
        ended: &mut Vec<(ChannelName, String)>,
    ) -> BTreeMap<ChannelName, ChannelRecovery> {
        let mut out = BTreeMap::new();
        for sub in record.subs {
            if !self.grant().may_subscribe(&sub.channel) {
                continue;
            }
            let after = named
                .and_then(|m| m.get(&sub.channel).copied())
                .or(sub.acked)
                .unwrap_or(sub.delivered);
            let since = StreamPosition {
                epoch: sub.epoch,
                offset: after,
            };
            match self
                .join(sub.channel.clone(), Some(&since), sub.acked, |_, _| None)
                .await
            {
                Ok(result) => {
                    out.insert(
                        sub.channel,
                        ChannelRecovery {
                            epoch: result.position.epoch,
                            offset: result.position.offset,
                            recovered: result.recovered,
                        },
                    );
                }
                // The outbox overflowed: the session is closing as slow.
                Err(SubscribeError::Outbox(_)) => break,
                Err(SubscribeError::Broker(e)) => {
                    debug!(channel = %sub.channel, error = %e, "cannot restore a subscription");
                    ended.push((sub.channel, e.code().as_str().to_owned()));
                }
            }
        }
        out
    }
}
