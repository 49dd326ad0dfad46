//! JSON and MessagePack encodings of the messages (PROTOCOL.md §2).
//!
//! Decoding goes bytes → generic value (size and nesting checked, MessagePack
//! values checked for a JSON equivalent) → typed message, and sorts every
//! failure into a [`DecodeError`] that tells the caller what to do: close the
//! connection (4001, 4009) or answer `error` `bad_request` and go on.

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::value::{self, NotJson};
use crate::{ClientMessage, MAX_DEPTH, ServerMessage};

/// The encoding of one connection's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `tether.v1.json`: one JSON object per WebSocket text frame.
    Json,
    /// `tether.v1.msgpack`: one MessagePack map per binary frame (and on QUIC).
    MsgPack,
}

impl Encoding {
    /// The encoding a WebSocket subprotocol name selects.
    pub fn from_subprotocol(name: &str) -> Option<Encoding> {
        match name {
            crate::SUBPROTOCOL_JSON => Some(Encoding::Json),
            crate::SUBPROTOCOL_MSGPACK => Some(Encoding::MsgPack),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => crate::SUBPROTOCOL_JSON,
            Encoding::MsgPack => crate::SUBPROTOCOL_MSGPACK,
        }
    }

    /// The encoding chosen for a `Sec-WebSocket-Protocol` offer: the first one
    /// known, JSON when nothing is offered, `None` when only unknown ones are.
    pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<Encoding> {
        let mut any = false;
        for name in offered {
            let name = name.trim();
            if name.is_empty() {
                continue;
            }
            any = true;
            if let Some(e) = Encoding::from_subprotocol(name) {
                return Some(e);
            }
        }
        if any { None } else { Some(Encoding::Json) }
    }
}

/// Why a message could not be decoded, and so what the receiver must do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Over the size limit: close with 4009 (or answer 413).
    #[error("message of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    /// Not a message at all: close with 4001.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Nested deeper than [`MAX_DEPTH`] levels (§2): malformed, close with
    /// 4001 (an API body: 400).
    #[error("malformed message: nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// A well-formed message of a type this side does not know: answer
    /// `bad_request` and go on (forward compatibility).
    #[error("unknown message type {kind:?}")]
    UnknownType { kind: String, id: Option<u64> },
    /// A known type with missing or invalid fields: answer `bad_request`.
    #[error("invalid {kind} message: {reason}")]
    Invalid {
        kind: String,
        id: Option<u64>,
        reason: String,
    },
}

impl DecodeError {
    /// The request id, where the message carried a readable one.
    pub fn id(&self) -> Option<u64> {
        match self {
            DecodeError::UnknownType { id, .. } | DecodeError::Invalid { id, .. } => *id,
            _ => None,
        }
    }

    /// True when the connection must be closed (4001 or 4009) rather than
    /// answered with `error`.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            DecodeError::TooLarge { .. } | DecodeError::Malformed(_) | DecodeError::TooDeep
        )
    }

    /// The close code for a fatal error.
    pub fn close_code(&self) -> crate::CloseCode {
        match self {
            DecodeError::TooLarge { .. } => crate::CloseCode::TooLarge,
            _ => crate::CloseCode::ProtocolError,
        }
    }
}

/// Decodes one client message.
pub fn decode_client(
    bytes: &[u8],
    encoding: Encoding,
    max_size: usize,
) -> Result<ClientMessage, DecodeError> {
    decode_typed(bytes, encoding, max_size, &ClientMessage::TYPES)
}

/// The `data` of a JSON `publish` frame as its text, numbers as sent (the
/// generic value of [`decode_client`] reads a 30-digit integer as a float).
/// `None` when the frame has no single `data` (a duplicated key).
pub fn json_publish_data(bytes: &[u8]) -> Option<Box<serde_json::value::RawValue>> {
    #[derive(serde::Deserialize)]
    struct Data {
        data: Box<serde_json::value::RawValue>,
    }
    serde_json::from_slice::<Data>(bytes).ok().map(|d| d.data)
}

/// Decodes one server message (clients, the load tester, tests).
pub fn decode_server(
    bytes: &[u8],
    encoding: Encoding,
    max_size: usize,
) -> Result<ServerMessage, DecodeError> {
    decode_typed(bytes, encoding, max_size, &ServerMessage::TYPES)
}

/// Encodes a client message.
pub fn encode_client(msg: &ClientMessage, encoding: Encoding) -> Bytes {
    encode(msg, encoding)
}

/// Encodes a server message.
pub fn encode_server(msg: &ServerMessage, encoding: Encoding) -> Bytes {
    encode(msg, encoding)
}

