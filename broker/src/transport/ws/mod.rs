//! WebSocket transport: the upgrade at `GET /v1/ws` with subprotocol
//! negotiation and explicit buffer limits, and frames ↔ protocol messages.
//!
//! tungstenite runs the upgrade handshake, and that is all. What the client
//! sends then the broker reads itself ([`read`]: framing, masking,
//! fragments, UTF-8, limits, control frames), in a buffer that goes back to
//! its read size after a large message. What the broker sends it frames
//! itself (RFC 6455 §5.2: a server frame is a 2–10 byte header and the
//! payload, unmasked), so that one encoded message goes out with a `writev`
//! and no copy, a batch of frames in one system call, and a frame can be
//! written straight from the hub's fan-out while the session idles
//! (`session::outbox`). Every byte written to the socket goes through that
//! one ordered path: the pong to a client's ping is queued by the session
//! like any other frame.

pub mod read;

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use tether_protocol::{CloseCode, Encoding};
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use self::read::{
    Incoming, OPCODE_BINARY, OPCODE_CLOSE, OPCODE_PONG, OPCODE_TEXT, ReadError, Reader,
};

use super::stream::ClientStream;
use super::{Inbound, Transport, TransportError};
use crate::outbox::{DirectWrite, Frame, Written};

/// The WebSocket endpoint path.
pub const PATH: &str = "/v1/ws";

/// How long a closed connection is read (and what it sends dropped) for
/// the client's own close, at most.
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// Bytes a closed connection may still send before it is cut off.
const LINGER_BYTES: usize = 1024 * 1024;

/// Limits of every WebSocket connection.
#[derive(Debug, Clone, Copy)]
pub struct WsLimits {
    /// The read buffer, allocated up front for each connection (so it
    /// dominates the memory of idle clients) and returned to this size
    /// after any larger frame.
    pub read_buffer: usize,
    /// The longest message (and frame) a client may send.
    pub max_message_size: usize,
}

pub fn ws_config(max_message_size: usize, read_buffer: usize) -> WsLimits {
    WsLimits {
        read_buffer,
        max_message_size,
    }
}

/// tungstenite's settings for the handshake, its only work here.
fn handshake_config(limits: WsLimits) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = 4096;
    c.write_buffer_size = 0;
    c.max_write_buffer_size = 64 * 1024;
    c.max_message_size = Some(limits.max_message_size);
    c.max_frame_size = Some(limits.max_message_size);
    c
}

/// Why an upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("websocket handshake failed: {0}")]
    Handshake(#[from] WsError),
    #[error("tls handshake failed: {0}")]
    Tls(#[from] std::io::Error),
}

fn error_response(status: StatusCode, body: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(body.to_owned()));
    *r.status_mut() = status;
    r
}

/// Runs the WebSocket handshake on an accepted socket: checks the path,
/// negotiates the subprotocol (§2) and applies the limits.
pub async fn accept(
    stream: TcpStream,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    limits: WsLimits,
) -> Result<WsTransport, UpgradeError> {
    let io = match tls {
        Some(acceptor) => ClientStream::Tls(Box::new(acceptor.accept(stream).await?)),
        None => ClientStream::Plain(Arc::new(stream)),
    };
    let mut chosen = Encoding::Json;
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != PATH {
            return Err(error_response(
                StatusCode::NOT_FOUND,
                "not found: the WebSocket endpoint is /v1/ws",
            ));
        }
        let offered: Vec<&str> = req
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        match Encoding::negotiate(offered.iter().copied()) {
            Some(enc) => {
                chosen = enc;
                if !offered.is_empty() {
                    resp.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static(enc.subprotocol()),
                    );
                }
                Ok(resp)
            }
            None => Err(error_response(
                StatusCode::BAD_REQUEST,
                "unsupported subprotocol: offer tether.v1.json or tether.v1.msgpack",
            )),
        }
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        io,
        callback,
        Some(handshake_config(limits)),
    )
    .await?;
    // tungstenite refuses bytes after the request before the upgrade is
    // answered (`JunkAfterRequest`), so its buffer holds nothing: from here
    // on the broker reads and writes the stream itself.
    Ok(WsTransport {
        stream: ws.into_inner(),
        reader: Reader::new(limits.read_buffer, limits.max_message_size),
        opcode: match chosen {
            Encoding::Json => OPCODE_TEXT,
            Encoding::MsgPack => OPCODE_BINARY,
        },
        encoding: chosen,
        partial: None,
        flushing: false,
        peer_closed: None,
    })
}

