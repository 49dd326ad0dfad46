//! Where the load goes: the loopback-only check on every address the load
//! tester is given, and the resolution of the WebSocket URL to one socket
//! address, done once before the run.
//!
//! This tool generates load; it must never be pointed at another machine. A
//! host that is not `127.x.x.x`, `localhost` or `::1` is refused up front.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use reqwest::Url;

/// Parses `url` and checks that its host is a loopback address.
pub fn loopback_url(url: &str, what: &str) -> Result<Url> {
    let parsed = Url::parse(url).with_context(|| format!("{what} {url:?} is not a URL"))?;
    let host = parsed
        .host_str()
        .with_context(|| format!("{what} {url:?} has no host"))?;
    if !is_loopback_host(host) {
        bail!(
            "{what} {url:?} targets {host:?}: the load tester only targets loopback \
             addresses (127.x.x.x, localhost, ::1)"
        );
    }
    Ok(parsed)
}

/// True for `localhost`, `127.0.0.0/8` and `::1` (brackets allowed).
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if bare.eq_ignore_ascii_case("localhost") {
        return true;
    }
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Checks that every `--source-ips` address is loopback and of the family
/// of the target.
pub fn check_source_ips(ips: &[IpAddr], target: SocketAddr) -> Result<()> {
    for ip in ips {
        if !ip.is_loopback() {
            bail!("--source-ips {ip} is not a loopback address (127.x.x.x or ::1)");
        }
        if ip.is_ipv4() != target.is_ipv4() {
            bail!("--source-ips {ip} is not of the same address family as the target {target}");
        }
    }
    Ok(())
}

/// The WebSocket endpoint, checked and resolved.
#[derive(Debug, Clone)]
pub struct Target {
    /// The URL, as sent in the upgrade request.
    pub url: String,
    /// The address every client connects to.
    pub addr: SocketAddr,
}

impl Target {
    /// Checks `url` (ws:// on a loopback host) and resolves it once.
    pub async fn resolve(url: &str) -> Result<Target> {
        let parsed = loopback_url(url, "--url")?;
        if parsed.scheme() != "ws" {
            bail!("--url {url:?}: only plain ws:// URLs are supported");
        }
        let host = parsed.host_str().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .filter(|a| a.ip().is_loopback())
            .collect();
        // Prefer IPv4: --source-ips are IPv4 loopback addresses in practice.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .with_context(|| format!("{host} resolves to no loopback address"))?;
        Ok(Target {
            url: parsed.to_string(),
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_hosts_pass() {
        for ok in [
            "127.0.0.1",
            "127.3.4.5",
            "localhost",
            "LOCALHOST",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "10.0.0.1",
            "192.168.1.1",
            "example.com",
            "0.0.0.0",
            "::",
            "8.8.8.8",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn urls_are_checked_by_host() {
        assert!(loopback_url("ws://127.0.0.1:8080/v1/ws", "--url").is_ok());
        assert!(loopback_url("http://localhost:8081", "--api").is_ok());
        assert!(loopback_url("ws://[::1]:8080/v1/ws", "--url").is_ok());
        let e = loopback_url("ws://10.1.2.3:8080/v1/ws", "--url").expect_err("not loopback");
        assert!(e.to_string().contains("only targets loopback"), "{e}");
        assert!(loopback_url("http://api.example.com/", "--api").is_err());
        assert!(loopback_url("not a url", "--api").is_err());
    }

    #[test]
    fn source_ips_must_be_loopback_and_of_the_target_family() {
        let v4: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(check_source_ips(&[ip("127.0.0.2"), ip("127.0.0.3")], v4).is_ok());
        assert!(check_source_ips(&[ip("10.0.0.2")], v4).is_err());
        assert!(check_source_ips(&[ip("::1")], v4).is_err());
    }

    #[tokio::test]
    async fn resolves_localhost_to_a_loopback_address() {
        let t = Target::resolve("ws://localhost:18080/v1/ws")
            .await
            .expect("resolves");
        assert!(t.addr.ip().is_loopback());
        assert_eq!(t.addr.port(), 18080);
        assert!(Target::resolve("wss://127.0.0.1/v1/ws").await.is_err());
    }
}
