//! QUIC transport (PROTOCOL.md §2): a quinn endpoint with ALPN `tether/1`
//! and TLS 1.3; the client's first bidirectional stream is the session
//! stream, carrying 4-byte big-endian length-prefixed MessagePack maps.
//!
//! Nothing here keys a session by the peer's address: quinn validates a new
//! path and the session carries on when a phone changes network. Close codes
//! travel as QUIC application close codes.
//!
//! Memory: every QUIC connection holds its receive windows' worth of buffers
//! only while data is in flight, but quinn's defaults allow ~1.25 MB per
//! stream; the transport config below sizes them for many mostly idle
//! sessions (see `transport_config`). The session stream itself keeps no
//! buffer while idle: reads go through a buffer on the stack and only the
//! bytes of an unfinished frame are kept (`inbuf`), and the write buffer is
//! released once the stream has taken it.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use prometheus_client::metrics::counter::Counter;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, IdleTimeout, RecvStream, SendStream, VarInt};
use tether_protocol::frame::{FrameDecoder, put_frame};
use tether_protocol::{CloseCode, Encoding, QUIC_ALPN};
use tokio::io::ReadBuf;
use tracing::{debug, warn};

use super::tls::{CertStore, CountingTickets, Identity, SharedTicketKey, TlsError};
use super::{Inbound, Transport, TransportError};
use crate::config::Config;
use crate::outbox::Frame;

/// Bytes read from the stream at a time, into a buffer on the stack (not
/// kept between reads).
const READ_CHUNK: usize = 4096;

/// The transport parameters of every QUIC connection, sized for many mostly
/// idle sessions on mobile networks.
pub fn transport_config(
    max_message_size: usize,
    idle_timeout: Duration,
    keep_alive: Option<Duration>,
) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // One session stream per connection; extra bidirectional streams are
    // refused by flow control, unidirectional ones are not allowed at all.
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    // Room for one maximal message plus its header on the stream, and a
    // little more on the connection: the windows bound what a client can
    // make us buffer (defaults: 1.25 MB per stream, 15.6 MB per connection).
    let window = (max_message_size + 4 + 1024) as u32;
    t.stream_receive_window(VarInt::from_u32(window));
    t.receive_window(VarInt::from_u32(window.saturating_mul(2)));
    t.send_window(1024 * 1024);
    t.datagram_receive_buffer_size(None);
    t.datagram_send_buffer_size(0);
    t.crypto_buffer_size(4096);
    // No path MTU discovery: datagrams stay at QUIC's 1,200-byte minimum.
    // quinn keeps a transmit buffer per connection sized by the current MTU;
    // once discovery raises it (to 1,452 by default) the buffer doubles to
    // 2,400 B and stays, for every idle session. Push messages are far
    // below 1,200 bytes; a large one takes ~20 % more datagrams.
    t.mtu_discovery_config(None);
    if let Ok(idle) = IdleTimeout::try_from(idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(keep_alive);
    t
}

/// Builds the QUIC endpoint from the configuration, bound to `addr`;
/// `resumed` counts handshakes resumed from a session ticket.
pub fn endpoint(
    cfg: &Config,
    addr: SocketAddr,
    resumed: Counter,
    configured: Option<Arc<CertStore>>,
) -> Result<(Endpoint, Arc<CertStore>, bool), TlsError> {
    // The operator's certificate (shared with wss, reloadable), or a
    // self-signed one for this run.
    let (identity, certs) = match configured {
        Some(certs) => (None, certs),
        None => {
            let identity = Identity::load_or_generate(None, None)?;
            let certs = Arc::new(CertStore::new(&identity, None)?);
            (Some(identity), certs)
        }
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    // No 0-RTT (QUIC allows 0 or u32::MAX): tickets are stateless so that
    // nodes can share them, and rustls accepts early data only with
    // stateful resumption; the session would not act on early data before
    // the handshake completes anyway. See docs/protocol.md.
    tls.max_early_data_size = 0;
    let tickets: Arc<dyn rustls::server::ProducesTickets> = match &cfg.quic_ticket_key {
        Some(key) => Arc::new(SharedTicketKey::new(key.expose())?),
        None => rustls::crypto::aws_lc_rs::Ticketer::new()
            .map_err(|e| TlsError::Config(e.to_string()))?,
    };
    tls.ticketer = Arc::new(CountingTickets {
        inner: tickets,
        resumed,
    });
    tls.send_tls13_tickets = 2;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Config(e.to_string()))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(Arc::new(transport_config(
        cfg.max_message_size,
        cfg.quic_idle_timeout,
        cfg.quic_keep_alive,
    )));
    server.migration(true);
    let bind_error = |e: std::io::Error| {
        TlsError::Config(format!("cannot bind the QUIC listener on {addr}: {e}"))
    };
    let socket = udp_socket(addr).map_err(bind_error)?;
    let endpoint = Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(bind_error)?;
    Ok((endpoint, certs, identity.is_some()))
}

/// Kernel buffer asked for the QUIC listener's UDP socket, each way. With
/// the kernel's default (~208 KiB) the datagrams of a few thousand clients
/// arriving at once (a reconnect wave's handshakes, a mass close) overflow
/// it: 9,474 of 10,000 returning clients' datagrams were dropped in one
/// measured wave, each drop costing its client a 1 s retransmission.
/// Capped by `net.core.rmem_max` / `wmem_max`.
const UDP_BUFFER: usize = 4 * 1024 * 1024;

