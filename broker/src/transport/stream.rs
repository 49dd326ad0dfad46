//! The byte stream under a WebSocket: plain TCP, or TLS (wss) when the
//! broker has `--tls-cert` and `--tls-key`.
//!
//! A plain socket is shared (`Arc<TcpStream>`): the session's task reads and
//! writes it through readiness, and producers may write frames through to
//! it while the session idles (see `session::outbox`). Tokio's `TcpStream`
//! supports that: its `try_*` and `poll_*_ready` methods take `&self`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// A client connection's stream. The TLS state is boxed so that plain
/// connections do not pay for its size.
pub enum ClientStream {
    Plain(Arc<TcpStream>),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

fn poll_read_shared(
    s: &TcpStream,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    loop {
        ready!(s.poll_read_ready(cx))?;
        let unfilled = buf.initialize_unfilled();
        match s.try_read(unfilled) {
            Ok(n) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            // Readiness was stale and is now cleared: wait again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// `sendmsg` without waiting, keeping tokio's readiness right (a socket
/// that would block is marked so). `sendmsg` rather than `writev`: the
/// socket call skips the file layer's checks.
pub fn try_send_vectored(s: &TcpStream, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
    s.try_io(Interest::WRITABLE, || {
        socket2::SockRef::from(s).send_vectored(bufs)
    })
}

fn poll_write_shared(
    s: &TcpStream,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    loop {
        ready!(s.poll_write_ready(cx))?;
        match try_send_vectored(s, bufs) {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => poll_read_shared(s, cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => poll_write_shared(s, cx, &[io::IoSlice::new(buf)]),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(_) => Poll::Ready(Ok(())),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => {
                Poll::Ready(socket2::SockRef::from(s.as_ref()).shutdown(std::net::Shutdown::Write))
            }
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => poll_write_shared(s, cx, bufs),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(_) => true,
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The wss acceptor for `--tls-cert` / `--tls-key`.
pub fn tls_acceptor(
    certs: std::sync::Arc<super::tls::CertStore>,
) -> Result<tokio_rustls::TlsAcceptor, super::tls::TlsError> {
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| super::tls::TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}
