//! The QUIC side of the load tester: a few client endpoints (UDP sockets),
//! each carrying many connections, all pinning the broker's self-signed
//! certificate by its SHA-256 fingerprint.
//!
//! One UDP socket can carry any number of QUIC connections, but all their
//! datagrams then go through one socket's receive queue: a fan-out burst to
//! thousands of clients would overflow it and the kernel would drop
//! datagrams (seen as `RcvbufErrors` in `/proc/net/snmp`), turning into
//! retransmissions and latency that are the load tester's, not the
//! broker's. So clients are spread over one endpoint per
//! `--quic-clients-per-endpoint` (round-robin), and each socket gets
//! `--quic-socket-buffer` bytes of kernel buffer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{Context, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tether_client::{QuicOptions, ServerCert};

/// How QUIC clients reach the broker.
#[derive(Debug, Clone)]
pub struct QuicTarget {
    /// The nodes' QUIC addresses: client `i` on node `i mod n`.
    pub addrs: Vec<SocketAddr>,
    /// The TLS server name (the self-signed certificate is for `localhost`).
    pub server_name: String,
    endpoints: Vec<quinn::Endpoint>,
    /// Kernel buffer sizes as the kernel reports them (Linux doubles what
    /// was asked, for its bookkeeping), (receive, send), in bytes.
    pub socket_buffers: (usize, usize),
}

/// What the QUIC endpoints are made from.
#[derive(Debug, Clone)]
pub struct QuicSetup {
    /// One per node (at least one, all of one address family).
    pub addrs: Vec<SocketAddr>,
    /// The pinned certificate's fingerprint, or the roots to verify it by.
    pub cert: ServerCert,
    pub server_name: String,
    /// Clients in all.
    pub clients: usize,
    pub clients_per_endpoint: usize,
    /// Source addresses to bind endpoints to, round-robin (empty: loopback for a loopback target, else any).
    pub source_ips: Vec<IpAddr>,
    /// SO_RCVBUF / SO_SNDBUF asked for each socket; 0 keeps the kernel's.
    pub socket_buffer: usize,
}

/// How many endpoints `clients` need at `per_endpoint` each (at least one).
pub fn endpoint_count(clients: usize, per_endpoint: usize) -> usize {
    clients.div_ceil(per_endpoint.max(1)).max(1)
}

/// Checks a `--quic-fingerprint`: 64 hex digits (SHA-256), any case.
pub fn check_fingerprint(fp: &str) -> Result<String> {
    let fp = fp.trim();
    if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!(
            "--quic-fingerprint must be the 64 hex digits of the certificate's SHA-256 \
             (the broker logs it as fingerprint=<hex>), not {fp:?}"
        );
    }
    Ok(fp.to_ascii_lowercase())
}

impl QuicTarget {
    /// Creates the endpoints. Must run inside the Tokio runtime.
    pub fn new(setup: QuicSetup) -> Result<QuicTarget> {
        let Some(&first) = setup.addrs.first() else {
            bail!("no QUIC address (--quic-addr) to connect to");
        };
        if setup.addrs.iter().any(|a| a.is_ipv4() != first.is_ipv4()) {
            bail!("the --quic-addr addresses mix IPv4 and IPv6; give one family");
        }
        for &addr in &setup.addrs {
            crate::target::check_source_ips(&setup.source_ips, addr)?;
        }
        let count = endpoint_count(setup.clients, setup.clients_per_endpoint);
        // Loopback for a loopback target, else any address of the family.
        let default_ip = match (first.is_ipv4(), first.ip().is_loopback()) {
            (true, true) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            (true, false) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            (false, true) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            (false, false) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let mut endpoints = Vec::with_capacity(count);
        let mut socket_buffers = (0, 0);
        for j in 0..count {
            let ip = if setup.source_ips.is_empty() {
                default_ip
            } else {
                setup.source_ips[j % setup.source_ips.len()]
            };
            let bind = SocketAddr::new(ip, 0);
            let options = QuicOptions {
                server_name: setup.server_name.clone(),
                cert: setup.cert.clone(),
                bind: Some(bind),
            };
            let endpoint = tether_client::quic_endpoint(first, &options)
                .with_context(|| format!("creating a QUIC endpoint on {bind}"))?;
            if setup.socket_buffer > 0 {
                let (socket, sizes) = buffered_socket(bind, setup.socket_buffer)?;
                endpoint
                    .rebind(socket)
                    .with_context(|| format!("moving the QUIC endpoint to a socket on {bind}"))?;
                socket_buffers = sizes;
            }
            endpoints.push(endpoint);
        }
        Ok(QuicTarget {
            addrs: setup.addrs,
            server_name: setup.server_name,
            endpoints,
            socket_buffers,
        })
    }

    /// The endpoint client `index` connects through.
    pub fn endpoint(&self, index: usize) -> quinn::Endpoint {
        self.endpoints[index % self.endpoints.len()].clone()
    }

    /// The address of node `node` (`node mod` the nodes).
    pub fn addr(&self, node: usize) -> SocketAddr {
        self.addrs[node % self.addrs.len()]
    }

    pub fn endpoints(&self) -> usize {
        self.endpoints.len()
    }

    /// Waits (at most `limit`) until the endpoints have sent the closes of
    /// their connections, so that the broker sees them go at once.
    pub async fn wait_idle(&self, limit: std::time::Duration) {
        let all = futures_util::future::join_all(self.endpoints.iter().map(|e| e.wait_idle()));
        let _ = tokio::time::timeout(limit, all).await;
    }
}

/// A UDP socket bound to `bind` with receive and send buffers of `bytes`
/// (capped by the kernel at `net.core.rmem_max` / `wmem_max`); returns it
/// with the sizes the kernel reports.
fn buffered_socket(
    bind: SocketAddr,
    bytes: usize,
) -> Result<(std::net::UdpSocket, (usize, usize))> {
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))
        .context("creating a UDP socket")?;
    socket
        .set_recv_buffer_size(bytes)
        .context("setting SO_RCVBUF")?;
    socket
        .set_send_buffer_size(bytes)
        .context("setting SO_SNDBUF")?;
    socket
        .bind(&bind.into())
        .with_context(|| format!("binding a UDP socket to {bind}"))?;
    let sizes = (
        socket.recv_buffer_size().unwrap_or(0),
        socket.send_buffer_size().unwrap_or(0),
    );
    Ok((socket.into(), sizes))
}

