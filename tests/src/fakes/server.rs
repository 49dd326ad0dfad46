//! The HTTP server under the fakes: HTTP/2 cleartext (prior knowledge) for
//! APNs and FCM, HTTP/1.1 for the Web Push service (what a client speaks to
//! an `http://` URL without prior knowledge). Binds 127.0.0.1:0, serves a
//! [`Handler`] in a tokio task, can stop listening (connection refused,
//! open connections dropped) and listen again on the same port, and stops
//! on `Drop`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Answers one request.
pub(crate) trait Handler: Send + Sync + 'static {
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
}

/// The HTTP version a fake speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Proto {
    H2,
    Http1,
}

pub(crate) struct H2Server<H> {
    proto: Proto,
    addr: SocketAddr,
    handler: Arc<H>,
    connections: Arc<AtomicUsize>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl<H: Handler> H2Server<H> {
    pub(crate) async fn start(handler: Arc<H>) -> Result<Self> {
        Self::start_speaking(Proto::H2, handler).await
    }

    pub(crate) async fn start_speaking(proto: Proto, handler: Arc<H>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind 127.0.0.1:0")?;
        Self::serve_on(proto, listener, handler)
    }

    /// Serves on a listener the caller bound (to know the port first).
    pub(crate) fn start_on(listener: TcpListener, handler: Arc<H>) -> Result<Self> {
        Self::serve_on(Proto::H2, listener, handler)
    }

    fn serve_on(proto: Proto, listener: TcpListener, handler: Arc<H>) -> Result<Self> {
        let addr = listener.local_addr()?;
        let connections = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(proto, listener, handler.clone(), connections.clone()));
        Ok(Self {
            proto,
            addr,
            handler,
            connections,
            task: Mutex::new(Some(task)),
        })
    }

    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// TCP connections accepted so far.
    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Closes the listener and every open connection: new connections are
    /// refused until [`H2Server::resume`]. Returns once they are closed.
    pub(crate) async fn stop(&self) {
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.abort();
            let _ = task.await;
        }
    }

    /// Listens again on the same address.
    pub(crate) async fn resume(&self) -> Result<()> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .with_context(|| format!("rebind {}", self.addr))?;
        let task = tokio::spawn(serve(
            self.proto,
            listener,
            self.handler.clone(),
            self.connections.clone(),
        ));
        *self.task.lock().unwrap() = Some(task);
        Ok(())
    }
}

impl<H> Drop for H2Server<H> {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.task.lock()
            && let Some(task) = slot.take()
        {
            task.abort();
        }
    }
}

async fn serve<H: Handler>(
    proto: Proto,
    listener: TcpListener,
    handler: Arc<H>,
    connections: Arc<AtomicUsize>,
) {
    // Dropping this set (when the task is aborted) closes every connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                connections.fetch_add(1, Ordering::Relaxed);
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                conns.spawn(async move {
                    let service = service_fn(move |req| {
                        let handler = handler.clone();
                        async move { Ok::<_, Infallible>(handler.handle(req).await) }
                    });
                    let io = TokioIo::new(stream);
                    let _ = match proto {
                        Proto::H2 => http2::Builder::new(TokioExecutor::new())
                            .max_concurrent_streams(1000)
                            .serve_connection(io, service)
                            .await,
                        Proto::Http1 => http1::Builder::new().serve_connection(io, service).await,
                    };
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// A response with a body and content type.
pub(crate) fn response(status: u16, body: impl Into<Bytes>, json: bool) -> Response<Full<Bytes>> {
    let mut builder = Response::builder().status(status);
    if json {
        builder = builder.header("content-type", "application/json");
    }
    builder
        .body(Full::new(body.into()))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A scripted failure: for one token or every request, for a number of
/// requests or for ever.
#[derive(Debug, Clone)]
pub(crate) struct Rule<F> {
    pub token: Option<String>,
    pub remaining: Option<usize>,
    pub fault: F,
}

/// The first applicable rule's fault (token rules before global ones),
/// using up one of its requests.
pub(crate) fn take_fault<F: Clone>(rules: &mut Vec<Rule<F>>, token: &str) -> Option<F> {
    let pick = rules
        .iter()
        .position(|r| r.token.as_deref() == Some(token))
        .or_else(|| rules.iter().position(|r| r.token.is_none()))?;
    let rule = &mut rules[pick];
    let fault = rule.fault.clone();
    if let Some(n) = &mut rule.remaining {
        *n = n.saturating_sub(1);
        if *n == 0 {
            rules.remove(pick);
        }
    }
    Some(fault)
}