/// The listener's UDP socket, bound to `addr`, with [`UDP_BUFFER`] asked
/// each way; warns when the kernel gives less.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Asking more than the cap is not an error: the kernel gives the cap.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_BUFFER);
    socket.bind(&addr.into())?;
    // Linux reports twice what it granted (its bookkeeping).
    let (recv, send) = (
        socket.recv_buffer_size()? / 2,
        socket.send_buffer_size()? / 2,
    );
    if recv < UDP_BUFFER || send < UDP_BUFFER {
        warn!(
            recv_buffer = recv,
            send_buffer = send,
            asked = UDP_BUFFER,
            "the kernel caps the QUIC socket's buffers below what was asked: a reconnect wave \
             may overflow them (raise net.core.rmem_max and net.core.wmem_max)"
        );
    } else {
        debug!(
            recv_buffer = recv,
            send_buffer = send,
            "QUIC socket buffers"
        );
    }
    Ok(socket.into())
}

/// One QUIC connection's session stream.
pub struct QuicTransport {
    conn: Connection,
    send: SendStream,
    recv: RecvStream,
    /// The bytes of an unfinished frame; empty, without allocation, between
    /// frames.
    inbuf: BytesMut,
    decoder: FrameDecoder,
    /// Framed bytes handed to the stream but not yet accepted by it; no
    /// allocation once they all are.
    out: BytesMut,
    last_addr: SocketAddr,
    /// Counts sessions that continued from a new client address.
    migrations: Counter,
}

impl QuicTransport {
    pub fn new(
        conn: Connection,
        send: SendStream,
        recv: RecvStream,
        max_message_size: usize,
        migrations: Counter,
    ) -> Self {
        let last_addr = conn.remote_address();
        Self {
            conn,
            send,
            recv,
            inbuf: BytesMut::new(),
            decoder: FrameDecoder::new(max_message_size),
            out: BytesMut::new(),
            last_addr,
            migrations,
        }
    }

    fn note_path(&mut self) {
        let addr = self.conn.remote_address();
        if addr != self.last_addr {
            debug!(from = %self.last_addr, to = %addr, "client migrated");
            self.last_addr = addr;
            self.migrations.inc();
        }
    }

    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        while !self.out.is_empty() {
            let n = ready!(Pin::new(&mut self.send).poll_write(cx, &self.out))
                .map_err(|e| TransportError::Gone(e.to_string()))?;
            self.out.advance(n);
        }
        // An idle session holds no write buffer: quinn has copied the bytes
        // into its own send buffer.
        if self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl Transport for QuicTransport {
    const NAME: &'static str = "quic";

    fn encoding(&self) -> Encoding {
        Encoding::MsgPack
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Inbound, TransportError>> {
        loop {
            match self.decoder.decode(&mut self.inbuf) {
                Ok(Some(frame)) => {
                    self.note_path();
                    if self.inbuf.is_empty() {
                        // The frame keeps what it needs of the allocation;
                        // an idle session keeps none.
                        self.inbuf = BytesMut::new();
                    }
                    return Poll::Ready(Ok(Inbound::Message(frame)));
                }
                Ok(None) => {}
                Err(_) => return Poll::Ready(Err(TransportError::TooLarge)),
            }
            let mut chunk = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut chunk = ReadBuf::uninit(&mut chunk);
            if let Err(e) = ready!(self.recv.poll_read_buf(cx, &mut chunk)) {
                return Poll::Ready(Err(TransportError::Gone(e.to_string())));
            }
            if chunk.filled().is_empty() {
                return Poll::Ready(if self.inbuf.is_empty() {
                    Ok(Inbound::Closed)
                } else {
                    Err(TransportError::Protocol(
                        "stream ended inside a frame".into(),
                    ))
                });
            }
            // Exactly what arrived, or the announced frame's size once its
            // header has been seen (`decode` reserves it).
            self.inbuf.extend_from_slice(chunk.filled());
        }
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        frames: &mut VecDeque<Frame>,
        sent: &mut dyn FnMut(Frame),
    ) -> Poll<Result<(), TransportError>> {
        loop {
            ready!(self.poll_write_out(cx))?;
            if frames.is_empty() {
                return Poll::Ready(Ok(()));
            }
            // Batch: frame everything queued into one buffer, write once.
            while let Some(f) = frames.pop_front() {
                put_frame(&mut self.out, &f.bytes);
                sent(f);
            }
        }
    }

    async fn close(&mut self, code: CloseCode, last: Option<Bytes>) {
        if let Some(bytes) = last {
            put_frame(&mut self.out, &bytes);
        }
        let out = std::mem::take(&mut self.out);
        if !out.is_empty() && self.send.write_all(&out).await.is_ok() {
            let _ = self.send.finish();
            // Give the peer the chance to read the `disconnect` before the
            // connection close discards what is in flight.
            let _ = tokio::time::timeout(Duration::from_millis(500), self.send.stopped()).await;
        }
        self.conn
            .close(VarInt::from(code.code()), code.reason().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The listener's socket gets the buffer asked (or the kernel's cap),
    /// not the kernel's default.
    #[test]
    fn the_listener_socket_asks_for_big_buffers() {
        let socket = udp_socket("127.0.0.1:0".parse().expect("addr")).expect("bound");
        let cap = |f: &str| -> usize {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(usize::MAX)
        };
        let s = socket2::SockRef::from(&socket);
        let recv = s.recv_buffer_size().expect("SO_RCVBUF") / 2;
        let send = s.send_buffer_size().expect("SO_SNDBUF") / 2;
        assert_eq!(recv, UDP_BUFFER.min(cap("/proc/sys/net/core/rmem_max")));
        assert_eq!(send, UDP_BUFFER.min(cap("/proc/sys/net/core/wmem_max")));
    }
}
