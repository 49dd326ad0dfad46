//! Every message of PROTOCOL.md §3 (client → server) and §4 (server → client).
//!
//! Field names are the wire names; optional fields are omitted when absent.
//! Unknown fields are ignored on decode (forward compatibility).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ChannelName, Epoch, ErrorCode, Offset};

/// A message from a client to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    Connect(Connect),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Publish(Publish),
    Ack(Ack),
    Refresh(Refresh),
    Ping,
    Pong,
}

impl ClientMessage {
    /// The `type` names a client may send.
    pub const TYPES: [&'static str; 8] = [
        "connect",
        "subscribe",
        "unsubscribe",
        "publish",
        "ack",
        "refresh",
        "ping",
        "pong",
    ];

    /// The request id, for the messages that carry one.
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientMessage::Connect(m) => Some(m.id),
            ClientMessage::Subscribe(m) => Some(m.id),
            ClientMessage::Unsubscribe(m) => Some(m.id),
            ClientMessage::Publish(m) => Some(m.id),
            ClientMessage::Refresh(m) => Some(m.id),
            ClientMessage::Ack(_) | ClientMessage::Ping | ClientMessage::Pong => None,
        }
    }

    /// The wire `type` of this message.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::Connect(_) => "connect",
            ClientMessage::Subscribe(_) => "subscribe",
            ClientMessage::Unsubscribe(_) => "unsubscribe",
            ClientMessage::Publish(_) => "publish",
            ClientMessage::Ack(_) => "ack",
            ClientMessage::Refresh(_) => "refresh",
            ClientMessage::Ping => "ping",
            ClientMessage::Pong => "pong",
        }
    }
}

/// `connect`: must be the first message of a session.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Connect {
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The device id this session runs on (see the device registry, §10–11).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientInfo>,
}

/// `connect.resume`: restore an earlier session (§6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resume {
    pub token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<BTreeMap<ChannelName, Offset>>,
}

/// `connect.client`: what the client is, for logs and metrics.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClientInfo {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub platform: String,
}

/// A position in a channel's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub epoch: Epoch,
    pub offset: Offset,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribe {
    pub id: u64,
    pub channel: ChannelName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribe {
    pub id: u64,
    pub channel: ChannelName,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    pub id: u64,
    pub channel: ChannelName,
    pub data: Value,
}

/// Cumulative acknowledgement: every message on `channel` up to `offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ack {
    pub channel: ChannelName,
    pub offset: Offset,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refresh {
    pub id: u64,
    pub token: String,
}

/// A message from the server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    Connected(Connected),
    Subscribed(Subscribed),
    Unsubscribed(Unsubscribed),
    Published(Published),
    Refreshed(Refreshed),
    Message(Publication),
    Ping,
    Pong,
    Error(ErrorReply),
    Disconnect(Disconnect),
}

impl ServerMessage {
    /// The `type` names the server may send.
    pub const TYPES: [&'static str; 10] = [
        "connected",
        "subscribed",
        "unsubscribed",
        "published",
        "refreshed",
        "message",
        "ping",
        "pong",
        "error",
        "disconnect",
    ];

    /// An `error` reply.
    pub fn error(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerMessage::Error(ErrorReply {
            id,
            code,
            message: message.into(),
        })
    }
}

/// Per-channel outcome of a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecovery {
    pub epoch: Epoch,
    pub offset: Offset,
    pub recovered: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connected {
    pub id: u64,
    pub session: String,
    pub resume_token: String,
    /// Seconds between server pings.
    pub heartbeat: u64,
    pub resumed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<BTreeMap<ChannelName, ChannelRecovery>>,
    pub node: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    pub id: u64,
    pub channel: ChannelName,
    pub epoch: Epoch,
    /// The latest offset of the channel.
    pub offset: Offset,
    pub recovered: bool,
}

/// The end of a subscription: the answer to `unsubscribe` (with its `id`),
/// or the server ending it itself (no `id`, and a `reason`: e.g. a
/// `refresh` whose token no longer allows the channel).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: ChannelName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    pub id: u64,
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub offset: Offset,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refreshed {
    pub id: u64,
    /// Unix seconds when the new token expires.
    pub expires: u64,
}

/// A `message`: one publication delivered on a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    pub channel: ChannelName,
    pub epoch: Epoch,
    pub offset: Offset,
    pub data: Value,
    /// Unix milliseconds when it was published.
    pub ts: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Disconnect {
    pub code: u16,
    pub reason: String,
    pub reconnect: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl From<crate::CloseCode> for Disconnect {
    fn from(code: crate::CloseCode) -> Self {
        Disconnect {
            code: code.code(),
            reason: code.reason().to_owned(),
            reconnect: code.reconnect(),
            retry_after_ms: None,
        }
    }
}
