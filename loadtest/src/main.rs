//! `loadtest`: load scenarios against a Tether broker on this machine.
//!
//! - `idle`: broker memory per idle, subscribed connection;
//! - `fanout`: publish → deliver latency and broker CPU per delivery when one
//!   channel is fanned out to many subscribers;
//! - `connect-rate`: how fast clients connect and subscribe;
//! - `resume`: many clients dropped at once, messages published while they
//!   are away, then all resumed: is everything recovered, and how fast;
//! - `churn`: steady publishing while clients drop abruptly and resume,
//!   on one node or spread over a cluster's nodes, every delivery checked
//!   against the ledger of accepted publications;
//! - `soak`: churn for hours, the broker's memory sampled: growth per hour,
//!   p99 drift;
//! - `cluster`: churn over two or more nodes while the operator kills or
//!   drains them, the clients per node reported;
//! - `push`: publications to offline users through the push gateway to a
//!   fake APNs or FCM this process serves: pushes per second, publish → provider
//!   latency, pushes missing or repeated;
//! - `fake-apns`, `fake-fcm`: a fake push provider to point a broker at
//!   (both serve APNs and FCM paths; `fake-fcm` also writes the service
//!   account for the broker);
//! - `floor`: no broker: the CPU one loopback TCP send of one delivery costs
//!   its sender here, the floor under any server's CPU per delivery.
//!
//! `idle`, `fanout` and `connect-rate` run over WebSocket (`--transport ws`,
//! the default) or QUIC (`--transport quic --quic-addr … --quic-fingerprint
//! …`); `resume` over WebSocket.
//!
//! Every scenario prints a report for people on stdout (and with `--json` a
//! single JSON line after it), stops by itself, and is bounded by
//! `--timeout`. Progress and
//! warnings go to stderr (`LOADTEST_LOG=debug` for more).
//!
//! One process holds at most ~19,900 sockets and one loopback source address
//! has ~28,000 ephemeral ports: for bigger runs, give `--source-ips
//! 127.0.0.2,127.0.0.3,…` and start several processes, each with its share
//! of `--connections` (see BENCHMARKS.md).

// The report is this binary's output, and it goes to stdout.
#![allow(clippy::print_stdout)]

mod auth;
mod churn;
mod client;
mod connect_rate;
mod crew;
mod fanout;
mod faults;
mod fleet;
mod floor;
mod idle;
mod ledger;
mod live;
mod plot;
mod proc;
mod publisher;
mod push;
mod quic;
mod report;
mod resume;
mod sink;
mod target;
mod timeline;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use tether_protocol::Encoding;

use crate::crew::{Role, Share};
use crate::fleet::{FleetOptions, Transport};
use crate::report::Report;
use crate::target::Target;