impl QuicTarget {
    /// Local ports of the client endpoints.
    pub fn local_ports(&self) -> Vec<u16> {
        self.endpoints
            .iter()
            .filter_map(|e| e.local_addr().ok())
            .map(|a| a.port())
            .collect()
    }
}

/// Datagrams the kernel dropped at the UDP sockets bound to `ports` (the
/// `drops` column of `/proc/net/udp` and `/proc/net/udp6`), summed; `None`
/// when neither file can be read.
pub fn udp_socket_drops(ports: &[u16]) -> Option<u64> {
    let mut total = None;
    for file in ["/proc/net/udp", "/proc/net/udp6"] {
        if let Ok(text) = std::fs::read_to_string(file) {
            *total.get_or_insert(0) += parse_udp_drops(&text, ports);
        }
    }
    total
}

/// Sums the `drops` (last) column of the `/proc/net/udp` lines whose local
/// port is one of `ports`.
pub fn parse_udp_drops(table: &str, ports: &[u16]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            let local = cols.nth(1)?;
            let port = u16::from_str_radix(local.rsplit(':').next()?, 16).ok()?;
            if !ports.contains(&port) {
                return None;
            }
            cols.last()?.parse::<u64>().ok()
        })
        .sum()
}

/// UDP drop counters, read before and after a phase of a QUIC run.
#[derive(Debug, Clone, Copy)]
pub struct UdpDrops {
    broker: u64,
    clients: u64,
    machine: u64,
}

/// The drop counters of the broker's QUIC socket, of the load tester's
/// endpoints and of the whole machine; `None` over WebSocket.
pub fn udp_drops(transport: &crate::fleet::Transport) -> Option<UdpDrops> {
    let crate::fleet::Transport::Quic(q) = transport else {
        return None;
    };
    Some(UdpDrops {
        broker: udp_socket_drops(&q.addrs.iter().map(|a| a.port()).collect::<Vec<_>>())?,
        clients: udp_socket_drops(&q.local_ports())?,
        machine: udp_rcvbuf_errors()?,
    })
}

impl UdpDrops {
    /// Adds the drops between `before` and `after` to `r` (nothing over
    /// WebSocket).
    pub fn add_to(
        r: &mut crate::report::Report,
        before: Option<UdpDrops>,
        after: Option<UdpDrops>,
        when: &'static str,
    ) {
        let (Some(a), Some(b)) = (before, after) else {
            return;
        };
        r.text("udp_drops_window", "UDP drops counted", when);
        r.count(
            "udp_drops_broker",
            "UDP datagrams dropped at the broker's socket (buffer full)",
            b.broker.saturating_sub(a.broker),
        );
        r.count(
            "udp_drops_loadtest",
            "UDP datagrams dropped at the loadtest's sockets",
            b.clients.saturating_sub(a.clients),
        );
        r.count(
            "udp_rcvbuf_errors",
            "UDP receive-buffer drops, machine-wide (RcvbufErrors)",
            b.machine.saturating_sub(a.machine),
        );
    }
}

