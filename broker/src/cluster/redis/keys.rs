//! The names of Tether's keys and pub/sub channels in Redis.
//!
//! A channel's keys all carry `{<channel>}` as their hash tag, so a Redis
//! Cluster keeps them — and the channel's sharded pub/sub channel — on one
//! slot: one script can read and write them, and the publication is
//! published from the shard that holds the history. Channel names cannot
//! contain braces (PROTOCOL.md §5), so the tag is always the whole name.
//!
//! | key | type | what |
//! |---|---|---|
//! | `tether:{ch}:p` | hash `epoch`, `offset`, `x` (unix ms of the next expiry refresh) | the channel's position; expires no sooner than the position TTL after the last publish or watch check (refreshed lazily, see `broker::PUBLISH_SCRIPT`) |
//! | `tether:{ch}:h` | stream, entry id `<offset>-0`, fields `d` (data, JSON), `t` (unix ms) | history, `MAXLEN ~` history size (reads answer from the last history-size offsets only), expires `history_ttl` after the last publish |
//! | `tether:{ch}:i:<key>` | string `"<epoch> <offset>"` | an idempotency key's answer, expires after `history_ttl` |
//! | `tether:{ch}:m` | (s)pub/sub channel | publications: `"<epoch> <offset> <ts> <data>"` |
//! | `tether:{#node:<node>}:c` | (s)pub/sub channel | control messages to the node (a takeover of one of its sessions) |
//! | `tether:s:{<session>}` · `…:h` | hash · list | a resumable session and its handoff (see `resume`) |
//! | `tether:{#dev:<device>}:live` | hash | the device's live sessions (see `presence`) |
//! | `tether:{#probe:<node>}:m` | (s)pub/sub channel | the node's own probe of its pub/sub connection (`#` is not allowed in channel names: no channel can take this name); on a Redis Cluster one per shard, `tether:{#probe:<node>:<k>}:m` with `k` chosen so that its slot is on that shard |
//! | `tether:{#ack}:due` · `:claimed` · `:jobs` | sorted sets · hash | ack-timeout checks (see `ack`) |

use tether_protocol::ChannelName;

const PREFIX: &str = "tether:{";

/// The position hash of `channel`.
pub fn position(channel: &ChannelName) -> String {
    format!("{PREFIX}{channel}}}:p")
}

/// The history stream of `channel`.
pub fn history(channel: &ChannelName) -> String {
    format!("{PREFIX}{channel}}}:h")
}

/// The idempotency key `key` of `channel`.
pub fn idempotency(channel: &ChannelName, key: &str) -> String {
    format!("{PREFIX}{channel}}}:i:{key}")
}

/// The pub/sub channel of `channel`.
pub fn messages(channel: &ChannelName) -> String {
    format!("{PREFIX}{channel}}}:m")
}

/// The channel a pub/sub channel name belongs to, if it is one of ours.
pub fn channel_of(pubsub: &[u8]) -> Option<ChannelName> {
    let s = std::str::from_utf8(pubsub).ok()?;
    let name = s.strip_prefix(PREFIX)?.strip_suffix("}:m")?;
    ChannelName::new(name).ok()
}

/// The probe channel of node `node`.
pub fn probe(node: &str) -> String {
    format!("{PREFIX}#probe:{node}}}:m")
}

/// The Redis Cluster slot of `key`: CRC16 (XMODEM) of its hash tag (the
/// first `{…}` with something inside), else of the whole key, mod 16384.
pub fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &b[open + 1..];
        rest.iter()
            .position(|&c| c == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(b)) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// A probe channel of node `node` whose slot lies in `start..=end` (one
/// shard's range), or `None` if none is found within a bound of tries.
pub fn probe_in(node: &str, start: u16, end: u16) -> Option<String> {
    (0..200_000u32)
        .map(|k| format!("{PREFIX}#probe:{node}:{k}}}:m"))
        .find(|c| (start..=end).contains(&slot(c)))
}

/// The control channel of node `node` (takeovers).
pub fn control(node: &str) -> String {
    format!("{PREFIX}#node:{node}}}:c")
}

/// A publication as it travels on pub/sub: epoch, offset, ts, then the data.
pub fn encode_message(epoch: &str, offset: u64, ts: u64, data: &str) -> String {
    format!("{epoch} {offset} {ts} {data}")
}

/// The parts of a pub/sub publication: epoch, offset, ts, data.
pub fn decode_message(payload: &[u8]) -> Option<(&str, u64, u64, &str)> {
    let s = std::str::from_utf8(payload).ok()?;
    let mut parts = s.splitn(4, ' ');
    let epoch = parts.next().filter(|e| !e.is_empty())?;
    let offset = parts.next()?.parse().ok()?;
    let ts = parts.next()?.parse().ok()?;
    let data = parts.next()?;
    Some((epoch, offset, ts, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_those_redis_computes() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("bar"), 5061);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("foo{}{bar}"), slot("foo{}{bar}".to_owned().as_str()));
        assert_eq!(slot("{}x"), crc16(b"{}x") % 16384, "an empty tag is no tag");
    }

    #[test]
    fn a_probe_can_be_placed_on_every_shard() {
        for (start, end) in [(0, 5460), (5461, 10922), (10923, 16383), (7000, 7000)] {
            let c = probe_in("n1", start, end).expect("found");
            assert!((start..=end).contains(&slot(&c)), "{c}");
            assert!(c.starts_with("tether:{#probe:n1:"), "{c}");
        }
    }

    #[test]
    fn a_channels_keys_share_its_hash_tag() {
        let c = ChannelName::new("user:alice/inbox").expect("valid");
        for key in [
            position(&c),
            history(&c),
            idempotency(&c, "k 1"),
            messages(&c),
        ] {
            assert!(key.starts_with("tether:{user:alice/inbox}:"), "{key}");
        }
        assert_eq!(channel_of(messages(&c).as_bytes()), Some(c));
        assert_eq!(channel_of(probe("n1").as_bytes()), None);
        assert_eq!(channel_of(b"other"), None);
    }

    #[test]
    fn messages_round_trip_and_junk_is_refused() {
        let m = encode_message("00ff", 7, 1700, r#"{"a":"b c"}"#);
        assert_eq!(
            decode_message(m.as_bytes()),
            Some(("00ff", 7, 1700, r#"{"a":"b c"}"#))
        );
        assert_eq!(decode_message(b"00ff x 1 {}"), None);
        assert_eq!(decode_message(b"00ff 1"), None);
        assert_eq!(decode_message(b" 1 2 3"), None);
    }
}