/// The longest server frame header: 2 bytes and a 64-bit length.
const MAX_HEADER: usize = 10;
/// Frames gathered into one `writev`.
const GATHER: usize = 64;

/// The header of an unmasked, final frame of `len` payload bytes
/// (RFC 6455 §5.2), and its length.
fn frame_header(opcode: u8, len: usize) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    h[0] = 0x80 | opcode;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if let Ok(len) = u16::try_from(len) {
        h[1] = 126;
        h[2..4].copy_from_slice(&len.to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// A frame's header as written: none for bytes already framed.
fn header_of(opcode: u8, frame: &Frame) -> ([u8; MAX_HEADER], usize) {
    if frame.raw {
        ([0; MAX_HEADER], 0)
    } else {
        frame_header(opcode, frame.bytes.len())
    }
}

/// What is left of `frame` once `written` bytes of its header and payload
/// are in the socket.
fn rest_of(frame: &Frame, header: &[u8], written: usize) -> Bytes {
    if written >= header.len() {
        frame.bytes.slice(written - header.len()..)
    } else {
        let mut b = BytesMut::with_capacity(header.len() - written + frame.bytes.len());
        b.extend_from_slice(&header[written..]);
        b.extend_from_slice(&frame.bytes);
        b.freeze()
    }
}

/// A whole (small) frame: its header and the payload made of `parts`.
fn whole_frame(opcode: u8, parts: &[&[u8]]) -> Bytes {
    let len = parts.iter().map(|p| p.len()).sum();
    let (h, hl) = frame_header(opcode, len);
    let mut b = BytesMut::with_capacity(hl + len);
    b.extend_from_slice(&h[..hl]);
    for p in parts {
        b.extend_from_slice(p);
    }
    b.freeze()
}

/// The Close frame answering a client's: its status code echoed (RFC 6455
/// §5.5.1), or an empty body when it gave none.
fn close_reply(code: Option<u16>) -> Bytes {
    match code {
        Some(c) => whole_frame(OPCODE_CLOSE, &[&c.to_be_bytes()]),
        None => whole_frame(OPCODE_CLOSE, &[]),
    }
}

/// A close frame with `code` and its reason.
fn close_frame(code: CloseCode) -> Bytes {
    let reason = code.reason().as_bytes();
    // Control frame payloads are at most 125 bytes.
    let reason = &reason[..reason.len().min(123)];
    whole_frame(OPCODE_CLOSE, &[&code.code().to_be_bytes(), reason])
}

/// An upgraded WebSocket connection.
pub struct WsTransport {
    stream: ClientStream,
    reader: Reader,
    encoding: Encoding,
    /// The opcode of this connection's messages (text for JSON, binary for
    /// MessagePack).
    opcode: u8,
    /// The rest of a frame the socket took in part: written before anything
    /// else.
    partial: Option<Bytes>,
    /// Bytes went into a TLS stream and a flush is owed.
    flushing: bool,
    /// The client's Close frame arrived, with this code (if it gave one):
    /// it is owed a Close frame back.
    peer_closed: Option<Option<u16>>,
}

fn read_error(e: ReadError) -> TransportError {
    match e {
        ReadError::TooLarge { .. } => TransportError::TooLarge,
        ReadError::Protocol(p) => TransportError::Protocol(p.into()),
    }
}

/// The pong owed for a ping with this payload (≤ 125 bytes).
fn pong(payload: &[u8]) -> Bytes {
    whole_frame(OPCODE_PONG, &[payload])
}

fn gone(e: io::Error) -> TransportError {
    TransportError::Gone(e.to_string())
}

impl WsTransport {
    fn stream(&mut self) -> Pin<&mut ClientStream> {
        Pin::new(&mut self.stream)
    }

    /// An item the client sent, as the session sees it.
    fn inbound(&mut self, item: Incoming) -> Result<Inbound, TransportError> {
        match item {
            Incoming::Message { text, payload } => match (self.encoding, text) {
                (Encoding::Json, true) | (Encoding::MsgPack, false) => {
                    Ok(Inbound::Message(payload))
                }
                (Encoding::MsgPack, true) => Err(TransportError::Protocol(
                    "text frame on the tether.v1.msgpack subprotocol".into(),
                )),
                (Encoding::Json, false) => Err(TransportError::Protocol(
                    "binary frame on the tether.v1.json subprotocol".into(),
                )),
            },
            Incoming::Ping(payload) => Ok(Inbound::Reply(pong(&payload))),
            Incoming::Pong => Ok(Inbound::Activity),
            Incoming::Close(code) => {
                self.peer_closed = Some(code);
                Ok(Inbound::Closed)
            }
        }
    }

    /// After our FIN: reads and drops what the client still sends, until
    /// it closes too, for at most [`LINGER`] and [`LINGER_BYTES`]. Closing
    /// a socket with unread bytes makes the kernel send a reset, which can
    /// destroy the close frame (and the `disconnect` before it) in the
    /// client's buffer: a client closed while flooding (4029, 4009) would
    /// never learn why.
    async fn linger(&mut self) {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 4096];
        let mut left = LINGER_BYTES;
        let drain = async {
            while left > 0 {
                match self.stream().read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// Writes what is left of a frame taken in part.
    fn poll_partial(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        while let Some(mut rest) = self.partial.take() {
            let n = match self.stream().poll_write(cx, &rest) {
                Poll::Ready(Ok(n)) => n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(gone(e))),
                Poll::Pending => {
                    self.partial = Some(rest);
                    return Poll::Pending;
                }
            };
            if n == 0 {
                return Poll::Ready(Err(gone(io::ErrorKind::WriteZero.into())));
            }
            self.flushing = true;
            rest.advance(n);
            if !rest.is_empty() {
                self.partial = Some(rest);
            }
        }
        Poll::Ready(Ok(()))
    }

    /// One `writev` of up to [`GATHER`] frames from the front of `frames`;
    /// frames written in full (or in part, the rest kept in `partial`) are
    /// handed to `sent`.
    fn poll_write_some(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut VecDeque<Frame>,
        sent: &mut dyn FnMut(Frame),
    ) -> Poll<Result<(), TransportError>> {
        let opcode = self.opcode;
        let count = frames.len().min(GATHER);
        let mut headers = [([0u8; MAX_HEADER], 0usize); GATHER];
        for (h, f) in headers.iter_mut().zip(frames.iter()) {
            *h = header_of(opcode, f);
        }
        let mut slices = [IoSlice::new(&[]); 2 * GATHER];
        for (i, f) in frames.iter().take(count).enumerate() {
            let (h, hl) = &headers[i];
            slices[2 * i] = IoSlice::new(&h[..*hl]);
            slices[2 * i + 1] = IoSlice::new(&f.bytes);
        }
        let n = match ready!(self.stream().poll_write_vectored(cx, &slices[..2 * count])) {
            Ok(0) => return Poll::Ready(Err(gone(io::ErrorKind::WriteZero.into()))),
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(gone(e))),
        };
        self.flushing = true;
        let mut left = n;
        for (h, hl) in headers.iter().take(count) {
            let Some(f) = frames.pop_front() else {
                break;
            };
            let total = hl + f.bytes.len();
            if left < total {
                self.partial = Some(rest_of(&f, &h[..*hl], left));
                sent(f);
                break;
            }
            left -= total;
            sent(f);
        }
        Poll::Ready(Ok(()))
    }
}

/// Writes frames straight to a plain TCP connection (see `session::outbox`).
struct DirectWs {
    stream: Arc<TcpStream>,
    opcode: u8,
}

impl DirectWrite for DirectWs {
    fn try_write(&self, frame: &Frame) -> Written {
        let (h, hl) = header_of(self.opcode, frame);
        let total = hl + frame.bytes.len();
        let bufs = [IoSlice::new(&h[..hl]), IoSlice::new(&frame.bytes)];
        // Straight to the socket, without tokio's readiness bookkeeping: a
        // stale "writable" is harmless here (the session's own writes clear
        // it when they meet a full socket), and this runs once per delivery.
        match socket2::SockRef::from(self.stream.as_ref()).send_vectored(&bufs) {
            Ok(n) if n == total => Written::All,
            Ok(0) | Err(_) => Written::Nothing,
            Ok(n) => Written::Part(Frame {
                bytes: rest_of(frame, &h[..hl], n),
                published_at: frame.published_at,
                delivery: frame.delivery,
                raw: true,
            }),
        }
    }
}

impl Transport for WsTransport {
    const NAME: &'static str = "ws";

    fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn direct(&self) -> Option<Box<dyn DirectWrite>> {
        match &self.stream {
            ClientStream::Plain(s) => Some(Box::new(DirectWs {
                stream: s.clone(),
                opcode: self.opcode,
            })),
            ClientStream::Tls(_) => None,
        }
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound, TransportError>> {
        loop {
            if let Some(item) = self.reader.next_incoming().map_err(read_error)? {
                return Poll::Ready(self.inbound(item));
            }
            let buf = self.reader.buffer();
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.stream),
                cx,
                buf
            )) {
                Ok(0) => return Poll::Ready(Ok(Inbound::Closed)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(gone(e))),
            }
        }
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut VecDeque<Frame>,
        sent: &mut dyn FnMut(Frame),
    ) -> Poll<Result<(), TransportError>> {
        loop {
            ready!(self.poll_partial(cx))?;
            if frames.is_empty() {
                break;
            }
            ready!(self.poll_write_some(cx, frames, sent))?;
        }
        if self.flushing {
            if let Err(e) = ready!(self.stream().poll_flush(cx)) {
                return Poll::Ready(Err(gone(e)));
            }
            self.flushing = false;
        }
        Poll::Ready(Ok(()))
    }

    async fn close(&mut self, code: CloseCode, last: Option<Bytes>) {
        let mut frames = VecDeque::with_capacity(2);
        if let Some(bytes) = last {
            frames.push_back(Frame::reply(bytes));
        }
        frames.push_back(Frame::raw(close_frame(code)));
        if poll_fn(|cx| self.poll_write(cx, &mut frames, &mut |_| {}))
            .await
            .is_ok()
        {
            // FIN after the close frame: the client reads both.
            let _ = poll_fn(|cx| self.stream().poll_shutdown(cx)).await;
            self.linger().await;
        }
    }

    async fn answer_close(&mut self) {
        let Some(code) = self.peer_closed.take() else {
            return; // the connection just ended: nobody to answer
        };
        let mut frames = VecDeque::from([Frame::raw(close_reply(code))]);
        if poll_fn(|cx| self.poll_write(cx, &mut frames, &mut |_| {}))
            .await
            .is_ok()
        {
            let _ = poll_fn(|cx| self.stream().poll_shutdown(cx)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        let (h, n) = frame_header(OPCODE_TEXT, 125);
        assert_eq!(&h[..n], &[0x81, 125]);
        let (h, n) = frame_header(OPCODE_BINARY, 126);
        assert_eq!(&h[..n], &[0x82, 126, 0, 126]);
        let (h, n) = frame_header(OPCODE_TEXT, 65_535);
        assert_eq!(&h[..n], &[0x81, 126, 0xff, 0xff]);
        let (h, n) = frame_header(OPCODE_TEXT, 65_536);
        assert_eq!(&h[..n], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn the_rest_of_a_frame_cut_in_its_header_keeps_the_header() {
        let f = Frame::reply(Bytes::from(vec![7u8; 300]));
        let (h, hl) = header_of(OPCODE_TEXT, &f);
        assert_eq!(hl, 4);
        let rest = rest_of(&f, &h[..hl], 1);
        assert_eq!(rest.len(), 3 + 300);
        assert_eq!(&rest[..3], &h[1..4]);
        let rest = rest_of(&f, &h[..hl], 10);
        assert_eq!(rest.len(), 294);
        assert!(rest_of(&Frame::raw(Bytes::from_static(b"abc")), &[], 1) == "bc");
    }

    #[test]
    fn a_client_close_is_answered_with_its_code() {
        assert_eq!(&close_reply(Some(1000))[..], &[0x88, 2, 0x03, 0xe8]);
        assert_eq!(&close_reply(None)[..], &[0x88, 0]);
    }

    #[test]
    fn close_frames_carry_the_code_and_reason() {
        let b = close_frame(CloseCode::ShuttingDown);
        assert_eq!(b[0], 0x88);
        let len = b[1] as usize;
        assert_eq!(len + 2, b.len());
        assert_eq!(u16::from_be_bytes([b[2], b[3]]), 4010);
        assert_eq!(&b[4..], CloseCode::ShuttingDown.reason().as_bytes());
    }
}

/// For the fuzz target `ws_frames` (fuzz/): the broker's own WebSocket
/// framing (it frames what it sends itself). A payload of any length and
/// opcode is framed, read back by an independent RFC 6455 §5.2 decoder
/// (final, unmasked, the shortest length encoding), and cut after any
/// number of written bytes: what is left is exactly the rest.
#[doc(hidden)]
pub fn fuzz_framing(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Some((cut, payload)) = rest.split_first_chunk::<2>() else {
        return;
    };
    let opcode = [OPCODE_TEXT, OPCODE_BINARY, OPCODE_CLOSE][usize::from(sel % 3)];
    // Repeat the payload to reach every length encoding (7, 16, 64 bits).
    let times = 1 + usize::from(sel / 3) % 40;
    let payload: Vec<u8> = payload.repeat(times);
    let frame = Frame {
        bytes: Bytes::from(payload.clone()),
        published_at: None,
        delivery: None,
        raw: false,
    };
    let (h, hl) = header_of(opcode, &frame);
    let header = &h[..hl];
    let mut whole = header.to_vec();
    whole.extend_from_slice(&payload);
    // Read back.
    assert_eq!(whole[0], 0x80 | opcode, "FIN and the opcode");
    assert_eq!(whole[1] & 0x80, 0, "a server frame is not masked");
    let (len, at) = match whole[1] & 0x7f {
        126 => (usize::from(u16::from_be_bytes([whole[2], whole[3]])), 4),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&whole[2..10]);
            let n = u64::from_be_bytes(b);
            assert!(n >> 63 == 0, "the most significant bit is 0");
            (usize::try_from(n).expect("fits"), 10)
        }
        n => (usize::from(n), 2),
    };
    assert_eq!(at, hl);
    assert_eq!(len, payload.len());
    // The shortest encoding.
    match at {
        4 => assert!(len >= 126),
        10 => assert!(len > 0xffff),
        _ => assert!(len < 126),
    }
    assert_eq!(&whole[at..], &payload[..]);
    // Any partial write leaves exactly the rest.
    let written = usize::from(u16::from_be_bytes(*cut)) % (whole.len() + 1);
    assert_eq!(&rest_of(&frame, header, written)[..], &whole[written..]);
}

#[cfg(test)]
mod framing_tests {
    /// The fuzz target's checks on the three length encodings.
    #[test]
    fn frames_of_every_length_encoding_read_back_and_cut_anywhere() {
        for (sel, cut, len) in [
            (0u8, 0u16, 5usize),
            (4, 3, 130),
            (119, 65_000, 1700),
            (2, 9, 0),
        ] {
            let mut input = vec![sel];
            input.extend_from_slice(&cut.to_be_bytes());
            input.extend(std::iter::repeat_n(b'z', len));
            super::fuzz_framing(&input);
        }
    }
}