fn encode<T: Serialize>(msg: &T, encoding: Encoding) -> Bytes {
    // Our message types hold only strings, integers, booleans, string-keyed
    // maps and JSON values: both serializers accept every one of them.
    let out = match encoding {
        Encoding::Json => serde_json::to_vec(msg).map_err(|e| e.to_string()),
        Encoding::MsgPack => rmp_serde::to_vec_named(msg).map_err(|e| e.to_string()),
    };
    match out {
        Ok(v) => Bytes::from(v),
        Err(e) => unreachable_encode(&e),
    }
}

#[cold]
fn unreachable_encode(e: &str) -> Bytes {
    // Not reachable with the types of this crate; never panic on the network
    // path all the same: an empty frame is refused by the peer as malformed.
    debug_assert!(false, "encoding failed: {e}");
    Bytes::new()
}

#[derive(Serialize)]
struct PublicationRef<'a, D: Serialize + ?Sized> {
    #[serde(rename = "type")]
    kind: &'static str,
    channel: &'a crate::ChannelName,
    epoch: &'a crate::Epoch,
    offset: crate::Offset,
    data: &'a D,
    ts: u64,
}

/// Encodes a `message` whose `data` is already JSON text, without parsing
/// it again: the broker encodes each publication once and fans the bytes out.
pub fn encode_publication_json(
    channel: &crate::ChannelName,
    epoch: &crate::Epoch,
    offset: crate::Offset,
    data: &serde_json::value::RawValue,
    ts: u64,
) -> Bytes {
    encode(
        &PublicationRef {
            kind: "message",
            channel,
            epoch,
            offset,
            data,
            ts,
        },
        Encoding::Json,
    )
}

/// Encodes a `message` in MessagePack from borrowed parts.
pub fn encode_publication_msgpack(
    channel: &crate::ChannelName,
    epoch: &crate::Epoch,
    offset: crate::Offset,
    data: &Value,
    ts: u64,
) -> Bytes {
    encode(
        &PublicationRef {
            kind: "message",
            channel,
            epoch,
            offset,
            data,
            ts,
        },
        Encoding::MsgPack,
    )
}

/// Decodes bytes into a generic JSON value, with every check of §2 applied.
pub fn decode_value(
    bytes: &[u8],
    encoding: Encoding,
    max_size: usize,
) -> Result<Value, DecodeError> {
    if bytes.len() > max_size {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            max: max_size,
        });
    }
    match encoding {
        Encoding::Json => {
            let v: Value = serde_json::from_slice(bytes)
                .map_err(|e| DecodeError::Malformed(format!("invalid JSON: {e}")))?;
            if value::depth(&v) > MAX_DEPTH {
                return Err(too_deep());
            }
            Ok(v)
        }
        Encoding::MsgPack => {
            let mut rd = bytes;
            // rmpv spends two steps per container level and up to two on a
            // leaf: this bound is a little above 64 levels, so that recursion
            // stays shallow while the exact check is left to `msgpack_depth`.
            let v = rmpv::decode::read_value_with_max_depth(&mut rd, 2 * MAX_DEPTH + 8).map_err(
                |e| match e {
                    rmpv::decode::Error::DepthLimitExceeded => too_deep(),
                    e => DecodeError::Malformed(format!("invalid MessagePack: {e}")),
                },
            )?;
            if !rd.is_empty() {
                return Err(DecodeError::Malformed(
                    "trailing bytes after the MessagePack map".into(),
                ));
            }
            if value::msgpack_depth(&v) > MAX_DEPTH {
                return Err(too_deep());
            }
            msgpack_message_to_json(v)
        }
    }
}

fn too_deep() -> DecodeError {
    DecodeError::TooDeep
}

/// Converts a top-level MessagePack map; a value without JSON equivalent is
/// `bad_request` inside `data` and malformed anywhere else (§2).
fn msgpack_message_to_json(v: rmpv::Value) -> Result<Value, DecodeError> {
    let rmpv::Value::Map(entries) = v else {
        return Err(DecodeError::Malformed("a message must be a map".into()));
    };
    let mut map = serde_json::Map::with_capacity(entries.len());
    let mut bad_data: Option<NotJson> = None;
    for (k, v) in entries {
        let key = match k {
            rmpv::Value::String(s) => s
                .into_str()
                .ok_or_else(|| DecodeError::Malformed(NotJson::InvalidUtf8.describe().into()))?,
            _ => {
                return Err(DecodeError::Malformed(
                    NotJson::NonStringKey.describe().into(),
                ));
            }
        };
        let is_data = key == "data";
        match value::msgpack_to_json(v) {
            Ok(v) => {
                map.insert(key, v);
            }
            Err(e) if is_data => bad_data = Some(e),
            Err(e) => return Err(DecodeError::Malformed(e.describe().into())),
        }
    }
    let v = Value::Object(map);
    if let Some(e) = bad_data {
        let (kind, id) = kind_and_id(&v)?;
        return Err(DecodeError::Invalid {
            kind,
            id,
            reason: format!("data: {}", e.describe()),
        });
    }
    Ok(v)
}

