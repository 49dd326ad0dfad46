//! The messages of a session: decoding each frame (with the rate limit and
//! the size and shape checks of §2–3), and what an active session does with
//! `subscribe`, `unsubscribe`, `publish`, `ack`, `refresh` and `ping`.

use tether_protocol::codec::{decode_client, encode_server};
use tether_protocol::{
    ChannelName, ClientMessage, CloseCode, DecodeError, ErrorCode, Offset, Published, Refreshed,
    ServerMessage, StreamPosition, Subscribed, Unsubscribed,
};
use tokio::time::Instant;
use tracing::{debug, trace};

use super::{End, Phase, Session, deadline_at_unix};
use crate::auth::Grant;
use crate::cluster::{Position, PresenceKey, Publish};
use crate::hub::{SubscribeError, Subscriber, Subscription, SubscriptionId};
use crate::metrics::{RecoveredLabel, SourceLabel};
use crate::outbox::Frame;

impl Session {
    pub(super) async fn handle_frame(&mut self, bytes: &[u8]) -> Result<(), End> {
        let now = Instant::now();
        self.sync_written();
        self.messages_in.inc();
        if let Err(retry_after_ms) = self.rate.take(now) {
            return Err(End::Close(CloseCode::RateLimited, Some(retry_after_ms)));
        }
        let max = self.shared.config.max_message_size;
        let msg = match decode_client(bytes, self.encoding, max) {
            Ok(m) => m,
            Err(e) if e.is_fatal() => {
                debug!(error = %e, "undecodable message");
                return Err(End::Close(e.close_code(), None));
            }
            Err(e) => {
                if matches!(self.phase, Phase::Handshake { .. }) {
                    debug!(error = %e, "bad message before connect");
                    return Err(End::Close(CloseCode::ProtocolError, None));
                }
                trace!(error = %e, "bad request");
                let id = e.id();
                let message = match e {
                    DecodeError::UnknownType { kind, .. } => {
                        format!("unknown message type {kind:?}")
                    }
                    other => other.to_string(),
                };
                self.error(id, ErrorCode::BadRequest, message);
                return Ok(());
            }
        };
        trace!(kind = msg.kind(), "message");
        match self.phase {
            Phase::Handshake { .. } => match msg {
                ClientMessage::Connect(c) => self.on_connect(c).await,
                _ => {
                    debug!(kind = msg.kind(), "message before connect");
                    Err(End::Close(CloseCode::ProtocolError, None))
                }
            },
            Phase::Active => {
                self.on_message(msg, bytes).await;
                Ok(())
            }
        }
    }

    async fn on_message(&mut self, msg: ClientMessage, bytes: &[u8]) {
        match msg {
            ClientMessage::Connect(c) => {
                self.error(Some(c.id), ErrorCode::BadRequest, "already connected");
            }
            ClientMessage::Subscribe(sub) => self.on_subscribe(sub).await,
            ClientMessage::Unsubscribe(u) => {
                self.end_subscription(&u.channel);
                self.snapshot();
                self.reply(&ServerMessage::Unsubscribed(Unsubscribed {
                    id: Some(u.id),
                    channel: u.channel,
                    reason: None,
                }));
            }
            ClientMessage::Publish(p) => self.on_publish(p, bytes).await,
            ClientMessage::Ack(a) => {
                if let Some(acked) = self.subs.ack(&a.channel, a.offset)
                    && self.personal.contains(&a.channel)
                    && let Some(device) = &self.device
                {
                    self.shared.presence.ack(
                        PresenceKey {
                            device,
                            channel: &a.channel,
                            conn_id: self.conn_id,
                        },
                        acked,
                    );
                }
            }
            ClientMessage::Refresh(r) => self.on_refresh(r),
            ClientMessage::Ping => self.reply(&ServerMessage::Pong),
            ClientMessage::Pong => {}
        }
    }

