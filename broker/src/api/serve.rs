//! The backend API's listener: HTTP/1.1 served by hyper with a timer, so
//! that a client cannot hold a connection open by sending slowly.
//!
//! `axum::serve` builds hyper without a timer, which leaves hyper's header
//! timeout unarmed: a request head sent one byte a minute kept its
//! connection (and task) forever. Here:
//!
//! - a request head must arrive within [`HEADER_TIMEOUT`] (hyper closes the
//!   connection otherwise; the same timer bounds an idle keep-alive
//!   connection waiting for its next request);
//! - a whole request, body and answer, within `--api-request-timeout`
//!   ([`REQUEST_TIMEOUT`] by default; 408);
//! - at most `max_connections` connections at once: past that, accepting
//!   pauses until one ends (the kernel's backlog holds the rest), so a
//!   flood costs queued SYNs, not tasks and buffers.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::ApiError;
use tether_protocol::ErrorCode;

/// Time for a request head (method, path, headers) to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time for a whole request (`--api-request-timeout`): its body
/// read and its answer made.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// API connections open at once (backends pool theirs; 1,024 is plenty).
pub const MAX_CONNECTIONS: usize = 1024;

/// Answers 408 when a request (its body included) takes longer than
/// `limit`.
pub async fn request_timeout(
    axum::extract::State(limit): axum::extract::State<Duration>,
    req: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            let mut r = ApiError::new(
                ErrorCode::BadRequest,
                format!("request not completed within {} s", limit.as_secs()),
            )
            .into_response();
            *r.status_mut() = axum::http::StatusCode::REQUEST_TIMEOUT;
            r
        }
    }
}

/// Serves `app` on `listener` until `stop`, then lets the requests in
/// flight finish (the caller bounds the whole with its shutdown timeout).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    stop: CancellationToken,
    max_connections: usize,
) {
    let permits = Arc::new(Semaphore::new(max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true);
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, most likely: wait instead of spinning.
                    warn!(error = %e, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "api connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    const GET: &[u8] = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";

    /// One request on `s`, its answer read (a short fixed body).
    async fn ask(s: &mut TcpStream) -> String {
        s.write_all(GET).await.expect("in a test");
        let mut buf = vec![0u8; 1024];
        let mut got = Vec::new();
        while !got.ends_with(b"ok") {
            let n = s.read(&mut buf).await.expect("in a test");
            assert!(n > 0, "closed before answering");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    /// Past the connection cap a new connection is not served (it waits in
    /// the kernel's backlog) until one of the open ones ends.
    #[tokio::test]
    async fn past_the_connection_cap_a_connection_waits_for_one_to_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("in a test");
        let addr = listener.local_addr().expect("in a test");
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(listener, app, stop.clone(), 2));
        let mut a = TcpStream::connect(addr).await.expect("in a test");
        let mut b = TcpStream::connect(addr).await.expect("in a test");
        assert!(ask(&mut a).await.starts_with("HTTP/1.1 200"));
        assert!(ask(&mut b).await.starts_with("HTTP/1.1 200"));
        // The third connects (backlog) and asks first...
        let mut c = TcpStream::connect(addr).await.expect("in a test");
        c.write_all(GET).await.expect("in a test");
        // ...then the barrier: two later requests on an admitted connection
        // are answered, and the third's still is not.
        ask(&mut a).await;
        ask(&mut a).await;
        let mut buf = [0u8; 64];
        assert!(
            matches!(c.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a third connection was served past a cap of 2"
        );
        // One ends: the third is served.
        drop(b);
        let mut got = Vec::new();
        while !got.ends_with(b"ok") {
            let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
                .await
                .expect("the third connection is served once one ends")
                .expect("in a test");
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
        stop.cancel();
        drop((a, c));
        server.await.expect("in a test");
    }
}