#[derive(Debug, Parser)]
#[command(
    name = "loadtest",
    version,
    about = "Load scenarios against a Tether broker on this machine"
)]
struct Cli {
    /// Also give the report as one JSON line: `--json` prints it after the
    /// report, `--json=FILE` writes it to FILE.
    #[arg(
        long,
        global = true,
        num_args = 0..=1,
        require_equals = true,
        value_name = "FILE"
    )]
    json: Option<Option<std::path::PathBuf>>,
    /// Hard limit on the whole run, in seconds: past it the run is abandoned
    /// with an error (default 300; churn, soak and cluster: their
    /// --duration and --drain-timeout plus 300).
    #[arg(long, global = true, value_name = "SECS")]
    timeout: Option<u64>,
    /// Objective: exit 3 when the p99 publish → deliver latency is above this.
    #[arg(long, global = true, value_name = "MS")]
    max_p99_ms: Option<f64>,
    /// Objective: exit 3 when fewer deliveries a second were received.
    #[arg(long, global = true, value_name = "PER_SEC")]
    min_rate: Option<f64>,
    /// Objective (soak): exit 3 when the broker's memory grew faster than
    /// this, in MiB per hour.
    #[arg(long, global = true, value_name = "MIB")]
    max_memory_growth_mb_per_hour: Option<f64>,
    /// Objective: exit 3 when more connections failed than this.
    #[arg(long, global = true, value_name = "N")]
    max_connect_failures: Option<u64>,
    /// Spread the clients over N processes of this binary (idle, fanout,
    /// connect-rate, churn, soak, cluster): each under its own
    /// file-descriptor limit (~19,900 sockets on a default Linux box) and
    /// on its own threads. This process publishes, measures the broker and
    /// reports; the histograms of all are merged, and each worker checks
    /// its clients against this one's ledger.
    #[arg(long, global = true, default_value_t = 1, value_name = "N")]
    workers: usize,
    /// Which worker this process is (set by the first one for the others).
    #[arg(long, global = true, default_value_t = 0, hide = true)]
    worker_index: usize,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Broker RSS per idle, subscribed connection.
    Idle {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Distinct channels, client i on `idle:<i mod channels>` (default: one per connection).
        #[arg(long)]
        channels: Option<usize>,
        /// Seconds to wait, answering heartbeats, before reading the RSS again.
        #[arg(long, default_value_t = 5.0)]
        settle: f64,
        /// Backend API base URLs, one per node: without --broker-pid the
        /// broker's memory is read from their GET /metrics
        /// (`tether_resident_memory_bytes`, summed), from any machine.
        #[arg(long, value_delimiter = ',')]
        api: Vec<String>,
        /// Also draw the connecting as an SVG picture: setup time p99 and
        /// setups of each second, clients connected, the setup time
        /// distribution.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<std::path::PathBuf>,
    },
    /// One channel fanned out to many subscribers: latency and broker CPU.
    Fanout {
        #[command(flatten)]
        common: Common,
        /// Backend API base URL.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        api: String,
        /// Subscribers, all on one channel.
        #[arg(long, default_value_t = 5_000)]
        subscribers: usize,
        /// Publications per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Bytes of padding in each publication.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// The channel.
        #[arg(long, default_value = "fanout")]
        channel: String,
        /// Publications per request (> 1 uses POST /v1/publish/batch).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Publish requests in flight at most.
        #[arg(long, default_value_t = 32)]
        max_in_flight: usize,
        /// Seconds to wait for the last deliveries after publishing.
        #[arg(long, default_value_t = 10.0)]
        drain_timeout: f64,
        /// Also draw the run as an SVG picture: p99 and deliveries of each
        /// second, subscribers connected, the latency distribution.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<std::path::PathBuf>,
    },
    /// How fast clients connect and subscribe.
    ConnectRate {
        #[command(flatten)]
        common: Common,
        /// Connections to open.
        #[arg(long, default_value_t = 5_000)]
        connections: usize,
        /// Distinct channels (default: one per connection).
        #[arg(long)]
        channels: Option<usize>,
        /// Also draw the run as an SVG picture: setup time p99 and setups
        /// of each second, clients connected, the setup time distribution.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<std::path::PathBuf>,
    },
    /// Clients dropped at once and resumed: recovery and time to reconnect
    /// (one node).
    Resume {
        #[command(flatten)]
        common: Common,
        /// Backend API base URL.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        api: String,
        /// Clients, client i on its own channel `<prefix><i>`.
        #[arg(long, default_value_t = 10_000)]
        clients: usize,
        /// Messages published to each channel while its client is away.
        #[arg(long, default_value_t = 5)]
        missed: usize,
        /// Bytes of padding in each missed message.
        #[arg(long, default_value_t = 100)]
        payload: usize,
        /// Publications per POST /v1/publish/batch (at most 1000).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Reconnects started per second (default: unpaced).
        #[arg(long, default_value_t = 1_000_000.0)]
        reconnect_rate: f64,
        /// Reconnects in flight at once (TCP connect to `connected`).
        #[arg(long, default_value_t = 256)]
        reconnect_concurrency: usize,
        /// Seconds to wait for the broker to count the dropped connections
        /// gone (`tether_connections{transport="ws"}`, or `"quic"`, = 0 in GET /metrics).
        #[arg(long, default_value_t = 30.0)]
        drop_timeout: f64,
        /// Seconds a resumed client waits for its missed messages.
        #[arg(long, default_value_t = 20.0)]
        message_timeout: f64,
        /// Also draw the reconnect wave as an SVG picture: connect p99 and
        /// reconnects of each second, clients connected again, the connect
        /// time distribution.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<std::path::PathBuf>,
    },
    /// Steady publishing while clients drop abruptly and resume, every
    /// delivery checked against the ledger of accepted publications.
    ///
    /// --clients clients (WebSocket), client i on node i mod nodes of --url
    /// and channel <prefix><i mod --channels>. --rate publications a second
    /// for --duration seconds, round-robin over the channels and the --api
    /// URLs (idempotency key on each; a failed request is retried on the
    /// next API URL). Meanwhile --drop-rate clients a second drop their
    /// connection without a close handshake, stay away --away seconds and
    /// resume on the next node, naming the last offset they received;
    /// --storm-at drops them all at once. Connections the server closes
    /// (a drained or killed node) resume the same way. At the end every
    /// delivery is checked against the accepted answers: duplicated,
    /// reordered, declared lost (recovered: false) and silently lost; exit
    /// status 2 if anything was silently lost, duplicated or reordered.
    Churn {
        #[command(flatten)]
        args: ChurnArgs,
    },
    /// Hours of steady load: does memory or latency drift?
    ///
    /// `churn` for long (--duration default 3600 s, --drop-rate default 1/s)
    /// with the broker's resident memory sampled every --sample-every
    /// seconds, from --broker-pid (this machine) or else from each --api
    /// node's GET /metrics (`tether_resident_memory_bytes`, summed). Reports
    /// memory at the start and end and its growth per hour (least-squares
    /// slope), p99 latency over the first and the last tenth of the run,
    /// reconnects, and the ledger's verdict as churn does. Objective:
    /// --max-memory-growth-mb-per-hour (exit 3).
    Soak {
        #[command(flatten)]
        args: ChurnArgs,
        /// Seconds between memory samples.
        #[arg(long, default_value_t = 10.0)]
        sample_every: f64,
        /// PIDs of the nodes, when they run on this machine (else /metrics).
        #[arg(long, value_delimiter = ',', value_name = "PID,PID,…")]
        broker_pid: Vec<u32>,
    },
    /// `churn` over a cluster while the operator kills, drains or restarts
    /// nodes: at least two --url (one per node) and their --api.
    ///
    /// Clients start spread over the nodes; a client whose node closes it
    /// (4010 draining, a killed node) resumes on the next node. The report
    /// adds, per node, the clients on it at the end and the connections it
    /// ended, and the timeline the clients online per node each second, so
    /// the picture shows them moving. Nothing may be silently lost or
    /// duplicated however the nodes come and go (exit 2 otherwise).
    Cluster {
        #[command(flatten)]
        args: ChurnArgs,
    },

    /// Publications to offline users, through the push gateway, to a fake
    /// APNs that this process serves: pushes per second and publish →
    /// provider latency, every push matched to its publication.
    ///
    /// Start the broker with APNs configured (any .p8 key, key and team id,
    /// topic) and `--apns-endpoint http://<--sink>`. The scenario registers
    /// --users APNs devices (users loadtest-push-<i>, no live session),
    /// publishes --rate publications a second with a `push` object to their
    /// personal channels for --duration seconds, and waits for every push
    /// at the sink. Exit status 2 when an accepted publication was never
    /// pushed or pushed twice.
    Push {
        /// Backend API base URL.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        api: String,
        /// Key the backend API requires (Authorization: Bearer).
        #[arg(long, env = "TETHER_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Where the fake provider listens (HTTP/2 without TLS).
        #[arg(long, default_value = "127.0.0.1:8900")]
        sink: SocketAddr,
        /// The provider of the registered devices; the broker must have it
        /// configured, pointed at --sink.
        #[arg(long, value_enum, default_value = "apns")]
        provider: push::Provider,
        /// The service-account file the broker was given (FCM; written by
        /// `loadtest fake-fcm --write-service-account`): the sink checks the
        /// broker's grants against its key.
        #[arg(long, value_name = "FILE")]
        service_account: Option<std::path::PathBuf>,
        /// Users, one APNs device each.
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Publications per second.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Seconds of publishing.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds to wait for the last pushes after publishing.
        #[arg(long, default_value_t = 20.0)]
        drain_timeout: f64,
    },
    /// A fake APNs to point a broker at (`--apns-endpoint http://<listen>`,
    /// any .p8 key): HTTP/2 without TLS, answers every
    /// POST /3/device/{token} that carries channel and offset with 200 and
    /// counts it. One line a second on stderr; stops after --duration or on
    /// SIGINT/SIGTERM (--timeout does not apply) and reports pushes, pushes
    /// per second, repeats and refusals. The same listener also serves the
    /// FCM paths.
    FakeApns {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8900")]
        listen: SocketAddr,
        /// Seconds to serve (default: until SIGINT/SIGTERM).
        #[arg(long)]
        duration: Option<f64>,
    },
    /// A fake FCM (HTTP v1 and its OAuth2 token endpoint) to point a broker
    /// at: `--fcm-service-account FILE --fcm-endpoint http://<listen>`.
    ///
    /// `--write-service-account FILE` writes FILE (a fresh RSA key, project
    /// `loadtest`, token_uri http://<listen>/token) and exits; start the
    /// broker with it. Serving, give the same FILE as --service-account and
    /// grants are checked against its key; messages need an access token
    /// the sink issued, a device token and string data with channel and
    /// offset. Like fake-apns otherwise (both paths on one listener).
    FakeFcm {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8900")]
        listen: SocketAddr,
        /// Seconds to serve (default: until SIGINT/SIGTERM).
        #[arg(long)]
        duration: Option<f64>,
        /// The broker's service-account file: check grants against its key.
        #[arg(long, value_name = "FILE", conflicts_with = "write_service_account")]
        service_account: Option<std::path::PathBuf>,
        /// Write a service account for this sink to FILE and exit.
        #[arg(long, value_name = "FILE")]
        write_service_account: Option<std::path::PathBuf>,
    },
    /// No broker: the sender's CPU per loopback TCP send, the floor under any
    /// server's CPU per delivery on this machine.
    ///
    /// One thread holds the sending ends of --connections loopback TCP
    /// connections (TCP_NODELAY) and, --rate times a second for --duration
    /// seconds, writes --payload bytes to each in turn, nothing else; the
    /// receiving ends are tasks of this process that read and count bytes.
    /// The thread's own CPU time (utime + stime of /proc/thread-self/stat)
    /// over the rounds, divided by the sends, is the cost of one send as
    /// charged to the sender, the receiver's TCP input included (on loopback
    /// it runs in the sender's context). A server doing one write per
    /// delivery pays at least this per delivery. Both ends are in this
    /// process: at most 9,000 connections.
    Floor {
        /// Loopback TCP connections (at most 9,000).
        #[arg(long, default_value_t = 5_000)]
        connections: usize,
        /// Rounds per second; a round is one send to every connection.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Bytes per send (130: about one WebSocket frame of the fan-out
        /// benchmark, a 100-byte padding publication).
        #[arg(long, default_value_t = 130)]
        payload: usize,
        /// Seconds to wait for the receivers to have every byte after the
        /// last send.
        #[arg(long, default_value_t = 10.0)]
        drain_timeout: f64,
    },
}

