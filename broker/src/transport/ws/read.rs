//! What a WebSocket client sends, read by the broker itself (RFC 6455 §5):
//! frames parsed from a buffer this module owns, unmasked in place,
//! fragments joined into messages, control frames handed up between them.
//!
//! The buffer is the connection's read size (`--ws-read-buffer`) and goes
//! back to it after any larger frame: the large frame's bytes belong to the
//! message handed up and are freed with it, so one large message does not
//! leave an idle connection holding its size for good (tungstenite's
//! buffer keeps the largest size it ever grew to).

use bytes::{Buf, Bytes, BytesMut};

pub(super) const OPCODE_CONTINUATION: u8 = 0x0;
pub(super) const OPCODE_TEXT: u8 = 0x1;
pub(super) const OPCODE_BINARY: u8 = 0x2;
pub(super) const OPCODE_CLOSE: u8 = 0x8;
pub(super) const OPCODE_PING: u8 = 0x9;
pub(super) const OPCODE_PONG: u8 = 0xA;

/// What a client sent, one item at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A whole data message (fragments joined), text checked to be UTF-8.
    Message {
        text: bool,
        payload: Bytes,
    },
    /// A ping, owed a pong with the same payload.
    Ping(Bytes),
    Pong,
    /// The client's Close frame, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why what the client sent cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Protocol(&'static str),
    #[error("a frame or message longer than {max} bytes")]
    TooLarge { max: usize },
}

/// A frame header, parsed.
struct Header {
    fin: bool,
    opcode: u8,
    /// Bytes of the header, mask key included.
    len: usize,
    payload: usize,
    mask: [u8; 4],
}

/// Reads frames out of the bytes a connection delivered.
pub struct Reader {
    buf: BytesMut,
    /// The read size the buffer returns to.
    base: usize,
    max_message: usize,
    /// A fragmented message being joined: whether it is text, and its
    /// bytes so far.
    joining: Option<(bool, BytesMut)>,
    /// Bytes the frame at the front of `buf` needs in all, once its header
    /// is known (0 before).
    need: usize,
}

impl Reader {
    pub fn new(base: usize, max_message: usize) -> Self {
        Reader {
            buf: BytesMut::with_capacity(base),
            base,
            max_message,
            joining: None,
            need: 0,
        }
    }

    /// Bytes the buffer holds room for now (its capacity from where it
    /// starts); the allocation under it is at most this plus what the
    /// frames handed up still hold.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// The buffer to read into next, with room for at least one byte: the
    /// whole frame being read when its header is known, else the read size.
    pub fn buffer(&mut self) -> &mut BytesMut {
        let target = self.need.max(self.base);
        if self.buf.capacity() < target {
            self.buf.reserve(target - self.buf.len());
        } else if self.buf.len() == self.buf.capacity() {
            self.buf.reserve(self.base);
        }
        &mut self.buf
    }

    /// The next item from what has been read, or `None` until more arrives.
    pub fn next_incoming(&mut self) -> Result<Option<Incoming>, ReadError> {
        loop {
            let Some(h) = self.header()? else {
                return Ok(None);
            };
            let total = h.len + h.payload;
            if self.buf.len() < total {
                self.need = total;
                return Ok(None);
            }
            self.need = 0;
            self.buf.advance(h.len);
            let mut payload = self.buf.split_to(h.payload);
            unmask(&mut payload, h.mask);
            if total > self.base {
                self.rebase();
            }
            if let Some(item) = self.take(h.fin, h.opcode, payload)? {
                return Ok(Some(item));
            }
        }
    }

    /// A fresh buffer of the read size with what is left after a large
    /// frame: the large allocation stays with that frame's bytes only.
    fn rebase(&mut self) {
        let mut fresh = BytesMut::with_capacity(self.base.max(self.buf.len()));
        fresh.extend_from_slice(&self.buf);
        self.buf = fresh;
    }

