//! QUIC session-stream framing (PROTOCOL.md §2): a 4-byte big-endian length,
//! then that many bytes of MessagePack map.
//!
//! The decoder reads from a growing buffer, where "not enough bytes yet" is a
//! normal result, and refuses an oversized frame from its header alone,
//! before anything is allocated for its body.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Length of the frame header.
pub const HEADER_LEN: usize = 4;

/// A frame over the size limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("frame of {size} bytes exceeds the limit of {max} bytes")]
pub struct FrameTooLarge {
    pub size: usize,
    pub max: usize,
}

/// Prepends the length header to `payload`.
pub fn encode_frame(payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
    put_frame(&mut out, payload);
    out.freeze()
}

/// Appends one frame to `out`. Payloads are bounded by the message size
/// limit, far below `u32::MAX`; a longer one is clamped rather than panicking.
pub fn put_frame(out: &mut BytesMut, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.put_u32(len);
    out.put_slice(&payload[..len as usize]);
}

/// Splits frames off the front of a buffer.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max: usize,
}

impl FrameDecoder {
    pub fn new(max_frame: usize) -> Self {
        Self { max: max_frame }
    }

    /// The next complete frame's payload, `Ok(None)` when more bytes are
    /// needed, or an error when the announced length is over the limit.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Bytes>, FrameTooLarge> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > self.max {
            return Err(FrameTooLarge {
                size: len,
                max: self.max,
            });
        }
        if buf.len() < HEADER_LEN + len {
            buf.reserve(HEADER_LEN + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        Ok(Some(buf.split_to(len).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_at_any_boundary() {
        let mut wire = BytesMut::new();
        put_frame(&mut wire, b"hello");
        put_frame(&mut wire, b"");
        put_frame(&mut wire, b"world!");
        let dec = FrameDecoder::new(64);
        for cut in 0..wire.len() {
            let mut buf = BytesMut::new();
            let mut out = Vec::new();
            buf.extend_from_slice(&wire[..cut]);
            while let Some(f) = dec.decode(&mut buf).expect("within limit") {
                out.push(f);
            }
            buf.extend_from_slice(&wire[cut..]);
            while let Some(f) = dec.decode(&mut buf).expect("within limit") {
                out.push(f);
            }
            assert_eq!(out, vec![&b"hello"[..], &b""[..], &b"world!"[..]]);
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn oversized_frame_is_refused_from_its_header() {
        let dec = FrameDecoder::new(16);
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            dec.decode(&mut buf),
            Err(FrameTooLarge {
                size: u32::MAX as usize,
                max: 16
            })
        );
        assert!(buf.capacity() < 1024, "nothing allocated for the body");
    }
}