/// The options of `churn`, `soak` and `cluster`.
#[derive(Debug, Args)]
struct ChurnArgs {
    /// Transport of the clients (QUIC: --quic-addr, one per node, and
    /// --quic-fingerprint).
    #[arg(long, value_enum, default_value = "ws")]
    transport: TransportArg,
    #[command(flatten)]
    quic: QuicArgs,
    /// WebSocket URLs (ws:// or wss://), one per node (comma-separated or repeated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/v1/ws"
    )]
    url: Vec<String>,
    /// For wss:// and QUIC without --quic-fingerprint: trust these PEM
    /// certificates instead of the system's roots.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// Backend API base URLs, one per node.
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8081")]
    api: Vec<String>,
    #[command(flatten)]
    auth: AuthArgs,
    /// WebSocket subprotocol.
    #[arg(long, value_enum, default_value = "json")]
    encoding: EncodingArg,
    /// Source addresses for client sockets, round-robin.
    #[arg(long, value_delimiter = ',', value_name = "IP,IP,…")]
    source_ips: Vec<IpAddr>,
    /// Clients.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// Channels, client i on channel i mod this.
    #[arg(long, default_value_t = 20)]
    channels: usize,
    /// Prefix of the channel names.
    #[arg(long, default_value = "churn:")]
    channel_prefix: String,
    /// Client connections started per second at the start.
    #[arg(long, default_value_t = 500.0)]
    connect_rate: f64,
    /// Publications per second, over all channels.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of publishing (churn and cluster: 10, soak: 3600).
    #[arg(long)]
    duration: Option<f64>,
    /// Bytes of padding in each publication.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Clients dropped per second, round-robin; 0: none (churn and
    /// cluster: 20, soak: 1).
    #[arg(long)]
    drop_rate: Option<f64>,
    /// Drop every client at once this many seconds into publishing.
    #[arg(long, value_name = "SECS")]
    storm_at: Option<f64>,
    /// How a dropped client leaves its connection: `close` (no goodbye:
    /// the socket is closed) or `silent` (left open, unread and unanswered,
    /// while the client resumes on a new one, as a phone that changed
    /// networks; the resume takes the session over).
    #[arg(long, value_enum, default_value = "close")]
    drop_mode: churn::DropMode,
    /// Seconds a dropped client stays away before it resumes.
    #[arg(long, default_value_t = 0.5)]
    away: f64,
    /// Seconds to wait, after publishing, for every client to catch up.
    #[arg(long, default_value_t = 20.0)]
    drain_timeout: f64,
    /// Do this to the deployment SECS seconds into publishing: COMMAND runs
    /// with `sh -c` on this machine (`kill -KILL PID`, `ssh node3 sudo
    /// systemctl restart tether`, …); repeat for several. Each one's time,
    /// exit status and output are reported and marked on --plot.
    #[arg(long = "fault", value_name = "SECS:COMMAND")]
    faults: Vec<faults::Fault>,
    /// Also draw the run as an SVG picture: p99 per second, deliveries/s
    /// and clients online over time, the latency distribution.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<std::path::PathBuf>,
}