    fn header(&self) -> Result<Option<Header>, ReadError> {
        let b = &self.buf[..];
        let [b0, b1, ..] = *b else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(ReadError::Protocol(
                "reserved bits set (no extension was negotiated)",
            ));
        }
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        if !matches!(
            opcode,
            OPCODE_CONTINUATION
                | OPCODE_TEXT
                | OPCODE_BINARY
                | OPCODE_CLOSE
                | OPCODE_PING
                | OPCODE_PONG
        ) {
            return Err(ReadError::Protocol("reserved opcode"));
        }
        if b1 & 0x80 == 0 {
            return Err(ReadError::Protocol("a client frame must be masked"));
        }
        let (payload, at) = match b1 & 0x7f {
            126 => match b.get(2..4) {
                Some(&[x, y]) => (u64::from(u16::from_be_bytes([x, y])), 4),
                _ => return Ok(None),
            },
            127 => match b.get(2..10).and_then(|s| <[u8; 8]>::try_from(s).ok()) {
                Some(n) => {
                    let n = u64::from_be_bytes(n);
                    if n >> 63 != 0 {
                        return Err(ReadError::Protocol(
                            "the most significant bit of a 64-bit length must be 0",
                        ));
                    }
                    (n, 10)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 2),
        };
        if opcode >= OPCODE_CLOSE {
            if !fin {
                return Err(ReadError::Protocol(
                    "a control frame must not be fragmented",
                ));
            }
            if payload > 125 {
                return Err(ReadError::Protocol(
                    "a control frame's payload is at most 125 bytes",
                ));
            }
        }
        let payload = match usize::try_from(payload) {
            Ok(n) if n <= self.max_message => n,
            _ => {
                return Err(ReadError::TooLarge {
                    max: self.max_message,
                });
            }
        };
        let Some(&[m0, m1, m2, m3]) = b.get(at..at + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            len: at + 4,
            payload,
            mask: [m0, m1, m2, m3],
        }))
    }

    /// One unmasked frame: the item it completes, if any.
    fn take(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: BytesMut,
    ) -> Result<Option<Incoming>, ReadError> {
        match opcode {
            OPCODE_TEXT | OPCODE_BINARY => {
                if self.joining.is_some() {
                    return Err(ReadError::Protocol(
                        "a new message began inside a fragmented one",
                    ));
                }
                let text = opcode == OPCODE_TEXT;
                if fin {
                    return message(text, payload).map(Some);
                }
                self.joining = Some((text, payload));
                Ok(None)
            }
            OPCODE_CONTINUATION => {
                let Some((text, mut joined)) = self.joining.take() else {
                    return Err(ReadError::Protocol(
                        "a continuation frame without a message to continue",
                    ));
                };
                if joined.len() + payload.len() > self.max_message {
                    return Err(ReadError::TooLarge {
                        max: self.max_message,
                    });
                }
                joined.extend_from_slice(&payload);
                if fin {
                    return message(text, joined).map(Some);
                }
                self.joining = Some((text, joined));
                Ok(None)
            }
            OPCODE_PING => Ok(Some(Incoming::Ping(payload.freeze()))),
            OPCODE_PONG => Ok(Some(Incoming::Pong)),
            // The header check lets nothing else through.
            _ => close(&payload).map(Some),
        }
    }
}

fn message(text: bool, payload: BytesMut) -> Result<Incoming, ReadError> {
    if text && std::str::from_utf8(&payload).is_err() {
        return Err(ReadError::Protocol("invalid UTF-8 in a text message"));
    }
    Ok(Incoming::Message {
        text,
        payload: payload.freeze(),
    })
}

/// A Close frame's payload (RFC 6455 §5.5.1, §7.4): nothing, or a status
/// code a peer may send and a UTF-8 reason.
fn close(payload: &[u8]) -> Result<Incoming, ReadError> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(ReadError::Protocol("a close payload of one byte")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                return Err(ReadError::Protocol("a close code a peer may not send"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(ReadError::Protocol("invalid UTF-8 in a close reason"));
            }
            Ok(Incoming::Close(Some(code)))
        }
    }
}

