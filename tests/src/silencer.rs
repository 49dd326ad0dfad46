//! A TCP proxy in front of a Redis that can make its pub/sub connections go
//! *silent*: still open, still accepting what the node sends, but passing
//! nothing back — what a pub/sub connection looks like after some Redis
//! failovers (centrifugo issue 1189). A connection counts as pub/sub once
//! the client sent it a `SUBSCRIBE`/`PSUBSCRIBE`/`SSUBSCRIBE`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// One proxied connection's flags.
#[derive(Default)]
struct Flags {
    pubsub: AtomicBool,
    silent: AtomicBool,
}

/// The proxy; stops (and drops every connection) on drop.
pub struct Silencer {
    pub addr: SocketAddr,
    conns: Arc<std::sync::Mutex<Vec<Arc<Flags>>>>,
    silenced: Arc<AtomicU64>,
    _task: JoinSet<()>,
}

impl Silencer {
    /// Proxies 127.0.0.1:<free port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Silencer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let conns: Arc<std::sync::Mutex<Vec<Arc<Flags>>>> = Arc::default();
        let mut task = JoinSet::new();
        {
            let conns = conns.clone();
            task.spawn(async move {
                let mut pumps = JoinSet::new();
                while let Ok((client, _)) = listener.accept().await {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let flags = Arc::new(Flags::default());
                    conns.lock().unwrap().push(flags.clone());
                    pumps.spawn(pump(client, server, flags));
                }
            });
        }
        Ok(Silencer {
            addr,
            conns,
            silenced: Arc::new(AtomicU64::new(0)),
            _task: task,
        })
    }

    /// `redis://<proxy>`
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Silences every pub/sub connection open now (later ones pass);
    /// returns how many.
    pub fn silence_pubsub(&self) -> usize {
        let conns = self.conns.lock().unwrap();
        let mut n = 0;
        for c in conns.iter() {
            if c.pubsub.load(Ordering::Acquire) {
                c.silent.store(true, Ordering::Release);
                n += 1;
            }
        }
        self.silenced.fetch_add(n as u64, Ordering::Relaxed);
        n
    }
}

async fn pump(client: TcpStream, server: TcpStream, flags: Arc<Flags>) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = {
        let flags = flags.clone();
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let upper = buf[..n].to_ascii_uppercase();
                if upper.windows(9).any(|w| w == b"SUBSCRIBE") {
                    flags.pubsub.store(true, Ordering::Release);
                }
                if sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if flags.silent.load(Ordering::Acquire) {
                continue; // swallowed: the connection stays open and mute
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