impl ChurnArgs {
    /// The options of this worker's share of the run.
    async fn options(self, mode: churn::Mode, share: Share) -> Result<churn::ChurnOptions> {
        let soak = matches!(mode, churn::Mode::Soak(_));
        let transport = transport(
            self.transport,
            &self.url,
            &self.quic,
            self.tls_ca.as_deref(),
            &self.source_ips,
            share.range(self.clients).len(),
        )
        .await?;
        let duration = self.duration.unwrap_or(if soak { 3600.0 } else { 10.0 });
        Ok(churn::ChurnOptions {
            mode,
            transport,
            apis: self
                .api
                .iter()
                .map(|a| target::parse_url(a, "--api"))
                .collect::<Result<_>>()?,
            signer: self.auth.signer()?,
            api_key: self.auth.api_key,
            encoding: self.encoding.into(),
            source_ips: self.source_ips,
            clients: self.clients,
            channels: self.channels,
            channel_prefix: self.channel_prefix,
            connect_rate: self.connect_rate,
            rate: self.rate,
            duration: seconds(duration, "--duration")?,
            payload: self.payload,
            drop_rate: self.drop_rate.unwrap_or(if soak { 1.0 } else { 20.0 }),
            storm_at: self
                .storm_at
                .map(|s| seconds(s, "--storm-at"))
                .transpose()?,
            away: seconds(self.away, "--away")?,
            drop_mode: self.drop_mode,
            drain_timeout: seconds(self.drain_timeout, "--drain-timeout")?,
            plot: self.plot,
            faults: self.faults,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportArg {
    Ws,
    Quic,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum EncodingArg {
    Json,
    Msgpack,
}

impl From<EncodingArg> for Encoding {
    fn from(e: EncodingArg) -> Encoding {
        match e {
            EncodingArg::Json => Encoding::Json,
            EncodingArg::Msgpack => Encoding::MsgPack,
        }
    }
}

/// Options every scenario shares: where to connect and how fast.
#[derive(Debug, Args)]
struct Common {
    /// Transport of the clients.
    #[arg(long, value_enum, default_value = "ws")]
    transport: TransportArg,
    /// WebSocket URLs of the broker (ws:// or wss://): several nodes of a
    /// cluster, comma-separated or repeated: client i on node i mod nodes.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ws://127.0.0.1:8080/v1/ws"
    )]
    url: Vec<String>,
    /// For wss:// and QUIC without --quic-fingerprint: trust these PEM
    /// certificates (a staging CA or a self-signed certificate) instead of
    /// the system's roots.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
    /// WebSocket subprotocol: tether.v1.json or tether.v1.msgpack (QUIC
    /// always carries MessagePack).
    #[arg(long, value_enum, default_value = "json")]
    encoding: EncodingArg,
    #[command(flatten)]
    quic: QuicArgs,
    /// Source addresses to bind client sockets to, round-robin
    /// (each has ~28k ephemeral ports; with QUIC, the endpoints'
    /// addresses).
    #[arg(long, value_delimiter = ',', value_name = "IP,IP,…")]
    source_ips: Vec<IpAddr>,
    /// Client setups started per second, over all workers (resume: the first connections;
    /// the reconnect wave has --reconnect-rate).
    #[arg(long, default_value_t = 2000.0)]
    connect_rate: f64,
    /// Client setups in flight at once (over all workers); keep it at or
    /// below the broker's listen backlog, or a burst overflows it (SYN
    /// retried after 1 s).
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Retries of a failed setup (with backoff) before it counts as failed.
    #[arg(long, default_value_t = 3)]
    connect_retries: u32,
    /// Seconds one setup attempt may take.
    #[arg(long, default_value_t = 15.0)]
    attempt_timeout: f64,
    /// PIDs of the broker (one per node, when the nodes run on this
    /// machine), to read their RSS (/proc/PID/status) and CPU time
    /// (/proc/PID/stat), summed.
    #[arg(long, value_delimiter = ',', value_name = "PID,PID,…")]
    broker_pid: Vec<u32>,
    /// Prefix of the per-connection channel names (idle: `idle:`,
    /// connect-rate: `connect:`, resume: `resume:`).
    #[arg(long)]
    channel_prefix: Option<String>,
    #[command(flatten)]
    auth: AuthArgs,
}

impl Common {
    /// How to open this worker's share of `clients` clients.
    async fn fleet_options(&self, clients: usize, share: Share) -> Result<FleetOptions> {
        let transport = transport(
            self.transport,
            &self.url,
            &self.quic,
            self.tls_ca.as_deref(),
            &self.source_ips,
            share.range(clients).len(),
        )
        .await?;
        if !self.connect_rate.is_finite() || self.connect_rate <= 0.0 {
            anyhow::bail!("--connect-rate must be above 0");
        }
        Ok(FleetOptions {
            transport,
            encoding: self.encoding.into(),
            source_ips: self.source_ips.clone(),
            connect_rate: share.rate(self.connect_rate),
            // Each worker's part of it, as of the rate.
            concurrency: self.connect_concurrency.div_ceil(share.of.max(1)).max(1),
            retries: self.connect_retries,
            attempt_timeout: seconds(self.attempt_timeout, "--attempt-timeout")?,
            shards: None,
            signer: self.auth.signer()?,
        })
    }
}

/// Where `clients` clients connect: the WebSocket URLs, resolved once and
/// checked against the source addresses, or the QUIC endpoints.
async fn transport(
    kind: TransportArg,
    urls: &[String],
    quic: &QuicArgs,
    ca: Option<&std::path::Path>,
    source_ips: &[IpAddr],
    clients: usize,
) -> Result<Transport> {
    Ok(match kind {
        TransportArg::Ws => {
            let mut targets = Vec::with_capacity(urls.len());
            for url in urls {
                let target = Target::resolve_with(url, ca).await?;
                target::check_source_ips(source_ips, target.addr)?;
                targets.push(target);
            }
            Transport::Ws(targets.into())
        }
        TransportArg::Quic => Transport::Quic(quic.target(clients, source_ips, ca)?),
    })
}

/// Who the load tester is to the broker: the API key and the simulated
/// users' tokens (PROTOCOL.md §9, §10).
#[derive(Debug, Args)]
struct AuthArgs {
    /// Key the backend API requires (Authorization: Bearer).
    #[arg(long, env = "TETHER_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Shared secret to mint each client an HS256 token (sub = loadtest-<i>).
    #[arg(
        long,
        env = "TETHER_JWT_SECRET",
        hide_env_values = true,
        conflicts_with = "jwt_key"
    )]
    jwt_secret: Option<String>,
    /// Private key (PEM) to mint each client a token instead (the broker
    /// has the public key: --jwt-public-key).
    #[arg(long, value_name = "FILE")]
    jwt_key: Option<std::path::PathBuf>,
    /// The algorithm of --jwt-key.
    #[arg(long, default_value = "es256", value_parser = ["es256", "rs256"])]
    jwt_alg: String,
}

impl AuthArgs {
    /// How to sign the clients' tokens, if they need any.
    fn signer(&self) -> Result<Option<auth::Signer>> {
        Ok(match (&self.jwt_secret, &self.jwt_key) {
            (Some(s), _) => Some(auth::Signer::secret(s)),
            (None, Some(path)) => {
                let pem =
                    std::fs::read(path).with_context(|| format!("--jwt-key {}", path.display()))?;
                Some(auth::Signer::key(&pem, &self.jwt_alg)?)
            }
            (None, None) => None,
        })
    }
}

/// How QUIC clients reach the broker (`--transport quic`).
#[derive(Debug, Args)]
struct QuicArgs {
    /// QUIC addresses of the broker (UDP), one per node (comma-separated or
    /// repeated): client i on node i mod nodes.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8443")]
    quic_addr: Vec<SocketAddr>,
    /// SHA-256 fingerprint (hex) of the broker's self-signed certificate, as
    /// it logs it at start (`fingerprint=<hex>`). Without it the broker's
    /// certificate (--tls-cert) is verified against --tls-ca, or else the
    /// system's roots, for the name --quic-server-name.
    #[arg(long, value_name = "HEX")]
    quic_fingerprint: Option<String>,
    /// TLS server name for QUIC (the name the certificate is checked for).
    #[arg(long, default_value = "localhost")]
    quic_server_name: String,
    /// QUIC clients per client endpoint (UDP socket); clients are spread
    /// round-robin over ceil(clients / this) endpoints.
    #[arg(long, default_value_t = 1000)]
    quic_clients_per_endpoint: usize,
    /// Kernel receive and send buffer asked for each QUIC endpoint's socket,
    /// in bytes (capped by net.core.rmem_max / wmem_max; 0: kernel default).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    quic_socket_buffer: usize,
}

impl QuicArgs {
    /// The endpoints for `clients` clients, trusting the pinned fingerprint
    /// or else `ca` (or the system's roots). Must run inside the runtime.
    fn target(
        &self,
        clients: usize,
        source_ips: &[IpAddr],
        ca: Option<&std::path::Path>,
    ) -> Result<quic::QuicTarget> {
        let cert = match &self.quic_fingerprint {
            Some(fp) => tether_client::ServerCert::Pinned(quic::check_fingerprint(fp)?),
            None => tether_client::ServerCert::Roots(target::root_certs(ca).context(
                "--transport quic: no --quic-fingerprint, so the certificate is verified",
            )?),
        };
        quic::QuicTarget::new(quic::QuicSetup {
            addrs: self.quic_addr.clone(),
            cert,
            server_name: self.quic_server_name.clone(),
            clients,
            clients_per_endpoint: self.quic_clients_per_endpoint,
            source_ips: source_ips.to_vec(),
            socket_buffer: self.quic_socket_buffer,
        })
    }
}

/// A service-account file, as text.
fn read_account(path: std::path::PathBuf) -> Result<String> {
    std::fs::read_to_string(&path).with_context(|| format!("--service-account {}", path.display()))
}

fn seconds(v: f64, what: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v).with_context(|| format!("{what} {v} is not a number of seconds"))
}