/// XORs the payload with the client's mask key, four bytes at a time.
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let key = u32::from_ne_bytes(mask);
    let (words, rest) = payload.as_chunks_mut::<4>();
    for w in words {
        *w = (u32::from_ne_bytes(*w) ^ key).to_ne_bytes();
    }
    for (b, m) in rest.iter_mut().zip(mask) {
        *b ^= m;
    }
}

/// A client frame (masked with `mask`), as a client would send it (tests
/// and the fuzz target).
#[doc(hidden)]
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    let mut p = payload.to_vec();
    unmask(&mut p, mask);
    f.extend_from_slice(&p);
    f
}

/// The fuzz target `ws_read`: the input, read as what a client sent (in
/// reads cut where its first bytes say), never panics and hands up only
/// messages within the limit, text as UTF-8; and the input's tail sent as a
/// message in fragments (as many as its first byte says, each masked with
/// its next four) reads back as exactly that message.
#[doc(hidden)]
pub fn fuzz_reading(data: &[u8]) {
    let Some((&[sel, step, m0, m1, m2, m3], rest)) = data.split_first_chunk::<6>() else {
        return;
    };
    let max = 1024;
    let feed = |r: &mut Reader, mut bytes: &[u8]| -> Result<Vec<Incoming>, ReadError> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let buf = r.buffer();
            let room = buf.capacity() - buf.len();
            assert!(room > 0);
            let n = bytes.len().min(usize::from(step).max(1)).min(room);
            buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            while let Some(item) = r.next_incoming()? {
                out.push(item);
            }
        }
        Ok(out)
    };
    // Anything at all.
    let mut r = Reader::new(512, max);
    if let Ok(items) = feed(&mut r, rest) {
        for item in items {
            match item {
                Incoming::Message { text, payload } => {
                    assert!(payload.len() <= max);
                    assert!(!text || std::str::from_utf8(&payload).is_ok());
                }
                Incoming::Ping(p) => assert!(p.len() <= 125),
                Incoming::Pong | Incoming::Close(_) => {}
            }
        }
    }
    // A message in fragments, a ping between the first two.
    let text = sel & 1 == 0;
    let payload = if text {
        String::from_utf8_lossy(rest).into_owned().into_bytes()
    } else {
        rest.to_vec()
    };
    let pieces = 1 + usize::from(sel >> 1) % 8;
    let size = payload.len().div_ceil(pieces).max(1);
    let chunks: Vec<&[u8]> = if payload.is_empty() {
        vec![&[][..]]
    } else {
        payload.chunks(size).collect()
    };
    let mask = [m0, m1, m2, m3];
    let mut bytes = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let opcode = match (i, text) {
            (0, true) => OPCODE_TEXT,
            (0, false) => OPCODE_BINARY,
            _ => OPCODE_CONTINUATION,
        };
        bytes.extend(client_frame(i + 1 == chunks.len(), opcode, c, mask));
        if i == 0 {
            bytes.extend(client_frame(true, OPCODE_PING, &[sel], mask));
        }
    }
    let mut r = Reader::new(512, max.max(payload.len()));
    let got = feed(&mut r, &bytes).expect("a well-formed message reads");
    let pieces = chunks.len();
    let whole = Incoming::Message {
        text,
        payload: Bytes::from(payload.clone()),
    };
    let ping = Incoming::Ping(Bytes::copy_from_slice(&[sel]));
    match &got[..] {
        [Incoming::Ping(_), m] if pieces > 1 => assert_eq!(m, &whole),
        [m, Incoming::Ping(_)] if pieces == 1 => assert_eq!(m, &whole),
        other => panic!("{other:?}"),
    }
    assert!(got.contains(&ping));
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// Feeds `bytes` in reads of at most `step` bytes (and at most the room
    /// the buffer offers, as a socket read would), collecting every item.
    fn read_all(r: &mut Reader, mut bytes: &[u8], step: usize) -> Result<Vec<Incoming>, ReadError> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let buf = r.buffer();
            let room = buf.capacity() - buf.len();
            assert!(room > 0, "the buffer always offers room");
            let n = bytes.len().min(step.max(1)).min(room);
            buf.extend_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            while let Some(item) = r.next_incoming()? {
                out.push(item);
            }
        }
        Ok(out)
    }

    fn text(s: &str) -> Incoming {
        Incoming::Message {
            text: true,
            payload: Bytes::copy_from_slice(s.as_bytes()),
        }
    }

    #[test]
    fn the_rfc_examples_read_back() {
        // RFC 6455 §5.7: a masked "Hello", and "Hel" + "lo" fragmented.
        let masked = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let mut r = Reader::new(2048, 65536);
        assert_eq!(read_all(&mut r, &masked, 1), Ok(vec![text("Hello")]));
        let mut frames = client_frame(false, OPCODE_TEXT, b"Hel", MASK);
        frames.extend(client_frame(true, OPCODE_PING, b"?", MASK));
        frames.extend(client_frame(true, OPCODE_CONTINUATION, b"lo", MASK));
        assert_eq!(
            read_all(&mut r, &frames, 3),
            Ok(vec![
                Incoming::Ping(Bytes::from_static(b"?")),
                text("Hello")
            ])
        );
    }

    #[test]
    fn every_length_encoding_reads_back_whatever_the_reads() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = client_frame(true, OPCODE_BINARY, &payload, MASK);
            for step in [1, 7, 4096, bytes.len()] {
                if len > 70_000 && step < 4096 {
                    continue;
                }
                let mut r = Reader::new(2048, 1 << 20);
                let got = read_all(&mut r, &bytes, step).expect("reads");
                assert_eq!(
                    got,
                    vec![Incoming::Message {
                        text: false,
                        payload: Bytes::from(payload.clone())
                    }],
                    "len {len} step {step}"
                );
            }
        }
    }

    #[test]
    fn after_a_large_message_the_buffer_is_back_to_its_read_size() {
        let mut r = Reader::new(2048, 1 << 20);
        let big = client_frame(true, OPCODE_BINARY, &vec![7u8; 600_000], MASK);
        let got = read_all(&mut r, &big, 65_536).expect("reads");
        assert!(
            matches!(&got[..], [Incoming::Message { payload, .. }] if payload.len() == 600_000)
        );
        // Handled and dropped, as the session does: the next reads must not
        // take the large allocation back.
        drop(got);
        let after = client_frame(true, OPCODE_TEXT, b"after", MASK);
        assert_eq!(read_all(&mut r, &after, 4096), Ok(vec![text("after")]));
        assert!(r.capacity() <= 2048, "capacity {}", r.capacity());
        // And it stays so as small messages come and go.
        let small = client_frame(true, OPCODE_TEXT, b"x", MASK);
        for _ in 0..1000 {
            assert_eq!(read_all(&mut r, &small, 4096), Ok(vec![text("x")]));
            assert!(r.capacity() <= 2048, "capacity {}", r.capacity());
        }
        // Fragments of a large message are joined outside the buffer.
        let mut frag = client_frame(false, OPCODE_BINARY, &[1u8; 1500], MASK);
        for _ in 0..300 {
            frag.extend(client_frame(false, OPCODE_CONTINUATION, &[2u8; 1500], MASK));
        }
        frag.extend(client_frame(true, OPCODE_CONTINUATION, b"", MASK));
        let got = read_all(&mut r, &frag, 8192).expect("reads");
        let [Incoming::Message { payload, .. }] = &got[..] else {
            panic!("{got:?}");
        };
        assert_eq!(payload.len(), 301 * 1500);
        assert!(payload.is_unique());
        assert!(r.capacity() <= 2048, "capacity {}", r.capacity());
    }

    #[test]
    fn what_breaks_the_framing_rules_is_refused() {
        let max = 1000;
        let cases: Vec<(Vec<u8>, ReadError)> = vec![
            (
                {
                    let mut f = client_frame(true, OPCODE_TEXT, b"x", MASK);
                    f[0] |= 0x40;
                    f
                },
                ReadError::Protocol("reserved bits set (no extension was negotiated)"),
            ),
            (
                client_frame(true, 0x3, b"x", MASK),
                ReadError::Protocol("reserved opcode"),
            ),
            (
                client_frame(true, 0xB, b"", MASK),
                ReadError::Protocol("reserved opcode"),
            ),
            (
                vec![0x81, 0x01, b'x'],
                ReadError::Protocol("a client frame must be masked"),
            ),
            (
                client_frame(false, OPCODE_PING, b"", MASK),
                ReadError::Protocol("a control frame must not be fragmented"),
            ),
            (
                client_frame(true, OPCODE_PING, &[0; 126], MASK),
                ReadError::Protocol("a control frame's payload is at most 125 bytes"),
            ),
            (
                client_frame(true, OPCODE_CONTINUATION, b"x", MASK),
                ReadError::Protocol("a continuation frame without a message to continue"),
            ),
            (
                {
                    let mut f = client_frame(false, OPCODE_TEXT, b"x", MASK);
                    f.extend(client_frame(true, OPCODE_BINARY, b"y", MASK));
                    f
                },
                ReadError::Protocol("a new message began inside a fragmented one"),
            ),
            (
                client_frame(true, OPCODE_TEXT, &[0xff, 0xfe], MASK),
                ReadError::Protocol("invalid UTF-8 in a text message"),
            ),
            (
                client_frame(true, OPCODE_CLOSE, &[3], MASK),
                ReadError::Protocol("a close payload of one byte"),
            ),
            (
                client_frame(true, OPCODE_CLOSE, &1005u16.to_be_bytes(), MASK),
                ReadError::Protocol("a close code a peer may not send"),
            ),
            (
                client_frame(true, OPCODE_CLOSE, &[0x03, 0xe8, 0xff], MASK),
                ReadError::Protocol("invalid UTF-8 in a close reason"),
            ),
            (
                client_frame(true, OPCODE_BINARY, &[0; 1001], MASK),
                ReadError::TooLarge { max },
            ),
            (
                {
                    let mut f = client_frame(false, OPCODE_BINARY, &[0; 600], MASK);
                    f.extend(client_frame(true, OPCODE_CONTINUATION, &[0; 401], MASK));
                    f
                },
                ReadError::TooLarge { max },
            ),
            (
                // 2^63 + 1 in the 64-bit length.
                vec![0x82, 0xff, 0x80, 0, 0, 0, 0, 0, 0, 1],
                ReadError::Protocol("the most significant bit of a 64-bit length must be 0"),
            ),
            (
                // A length past the limit is refused before its payload comes.
                vec![0x82, 0xff, 0, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff],
                ReadError::TooLarge { max },
            ),
        ];
        for (bytes, want) in cases {
            let mut r = Reader::new(512, max);
            assert_eq!(read_all(&mut r, &bytes, 1), Err(want.clone()), "{bytes:x?}");
        }
    }

    /// The fuzz target's checks, on a few inputs.
    #[test]
    fn the_fuzz_checks_hold_on_samples() {
        for input in [
            &b"\x00\x01abcdhello"[..],
            b"\x07\x03\xff\x00\x10\x20\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
            b"\x0e\x40\x01\x02\x03\x04caf\xc3\xa9 \xf0\x9f\x98\x80 and more text to cut",
            b"\x01\x01\x00\x00\x00\x00",
        ] {
            fuzz_reading(input);
        }
    }

    #[test]
    fn close_frames_carry_their_code() {
        let mut r = Reader::new(512, 1000);
        let mut bytes = client_frame(true, OPCODE_CLOSE, b"", MASK);
        bytes.extend(client_frame(
            true,
            OPCODE_CLOSE,
            &[0x0f, 0xa0, b'o', b'k'],
            MASK,
        ));
        bytes.extend(client_frame(true, OPCODE_PONG, b"p", MASK));
        assert_eq!(
            read_all(&mut r, &bytes, 5),
            Ok(vec![
                Incoming::Close(None),
                Incoming::Close(Some(4000)),
                Incoming::Pong
            ])
        );
    }
}