fn kind_and_id(v: &Value) -> Result<(String, Option<u64>), DecodeError> {
    let Value::Object(map) = v else {
        return Err(DecodeError::Malformed("a message must be a map".into()));
    };
    let kind = match map.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(DecodeError::Malformed("`type` must be a string".into())),
        None => return Err(DecodeError::Malformed("missing `type`".into())),
    };
    Ok((kind, map.get("id").and_then(Value::as_u64)))
}

fn decode_typed<T: DeserializeOwned>(
    bytes: &[u8],
    encoding: Encoding,
    max_size: usize,
    known: &[&str],
) -> Result<T, DecodeError> {
    let v = decode_value(bytes, encoding, max_size)?;
    from_value(v, known)
}

/// Types a generic value as a message whose `type` is among `known`.
pub fn from_value<T: DeserializeOwned>(v: Value, known: &[&str]) -> Result<T, DecodeError> {
    let (kind, id) = kind_and_id(&v)?;
    if !known.contains(&kind.as_str()) {
        return Err(DecodeError::UnknownType { kind, id });
    }
    serde_json::from_value(v).map_err(|e| DecodeError::Invalid {
        kind,
        id,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;
    use serde_json::json;

    const MAX: usize = DEFAULT_MAX_MESSAGE_SIZE;

    fn chan(s: &str) -> ChannelName {
        ChannelName::new(s).expect("valid channel")
    }

    #[test]
    fn json_wire_form_matches_the_contract() {
        let m = ServerMessage::Message(Publication {
            channel: chan("news"),
            epoch: Epoch::new("e1"),
            offset: Offset(7),
            data: json!({"x": 1}),
            ts: 1700000000000,
        });
        let v: Value = serde_json::from_slice(&encode_server(&m, Encoding::Json)).expect("json");
        assert_eq!(
            v,
            json!({"type": "message", "channel": "news", "epoch": "e1", "offset": 7,
                   "data": {"x": 1}, "ts": 1700000000000u64})
        );
        let e = ServerMessage::error(None, ErrorCode::BadRequest, "nope");
        let v: Value = serde_json::from_slice(&encode_server(&e, Encoding::Json)).expect("json");
        assert_eq!(
            v,
            json!({"type": "error", "code": "bad_request", "message": "nope"})
        );
    }

    #[test]
    fn borrowed_publication_encodings_equal_the_owned_ones() {
        let data = json!({"text": "hi \"there\"", "n": [1, 2.5, null]});
        let raw = serde_json::value::to_raw_value(&data).expect("raw");
        let owned = ServerMessage::Message(Publication {
            channel: chan("room:1"),
            epoch: Epoch::new("ep"),
            offset: Offset(42),
            data: data.clone(),
            ts: 5,
        });
        assert_eq!(
            encode_publication_json(&chan("room:1"), &Epoch::new("ep"), Offset(42), &raw, 5),
            encode_server(&owned, Encoding::Json)
        );
        assert_eq!(
            encode_publication_msgpack(&chan("room:1"), &Epoch::new("ep"), Offset(42), &data, 5),
            encode_server(&owned, Encoding::MsgPack)
        );
    }

    #[test]
    fn msgpack_uses_maps_with_field_names() {
        let m = ClientMessage::Subscribe(Subscribe {
            id: 3,
            channel: chan("a"),
            since: None,
        });
        let bytes = encode_client(&m, Encoding::MsgPack);
        let v = rmpv::decode::read_value(&mut &bytes[..]).expect("msgpack");
        let rmpv::Value::Map(entries) = v else {
            panic!("not a map: {v:?}")
        };
        let keys: Vec<_> = entries
            .iter()
            .filter_map(|(k, _)| k.as_str().map(str::to_owned))
            .collect();
        assert_eq!(keys, vec!["type", "id", "channel"]);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let m = decode_client(br#"{"type":"ping","extra":{"a":1}}"#, Encoding::Json, MAX)
            .expect("decodes");
        assert_eq!(m, ClientMessage::Ping);
        let m = decode_client(
            br#"{"type":"subscribe","id":1,"channel":"c","future":true}"#,
            Encoding::Json,
            MAX,
        )
        .expect("decodes");
        assert_eq!(m.id(), Some(1));
    }

    #[test]
    fn errors_are_sorted_by_what_the_receiver_must_do() {
        let e = decode_client(b"{not json", Encoding::Json, MAX).expect_err("malformed");
        assert!(e.is_fatal());
        assert_eq!(e.close_code(), CloseCode::ProtocolError);

        let e = decode_client(b"[1,2]", Encoding::Json, MAX).expect_err("not a map");
        assert!(matches!(e, DecodeError::Malformed(_)));

        let e =
            decode_client(br#"{"type":"fly","id":9}"#, Encoding::Json, MAX).expect_err("unknown");
        assert_eq!(
            e,
            DecodeError::UnknownType {
                kind: "fly".into(),
                id: Some(9)
            }
        );
        assert!(!e.is_fatal());

        let e = decode_client(
            br#"{"type":"subscribe","id":2,"channel":"bad name"}"#,
            Encoding::Json,
            MAX,
        )
        .expect_err("bad channel");
        assert!(
            matches!(e, DecodeError::Invalid { id: Some(2), .. }),
            "{e:?}"
        );

        let e = decode_client(br#"{"type":"ack","channel":"c"}"#, Encoding::Json, MAX)
            .expect_err("ack without offset");
        assert!(matches!(e, DecodeError::Invalid { .. }));

        let big = vec![b' '; MAX + 1];
        let e = decode_client(&big, Encoding::Json, MAX).expect_err("too large");
        assert_eq!(e.close_code(), CloseCode::TooLarge);
    }

    #[test]
    fn nesting_beyond_64_is_malformed() {
        let ok = format!(
            r#"{{"type":"publish","id":1,"channel":"c","data":{}1{}}}"#,
            "[".repeat(63),
            "]".repeat(63)
        );
        assert!(decode_client(ok.as_bytes(), Encoding::Json, MAX).is_ok());
        let deep = format!(
            r#"{{"type":"publish","id":1,"channel":"c","data":{}1{}}}"#,
            "[".repeat(64),
            "]".repeat(64)
        );
        let e = decode_client(deep.as_bytes(), Encoding::Json, MAX).expect_err("too deep");
        assert_eq!(e, DecodeError::TooDeep);
        assert!(e.is_fatal());
        // Far deeper than serde_json's own recursion limit: still an error, no crash.
        let abyss = "[".repeat(50_000);
        assert!(decode_client(abyss.as_bytes(), Encoding::Json, MAX).is_err());
        let abyss = vec![0x91u8; 50_000]; // fixarray(1) nested
        assert_eq!(
            decode_client(&abyss, Encoding::MsgPack, MAX),
            Err(DecodeError::TooDeep)
        );

        // The same limits over MessagePack: 64 levels pass, 65 do not.
        let nest = |levels: usize| {
            let mut data = rmpv::Value::from("leaf");
            for _ in 0..levels {
                data = rmpv::Value::Array(vec![data]);
            }
            let msg = rmpv::Value::Map(vec![
                ("type".into(), "publish".into()),
                ("id".into(), 1.into()),
                ("channel".into(), "c".into()),
                ("data".into(), data),
            ]);
            let mut buf = Vec::new();
            rmpv::encode::write_value(&mut buf, &msg).expect("encode");
            decode_client(&buf, Encoding::MsgPack, MAX)
        };
        assert!(nest(63).is_ok(), "{:?}", nest(63));
        assert!(nest(64).expect_err("too deep").is_fatal());
    }

    #[test]
    fn msgpack_data_without_json_equivalent_is_a_bad_request() {
        let msg = rmpv::Value::Map(vec![
            ("type".into(), "publish".into()),
            ("id".into(), 5.into()),
            ("channel".into(), "c".into()),
            ("data".into(), rmpv::Value::Binary(vec![0, 1])),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &msg).expect("encode");
        let e = decode_client(&buf, Encoding::MsgPack, MAX).expect_err("binary data");
        assert!(
            matches!(e, DecodeError::Invalid { id: Some(5), .. }),
            "{e:?}"
        );

        let msg = rmpv::Value::Map(vec![
            ("type".into(), "subscribe".into()),
            ("id".into(), 5.into()),
            ("channel".into(), rmpv::Value::Binary(b"c".to_vec())),
        ]);
        let mut buf = Vec::new();
        rmpv::encode::write_value(&mut buf, &msg).expect("encode");
        let e = decode_client(&buf, Encoding::MsgPack, MAX).expect_err("binary channel");
        assert!(e.is_fatal(), "{e:?}");
    }

    #[test]
    fn subprotocol_negotiation() {
        assert_eq!(Encoding::negotiate([]), Some(Encoding::Json));
        assert_eq!(
            Encoding::negotiate(["x", "tether.v1.msgpack", "tether.v1.json"]),
            Some(Encoding::MsgPack)
        );
        assert_eq!(Encoding::negotiate(["x", "y"]), None);
    }
}