    /// Leaves `channel` in the hub and presence, if subscribed.
    pub(super) fn end_subscription(&mut self, channel: &ChannelName) {
        let Some(n) = self.subs.remove(channel) else {
            return;
        };
        self.untrack_presence(channel);
        self.shared.hub.unsubscribe(
            channel,
            SubscriptionId {
                session: self.conn_id,
                sub: n,
            },
        );
    }

    async fn on_subscribe(&mut self, sub: tether_protocol::Subscribe) {
        if let Err(retry_after_ms) = self.subscribe_rate.take(Instant::now()) {
            let rate = self.subscribe_rate.rate();
            self.error(
                Some(sub.id),
                ErrorCode::RateLimited,
                format!(
                    "more than {rate} subscribes/s (bursts of {}); retry in {retry_after_ms} ms",
                    2 * rate
                ),
            );
            return;
        }
        let max = self.shared.config.max_subscriptions;
        if self.subs.len() >= max {
            self.error(
                Some(sub.id),
                ErrorCode::BadRequest,
                format!("at most {max} subscriptions per session"),
            );
            return;
        }
        if self.subs.contains(&sub.channel) {
            self.error(
                Some(sub.id),
                ErrorCode::BadRequest,
                "already subscribed to this channel",
            );
            return;
        }
        if !self.grant().may_subscribe(&sub.channel) {
            self.error(
                Some(sub.id),
                ErrorCode::Forbidden,
                "not allowed to subscribe to this channel",
            );
            return;
        }
        let encoding = self.encoding;
        let id = sub.id;
        let channel = sub.channel.clone();
        let reply = |pos: &Position, recovered: bool| {
            Some(Frame::reply(encode_server(
                &ServerMessage::Subscribed(Subscribed {
                    id,
                    channel: channel.clone(),
                    epoch: pos.epoch.clone(),
                    offset: pos.offset,
                    recovered,
                }),
                encoding,
            )))
        };
        match self
            .join(sub.channel, sub.since.as_ref(), None, reply)
            .await
        {
            Ok(_) => self.snapshot(),
            Err(SubscribeError::Outbox(_)) => {
                // An outbox that overflowed closes the session as slow.
            }
            Err(SubscribeError::Broker(e)) => self.error(Some(id), e.code(), e.to_string()),
        }
    }

    /// Subscribes to `channel` from `since` (a `subscribe`, or a resume's
    /// restore with what the client `acked` before): the hub, this
    /// session's table, presence for a personal channel, the recovery
    /// metrics. `reply` builds the `subscribed` frame, if any.
    pub(super) async fn join(
        &mut self,
        channel: ChannelName,
        since: Option<&StreamPosition>,
        acked: Option<Offset>,
        reply: impl Fn(&Position, bool) -> Option<Frame>,
    ) -> Result<Subscription, SubscribeError> {
        let n = self.subs.next_number();
        let subscriber = Subscriber {
            id: SubscriptionId {
                session: self.conn_id,
                sub: n,
            },
            outbox: self.outbox.clone(),
            encoding: self.encoding,
        };
        let result = self
            .shared
            .hub
            .subscribe(&channel, subscriber, since, reply)
            .await?;
        if since.is_some() {
            let m = &self.shared.metrics;
            m.recoveries
                .get_or_create(&RecoveredLabel {
                    recovered: if result.recovered { "true" } else { "false" },
                })
                .inc();
            m.replayed.inc_by(result.replayed as u64);
        }
        let acked = self
            .subs
            .joined(n, channel.clone(), &result, since.map(|s| s.offset), acked);
        self.track_presence(&channel, acked);
        Ok(result)
    }