async fn run(scenario: Scenario, share: Share) -> Result<Report> {
    let spread = matches!(
        scenario,
        Scenario::Idle { .. }
            | Scenario::Fanout { .. }
            | Scenario::ConnectRate { .. }
            | Scenario::Resume { .. }
            | Scenario::Churn { .. }
            | Scenario::Soak { .. }
            | Scenario::Cluster { .. }
    );
    if share.of > 1 && !spread {
        anyhow::bail!(
            "--workers is for idle, connect-rate, fanout, resume, churn, soak and cluster: \
             push holds no client connection (its load is HTTP publishes and the fake \
             provider, one process each), floor measures this machine"
        );
    }
    if share.index >= share.of.max(1) {
        anyhow::bail!("--worker-index {} of --workers {}", share.index, share.of);
    }
    // Workers 1.. are started by worker 0 (this process, unless it is one).
    let role = if spread {
        Role::start(share)?
    } else {
        Role::Solo
    };
    match scenario {
        Scenario::Idle {
            common,
            connections,
            channels,
            settle,
            api,
            plot,
        } => {
            let opts = idle::IdleOptions {
                plot,
                connections,
                channels,
                settle: seconds(settle, "--settle")?,
                broker_pids: common.broker_pid.clone(),
                metrics: api
                    .iter()
                    .map(|a| target::parse_url(a, "--api"))
                    .collect::<Result<_>>()?,
                channel_prefix: common
                    .channel_prefix
                    .clone()
                    .unwrap_or_else(|| "idle:".into()),
            };
            let fleet = common.fleet_options(connections, share).await?;
            idle::run(opts, fleet, role, share).await
        }
        Scenario::Fanout {
            common,
            api,
            subscribers,
            rate,
            duration,
            payload,
            channel,
            batch,
            max_in_flight,
            drain_timeout,
            plot,
        } => {
            let opts = fanout::FanoutOptions {
                plot,
                api_key: common.auth.api_key.clone(),
                subscribers,
                plan: publisher::PublishPlan {
                    api: target::parse_url(&api, "--api")?,
                    channel,
                    rate,
                    duration: seconds(duration, "--duration")?,
                    payload,
                    batch,
                    max_in_flight,
                },
                drain_timeout: seconds(drain_timeout, "--drain-timeout")?,
                broker_pids: common.broker_pid.clone(),
            };
            let fleet = common.fleet_options(subscribers, share).await?;
            fanout::run(opts, fleet, role, share).await
        }
        Scenario::ConnectRate {
            common,
            connections,
            channels,
            plot,
        } => {
            let opts = connect_rate::ConnectRateOptions {
                plot,
                connections,
                channels,
                channel_prefix: common
                    .channel_prefix
                    .clone()
                    .unwrap_or_else(|| "connect:".into()),
            };
            let fleet = common.fleet_options(connections, share).await?;
            connect_rate::run(opts, fleet, role, share).await
        }
        Scenario::Resume {
            common,
            api,
            clients,
            missed,
            payload,
            batch,
            reconnect_rate,
            reconnect_concurrency,
            drop_timeout,
            message_timeout,
            plot,
        } => {
            if !reconnect_rate.is_finite() || reconnect_rate <= 0.0 {
                anyhow::bail!("--reconnect-rate must be above 0");
            }
            let opts = resume::ResumeOptions {
                plot,
                api_key: common.auth.api_key.clone(),
                api: target::parse_url(&api, "--api")?,
                clients,
                missed,
                payload,
                batch,
                reconnect_rate,
                reconnect_concurrency: reconnect_concurrency.max(1),
                drop_timeout: seconds(drop_timeout, "--drop-timeout")?,
                message_timeout: seconds(message_timeout, "--message-timeout")?,
                broker_pids: common.broker_pid.clone(),
                channel_prefix: common
                    .channel_prefix
                    .clone()
                    .unwrap_or_else(|| "resume:".into()),
            };
            resume::run(
                opts,
                common.fleet_options(clients, share).await?,
                role,
                share,
            )
            .await
        }
        Scenario::Churn { args } => {
            churn::run(args.options(churn::Mode::Churn, share).await?, role, share).await
        }
        Scenario::Cluster { args } => {
            let nodes = match args.transport {
                TransportArg::Ws => args.url.len(),
                TransportArg::Quic => args.quic.quic_addr.len(),
            };
            if nodes < 2 || args.api.len() < 2 {
                anyhow::bail!(
                    "the cluster scenario needs at least two --url (or --quic-addr) and two \
                     --api, one per node"
                );
            }
            churn::run(
                args.options(churn::Mode::Cluster, share).await?,
                role,
                share,
            )
            .await
        }
        Scenario::Soak {
            args,
            sample_every,
            broker_pid,
        } => {
            let soak = churn::Soak {
                sample_every: seconds(sample_every, "--sample-every")?,
                broker_pids: broker_pid,
            };
            if soak.sample_every.is_zero() {
                anyhow::bail!("--sample-every must be above 0");
            }
            churn::run(
                args.options(churn::Mode::Soak(soak), share).await?,
                role,
                share,
            )
            .await
        }
        Scenario::Push {
            api,
            api_key,
            sink,
            provider,
            service_account,
            users,
            rate,
            duration,
            drain_timeout,
        } => {
            push::run(push::PushOptions {
                api: target::parse_url(&api, "--api")?,
                api_key,
                sink,
                provider,
                account: service_account.map(read_account).transpose()?,
                users,
                rate,
                duration: seconds(duration, "--duration")?,
                drain_timeout: seconds(drain_timeout, "--drain-timeout")?,
            })
            .await
        }
        Scenario::FakeApns { listen, duration } => {
            let duration = duration.map(|d| seconds(d, "--duration")).transpose()?;
            sink::serve(listen, None, duration).await
        }
        Scenario::FakeFcm {
            listen,
            duration,
            service_account,
            write_service_account,
        } => {
            if let Some(path) = write_service_account {
                std::fs::write(&path, sink::service_account(listen)?)
                    .with_context(|| format!("--write-service-account {}", path.display()))?;
                let mut r = Report::new("fake-fcm");
                r.text(
                    "service_account",
                    "service account written",
                    path.display().to_string(),
                );
                r.text(
                    "broker_flags",
                    "start the broker with",
                    format!(
                        "--fcm-service-account {} --fcm-endpoint http://{listen}",
                        path.display()
                    ),
                );
                return Ok(r);
            }
            let duration = duration.map(|d| seconds(d, "--duration")).transpose()?;
            let account = service_account.map(read_account).transpose()?;
            sink::serve(listen, account.as_deref(), duration).await
        }
        Scenario::Floor {
            connections,
            rate,
            duration,
            payload,
            drain_timeout,
        } => {
            let opts = floor::FloorOptions {
                connections,
                rate,
                duration: seconds(duration, "--duration")?,
                payload,
                drain_timeout: seconds(drain_timeout, "--drain-timeout")?,
            };
            floor::run(opts).await
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("LOADTEST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    // Every socket is a file descriptor: take all the kernel allows.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "file descriptors"),
        Err(e) => tracing::warn!("could not raise the file-descriptor limit: {e}"),
    }
    let share = Share {
        index: cli.worker_index,
        of: cli.workers.max(1),
    };
    // A fake provider serves until it is stopped.
    let limit = match &cli.scenario {
        Scenario::FakeApns { .. } | Scenario::FakeFcm { .. } => Duration::MAX,
        _ if let Some(t) = cli.timeout => Duration::from_secs(t),
        Scenario::Churn { args } | Scenario::Cluster { args } | Scenario::Soak { args, .. } => {
            let soak = matches!(cli.scenario, Scenario::Soak { .. });
            let run = args.duration.unwrap_or(if soak { 3600.0 } else { 10.0 });
            Duration::try_from_secs_f64(run + args.drain_timeout + 300.0).unwrap_or(Duration::MAX)
        }
        _ => Duration::from_secs(300),
    };
    let objectives = Objectives {
        max_p99_ms: cli.max_p99_ms,
        min_rate: cli.min_rate,
        max_connect_failures: cli.max_connect_failures,
        max_memory_growth: cli.max_memory_growth_mb_per_hour,
    };
    let outcome = tokio::time::timeout(limit, run(cli.scenario, share)).await;
    if share.index > 0 {
        // A member: the leader reports; its exit status says if this one failed.
        return match outcome {
            Ok(Ok(_)) => ExitCode::SUCCESS,
            Ok(Err(e)) => {
                eprintln!("loadtest worker {}: {e:#}", share.index);
                ExitCode::from(report::EXIT_ERROR)
            }
            Err(_) => ExitCode::from(report::EXIT_ERROR),
        };
    }
    match outcome {
        Ok(Ok(report)) => {
            print!("{}", report.render());
            let missed = objectives.missed(&report);
            for m in &missed {
                println!("OBJECTIVE MISSED: {m}");
            }
            match &cli.json {
                None => {}
                Some(None) => println!("{}", report.json_line()),
                Some(Some(path)) => {
                    if let Err(e) = std::fs::write(path, report.json_line() + "\n") {
                        eprintln!("loadtest: writing {}: {e}", path.display());
                        return ExitCode::from(report::EXIT_ERROR);
                    }
                }
            }
            if !report.violations().is_empty() {
                eprintln!(
                    "loadtest: the delivery contract was broken: {}",
                    report.violations().join(" | ")
                );
                ExitCode::from(report::EXIT_VIOLATION)
            } else if !missed.is_empty() {
                eprintln!("loadtest: objectives missed: {}", missed.join(" | "));
                ExitCode::from(report::EXIT_SLO)
            } else {
                ExitCode::SUCCESS
            }
        }
        Ok(Err(e)) => {
            eprintln!("loadtest: {e:#}");
            ExitCode::from(report::EXIT_ERROR)
        }
        Err(_) => {
            eprintln!(
                "loadtest: the run did not finish within --timeout {:.0} s; abandoned",
                limit.as_secs_f64()
            );
            ExitCode::from(report::EXIT_ERROR)
        }
    }
}

/// The objectives given on the command line.
#[derive(Debug, Default)]
struct Objectives {
    max_p99_ms: Option<f64>,
    min_rate: Option<f64>,
    max_connect_failures: Option<u64>,
    max_memory_growth: Option<f64>,
}

impl Objectives {
    /// One line per objective the report misses (or cannot show).
    fn missed(&self, r: &Report) -> Vec<String> {
        let mut out = Vec::new();
        let mut check = |key: &str, limit: Option<f64>, above: bool, what: &str| {
            let Some(limit) = limit else { return };
            match r.get(key).and_then(serde_json::Value::as_f64) {
                None => out.push(format!("{what}: this run has no {key} figure")),
                Some(v) if above && v > limit => out.push(format!("{what}: {key} {v} > {limit}")),
                Some(v) if !above && v < limit => out.push(format!("{what}: {key} {v} < {limit}")),
                Some(_) => {}
            }
        };
        check("latency_p99_ms", self.max_p99_ms, true, "--max-p99-ms");
        check("deliveries_per_second", self.min_rate, false, "--min-rate");
        check(
            "connect_failures",
            self.max_connect_failures.map(|n| n as f64),
            true,
            "--max-connect-failures",
        );
        check(
            "memory_growth_mb_per_hour",
            self.max_memory_growth,
            true,
            "--max-memory-growth-mb-per-hour",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objectives_are_checked_against_the_report() {
        let mut r = Report::new("fanout");
        r.number("latency_p99_ms", "p99", 12.5, "ms", 3);
        r.number("deliveries_per_second", "rate", 900.0, "/s", 0);
        assert!(Objectives::default().missed(&r).is_empty());
        let o = Objectives {
            max_p99_ms: Some(20.0),
            min_rate: Some(800.0),
            max_connect_failures: None,
            max_memory_growth: None,
        };
        assert!(o.missed(&r).is_empty());
        let o = Objectives {
            max_p99_ms: Some(10.0),
            min_rate: Some(1000.0),
            max_connect_failures: Some(0),
            max_memory_growth: None,
        };
        let missed = o.missed(&r);
        assert_eq!(missed.len(), 3, "{missed:?}");
        assert!(missed[0].contains("12.5 > 10"), "{missed:?}");
        assert!(missed[2].contains("no connect_failures"), "{missed:?}");
    }
}
