//! Real `redis-server` processes for the cluster tests, started on free
//! loopback ports with nothing kept on disk, killed on `Drop` — never the
//! machine's own instance.
//!
//! [`TestRedis`] is one server; [`TestRedisCluster`] is three masters
//! joined with `redis-cli --cluster create`. Both wait until the server
//! answers (no sleeping until ready) and can be stopped and started again
//! on the same port (an outage), and both drive `redis-cli` for what a test
//! does to Redis from outside (`CLIENT KILL`, `FLUSHALL`, `INFO`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long a server may take to start.
const START: Duration = Duration::from_secs(20);

/// A port that was free a moment ago (redis-server cannot pick one
/// itself: `--port 0` turns TCP off). A start that loses the race retries.
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn redis_server() -> Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join("redis-server");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("redis-server not found (scripts/test installs Debian's redis-server)")
}

/// Runs `redis-cli -p port args…` and returns its output.
pub fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .context("running redis-cli")?;
    if !out.status.success() {
        bail!(
            "redis-cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One `redis-server` child process.
struct Server {
    child: Child,
    port: u16,
}

impl Server {
    /// Starts a server on `port` (or a free one) with `extra` flags, in
    /// `dir`; waits for "Ready to accept connections".
    fn start(port: Option<u16>, dir: &Path, extra: &[&str]) -> Result<Server> {
        if let Some(p) = port {
            return Self::try_start(p, dir, extra);
        }
        // A free port may be taken by the time the server binds it: retry.
        let mut last_err = None;
        for _ in 0..5 {
            match Self::try_start(free_port()?, dir, extra) {
                Ok(s) => return Ok(s),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("redis-server did not start")))
    }

    fn try_start(port: u16, dir: &Path, extra: &[&str]) -> Result<Server> {
        let mut child = Command::new(redis_server()?)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--protected-mode",
                "no",
                "--dir",
            ])
            .arg(dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawning redis-server")?;
        let stdout = child.stdout.take().context("redis-server stdout")?;
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if std::env::var_os("TETHER_TEST_LOG").is_some() {
                    eprintln!("[redis {port}] {line}");
                }
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + START;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("Ready to accept connections") => {
                    return Ok(Server { child, port });
                }
                Ok(line) if line.contains("Address already in use") => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("port {port} taken");
                }
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("redis-server on port {port} did not become ready");
                }
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One Redis server on a free port, nothing on disk, killed on drop.
pub struct TestRedis {
    server: Option<Server>,
    port: u16,
    dir: tempfile::TempDir,
}

impl TestRedis {
    pub fn start() -> Result<TestRedis> {
        let dir = tempfile::tempdir()?;
        let server = Server::start(None, dir.path(), &[])?;
        let port = server.port;
        Ok(TestRedis {
            server: Some(server),
            port,
            dir,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: an outage, or a crash).
    pub fn stop(&mut self) {
        if let Some(mut s) = self.server.take() {
            s.kill();
        }
    }

    /// Starts it again on the same port; it comes back empty (nothing is
    /// kept on disk).
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let deadline = Instant::now() + START;
        loop {
            match Server::try_start(self.port, self.dir.path(), &[]) {
                Ok(s) => {
                    self.server = Some(s);
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// `redis-cli` against this server.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        cli(self.port, args)
    }
}

/// A Redis Cluster of three masters (no replicas) on free ports.
pub struct TestRedisCluster {
    servers: Vec<Server>,
    _dir: tempfile::TempDir,
}

impl TestRedisCluster {
    pub fn start() -> Result<TestRedisCluster> {
        let dir = tempfile::tempdir()?;
        let mut servers = Vec::with_capacity(3);
        for i in 0..3 {
            let sub = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&sub)?;
            servers.push(Server::start(
                None,
                &sub,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )?);
        }
        let addrs: Vec<String> = servers
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        cli(servers[0].port, &args)?;
        let deadline = Instant::now() + START;
        for s in &servers {
            loop {
                let info = cli(s.port, &["CLUSTER", "INFO"])?;
                if info.contains("cluster_state:ok") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the cluster did not become ok:\n{info}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(TestRedisCluster { servers, _dir: dir })
    }

    pub fn ports(&self) -> Vec<u16> {
        self.servers.iter().map(|s| s.port).collect()
    }

    /// The seed list for `--redis-cluster`: every master's URL, comma separated.
    pub fn seeds(&self) -> String {
        self.ports()
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `redis-cli` against master `i`.
    pub fn cli(&self, i: usize, args: &[&str]) -> Result<String> {
        cli(self.servers[i].port, args)
    }
}