    /// `frame` is the message as it came: a JSON client's `data` is kept as
    /// its text (compacted), so that a JSON subscriber gets its numbers
    /// digit for digit, as from the HTTP API.
    async fn on_publish(&mut self, p: tether_protocol::Publish, frame: &[u8]) {
        if !self.grant().may_publish_to(&p.channel) {
            self.error(
                Some(p.id),
                ErrorCode::Forbidden,
                "not allowed to publish to this channel",
            );
            return;
        }
        let published = self
            .shared
            .broker
            .publish(Publish {
                channel: &p.channel,
                data: Some(&p.data),
                raw: match self.encoding {
                    tether_protocol::Encoding::Json => {
                        tether_protocol::codec::json_publish_data(frame)
                            .map(|raw| crate::json_text::compact_json(&raw))
                    }
                    tether_protocol::Encoding::MsgPack => None,
                }
                .unwrap_or_else(|| crate::hub::encode_data(&p.data)),
                idempotency_key: None,
            })
            .await;
        match published {
            Ok(done) => {
                self.shared
                    .metrics
                    .publications
                    .get_or_create(&SourceLabel { source: "client" })
                    .inc();
                self.reply(&ServerMessage::Published(Published {
                    id: p.id,
                    channel: p.channel,
                    epoch: done.position.epoch,
                    offset: done.position.offset,
                }));
            }
            Err(e) => self.error(Some(p.id), e.code(), e.to_string()),
        }
    }

    fn on_refresh(&mut self, r: tether_protocol::Refresh) {
        let verifier = &self.shared.verifier;
        if !verifier.enabled() {
            self.error(
                Some(r.id),
                ErrorCode::BadRequest,
                "client auth is not configured",
            );
            return;
        }
        match verifier.verify(Some(&r.token)) {
            Ok(g) if g.user != self.grant().user => {
                self.error(
                    Some(r.id),
                    ErrorCode::Forbidden,
                    "token belongs to another user",
                );
            }
            Ok(g) => {
                let expires = g.expires.unwrap_or(0);
                self.token_deadline = g.expires.map(deadline_at_unix);
                self.grant = Some(g);
                self.reply(&ServerMessage::Refreshed(Refreshed { id: r.id, expires }));
                // The new token may allow fewer channels: those end now,
                // and the client is told (no `id`: the server ended them).
                let lost: Vec<ChannelName> = self
                    .subs
                    .channels()
                    .filter(|c| !self.grant().may_subscribe(c))
                    .cloned()
                    .collect();
                for channel in lost {
                    self.end_subscription(&channel);
                    self.reply(&ServerMessage::Unsubscribed(Unsubscribed {
                        id: None,
                        channel,
                        reason: Some(ErrorCode::Forbidden.as_str().to_owned()),
                    }));
                }
            }
            Err(e) => self.error(Some(r.id), ErrorCode::Unauthorized, e.to_string()),
        }
    }

    /// Marks this session's device live on a personal channel of its user
    /// (for the offline-push decision), starting from `acked`.
    fn track_presence(&mut self, channel: &ChannelName, acked: Option<Offset>) {
        let Some(device) = &self.device else {
            return;
        };
        let Some(owner) = channel.personal_user() else {
            return;
        };
        if let Some(user) = &self.grant().user
            && user.as_str() != owner
        {
            return;
        }
        self.shared.presence.join(
            PresenceKey {
                device,
                channel,
                conn_id: self.conn_id,
            },
            acked,
        );
        self.personal.push(channel.clone());
    }

    fn untrack_presence(&mut self, channel: &ChannelName) {
        let Some(i) = self.personal.iter().position(|c| c == channel) else {
            return;
        };
        if let Some(device) = &self.device {
            self.shared.presence.leave(PresenceKey {
                device,
                channel,
                conn_id: self.conn_id,
            });
        }
        self.personal.swap_remove(i);
    }

    pub(super) fn grant(&self) -> &Grant {
        // Active sessions always hold a grant; fall back to nothing allowed.
        static NONE: std::sync::OnceLock<Grant> = std::sync::OnceLock::new();
        self.grant.as_ref().unwrap_or_else(|| {
            NONE.get_or_init(|| Grant {
                user: tether_protocol::UserId::new("-").ok(),
                expires: None,
                channels: Some(Vec::new()),
                may_publish: false,
            })
        })
    }
}
