//! Property tests: every message round-trips through both encodings, and no
//! input, however hostile, panics a decoder.

use std::collections::BTreeMap;

use bytes::BytesMut;
use proptest::prelude::*;
use serde_json::Value;
use tether_protocol::codec::{decode_client, decode_server, encode_client, encode_server};
use tether_protocol::frame::{FrameDecoder, encode_frame};
use tether_protocol::*;

const MAX: usize = 1 << 20;

fn channel() -> impl Strategy<Value = ChannelName> {
    "[a-zA-Z0-9_:.@/-]{1,40}".prop_map(|s| ChannelName::new(s).expect("generated valid"))
}

fn epoch() -> impl Strategy<Value = Epoch> {
    "[a-z0-9]{0,12}".prop_map(Epoch::new)
}

fn offset() -> impl Strategy<Value = Offset> {
    any::<u64>().prop_map(Offset)
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn opt_string() -> impl Strategy<Value = Option<String>> {
    prop::option::of(".{0,30}")
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    let connect = (
        any::<u64>(),
        opt_string(),
        opt_string(),
        prop::option::of((
            ".{0,30}",
            prop::option::of(prop::collection::btree_map(channel(), offset(), 0..4)),
        )),
        prop::option::of((".{0,10}", ".{0,10}", ".{0,10}")),
    )
        .prop_map(|(id, token, device, resume, client)| {
            ClientMessage::Connect(Connect {
                id,
                token,
                device,
                resume: resume.map(|(token, channels)| Resume { token, channels }),
                client: client.map(|(name, version, platform)| ClientInfo {
                    name,
                    version,
                    platform,
                }),
            })
        });
    prop_oneof![
        connect,
        (
            any::<u64>(),
            channel(),
            prop::option::of((epoch(), offset()))
        )
            .prop_map(|(id, channel, since)| ClientMessage::Subscribe(Subscribe {
                id,
                channel,
                since: since.map(|(epoch, offset)| StreamPosition { epoch, offset }),
            })),
        (any::<u64>(), channel())
            .prop_map(|(id, channel)| ClientMessage::Unsubscribe(Unsubscribe { id, channel })),
        (any::<u64>(), channel(), json()).prop_map(|(id, channel, data)| {
            ClientMessage::Publish(Publish { id, channel, data })
        }),
        (channel(), offset())
            .prop_map(|(channel, offset)| ClientMessage::Ack(Ack { channel, offset })),
        (any::<u64>(), ".{0,40}")
            .prop_map(|(id, token)| ClientMessage::Refresh(Refresh { id, token })),
        Just(ClientMessage::Ping),
        Just(ClientMessage::Pong),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    let connected = (
        any::<u64>(),
        ".{0,20}",
        ".{0,40}",
        any::<u64>(),
        any::<bool>(),
        prop::option::of(prop::collection::btree_map(
            channel(),
            (epoch(), offset(), any::<bool>()),
            0..4,
        )),
        ".{0,20}",
    )
        .prop_map(
            |(id, session, resume_token, heartbeat, resumed, channels, node)| {
                ServerMessage::Connected(Connected {
                    id,
                    session,
                    resume_token,
                    heartbeat,
                    resumed,
                    channels: channels.map(|m: BTreeMap<_, _>| {
                        m.into_iter()
                            .map(|(c, (epoch, offset, recovered))| {
                                (
                                    c,
                                    ChannelRecovery {
                                        epoch,
                                        offset,
                                        recovered,
                                    },
                                )
                            })
                            .collect()
                    }),
                    node,
                })
            },
        );
    let error_code = prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::Forbidden),
        Just(ErrorCode::NotFound),
        Just(ErrorCode::Conflict),
        Just(ErrorCode::TooLarge),
        Just(ErrorCode::RateLimited),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::Internal),
    ];
    prop_oneof![
        connected,
        (any::<u64>(), channel(), epoch(), offset(), any::<bool>()).prop_map(
            |(id, channel, epoch, offset, recovered)| ServerMessage::Subscribed(Subscribed {
                id,
                channel,
                epoch,
                offset,
                recovered
            })
        ),
        (
            proptest::option::of(any::<u64>()),
            channel(),
            proptest::option::of("[a-z_]{1,16}")
        )
            .prop_map(
                |(id, channel, reason)| ServerMessage::Unsubscribed(Unsubscribed {
                    id,
                    channel,
                    reason
                })
            ),
        (any::<u64>(), channel(), epoch(), offset()).prop_map(|(id, channel, epoch, offset)| {
            ServerMessage::Published(Published {
                id,
                channel,
                epoch,
                offset,
            })
        }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(id, expires)| ServerMessage::Refreshed(Refreshed { id, expires })),
        (channel(), epoch(), offset(), json(), any::<u64>()).prop_map(
            |(channel, epoch, offset, data, ts)| ServerMessage::Message(Publication {
                channel,
                epoch,
                offset,
                data,
                ts
            })
        ),
        Just(ServerMessage::Ping),
        Just(ServerMessage::Pong),
        (prop::option::of(any::<u64>()), error_code, ".{0,30}")
            .prop_map(|(id, code, message)| ServerMessage::Error(ErrorReply { id, code, message })),
        (
            any::<u16>(),
            ".{0,30}",
            any::<bool>(),
            prop::option::of(any::<u64>())
        )
            .prop_map(|(code, reason, reconnect, retry_after_ms)| {
                ServerMessage::Disconnect(Disconnect {
                    code,
                    reason,
                    reconnect,
                    retry_after_ms,
                })
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_messages_round_trip(m in client_message()) {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = encode_client(&m, enc);
            let back = decode_client(&bytes, enc, MAX);
            prop_assert_eq!(back.as_ref(), Ok(&m), "{:?}", enc);
        }
    }

    #[test]
    fn server_messages_round_trip(m in server_message()) {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = encode_server(&m, enc);
            let back = decode_server(&bytes, enc, MAX);
            prop_assert_eq!(back.as_ref(), Ok(&m), "{:?}", enc);
        }
    }

    #[test]
    fn messages_round_trip_through_quic_frames(ms in prop::collection::vec(client_message(), 1..5)) {
        let mut wire = BytesMut::new();
        for m in &ms {
            wire.extend_from_slice(&encode_frame(&encode_client(m, Encoding::MsgPack)));
        }
        let dec = FrameDecoder::new(MAX);
        let mut back = Vec::new();
        while let Some(f) = dec.decode(&mut wire).expect("within limit") {
            back.push(decode_client(&f, Encoding::MsgPack, MAX).expect("decodes"));
        }
        prop_assert_eq!(back, ms);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let _ = decode_client(&bytes, enc, 256);
            let _ = decode_server(&bytes, enc, 256);
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let dec = FrameDecoder::new(64);
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
    }

    #[test]
    fn mutated_messages_never_panic(m in client_message(), flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let mut bytes = encode_client(&m, enc).to_vec();
            if bytes.is_empty() { continue; }
            for (pos, b) in &flips {
                let i = pos % bytes.len();
                bytes[i] = *b;
            }
            let _ = decode_client(&bytes, enc, MAX);
        }
    }
}