/// `RcvbufErrors` of the `Udp:` lines of `/proc/net/snmp`: datagrams the
/// kernel dropped, machine-wide, because a socket's receive buffer was full.
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/snmp").ok()?;
    parse_udp_rcvbuf_errors(&text)
}

pub fn parse_udp_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let header = udp.next()?;
    let values = udp.next()?;
    let col = header
        .split_whitespace()
        .position(|h| h == "RcvbufErrors")?;
    values.split_whitespace().nth(col)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_one_per_share_of_clients() {
        assert_eq!(endpoint_count(5_000, 1_000), 5);
        assert_eq!(endpoint_count(5_001, 1_000), 6);
        assert_eq!(endpoint_count(10, 1_000), 1);
        assert_eq!(endpoint_count(0, 1_000), 1);
        assert_eq!(endpoint_count(10, 0), 10);
    }

    #[test]
    fn fingerprints_are_64_hex_digits() {
        let fp = "AB".repeat(32);
        assert_eq!(check_fingerprint(&fp).expect("valid"), "ab".repeat(32));
        assert!(check_fingerprint("abc").is_err());
        assert!(check_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn reads_udp_receive_buffer_drops() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
                    Udp: 100 2 7 90 5 0 0 0 0\n";
        assert_eq!(parse_udp_rcvbuf_errors(snmp), Some(5));
        assert_eq!(parse_udp_rcvbuf_errors("Ip: x\n"), None);
    }

    #[test]
    fn reads_per_socket_drops() {
        let table = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
          1: 0100007F:483B 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 17\n\
          2: 0100007F:9C41 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0000000000000000 4\n\
          3: 0100007F:9C42 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4 2 0000000000000000 1\n";
        assert_eq!(parse_udp_drops(table, &[0x483B]), 17);
        assert_eq!(parse_udp_drops(table, &[0x9C41, 0x9C42]), 5);
        assert_eq!(parse_udp_drops(table, &[1]), 0);
    }

    #[tokio::test]
    async fn a_remote_target_gets_endpoints_on_any_address_and_a_family_check() {
        let setup = QuicSetup {
            addrs: vec!["10.0.0.1:8443".parse().expect("addr")],
            cert: ServerCert::Pinned("ab".repeat(32)),
            server_name: "localhost".into(),
            clients: 10,
            clients_per_endpoint: 1_000,
            source_ips: Vec::new(),
            socket_buffer: 0,
        };
        let t = QuicTarget::new(setup.clone()).expect("endpoints");
        assert_eq!(t.endpoints(), 1);
        let v6 = QuicSetup {
            source_ips: vec!["::1".parse().expect("ip")],
            ..setup.clone()
        };
        let e = QuicTarget::new(v6).expect_err("family");
        assert!(e.to_string().contains("address family"), "{e}");
        // Several nodes: client i on node i mod n, one family for all.
        let two = QuicSetup {
            addrs: vec![
                "10.0.0.1:8443".parse().expect("addr"),
                "10.0.0.2:8443".parse().expect("addr"),
            ],
            ..setup.clone()
        };
        let t = QuicTarget::new(two).expect("endpoints");
        assert_eq!(t.addr(3), "10.0.0.2:8443".parse().expect("addr"));
        let mixed = QuicSetup {
            addrs: vec![
                "10.0.0.1:8443".parse().expect("addr"),
                "[::1]:8443".parse().expect("addr"),
            ],
            ..setup.clone()
        };
        let e = QuicTarget::new(mixed).expect_err("mixed");
        assert!(e.to_string().contains("mix IPv4 and IPv6"), "{e}");
        let none = QuicSetup {
            addrs: Vec::new(),
            ..setup
        };
        assert!(QuicTarget::new(none).is_err());
    }

    #[tokio::test]
    async fn makes_buffered_endpoints_on_loopback() {
        let setup = QuicSetup {
            addrs: vec!["127.0.0.1:9".parse().expect("addr")],
            cert: ServerCert::Pinned("ab".repeat(32)),
            server_name: "localhost".into(),
            clients: 2_500,
            clients_per_endpoint: 1_000,
            source_ips: Vec::new(),
            socket_buffer: 256 * 1024,
        };
        let t = QuicTarget::new(setup).expect("endpoints");
        assert_eq!(t.endpoints(), 3);
        let local = t.endpoint(4).local_addr().expect("bound");
        assert!(local.ip().is_loopback(), "{local}");
        // Linux doubles what was asked for its own bookkeeping.
        assert!(t.socket_buffers.0 >= 256 * 1024, "{:?}", t.socket_buffers);
    }
}
