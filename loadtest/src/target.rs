//! Where the load goes: the URLs the load tester is given, checked, and the
//! WebSocket URL resolved to one socket address, once, before the run.
//!
//! Any host may be targeted (an SRE points the load tester at a staging
//! deployment); the tests of this repository only ever target loopback.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, bail};
use reqwest::Url;

/// Parses `url`, which must name a host.
pub fn parse_url(url: &str, what: &str) -> Result<Url> {
    let parsed = Url::parse(url).with_context(|| format!("{what} {url:?} is not a URL"))?;
    if parsed.host_str().is_none_or(str::is_empty) {
        bail!("{what} {url:?} has no host");
    }
    Ok(parsed)
}

/// Checks that every `--source-ips` address is of the family of the target.
pub fn check_source_ips(ips: &[IpAddr], target: SocketAddr) -> Result<()> {
    for ip in ips {
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
    /// Checks `url` (`ws://`) and resolves its host once.
    pub async fn resolve(url: &str) -> Result<Target> {
        let parsed = parse_url(url, "--url")?;
        match parsed.scheme() {
            "ws" => {}
            "wss" => bail!(
                "--url {url:?}: wss:// is not supported by the load tester yet; target the \
                 broker's plain ws:// listener (or the backend side of the TLS proxy)"
            ),
            other => bail!("--url {url:?}: expected a ws:// URL, not {other}://"),
        }
        let host = parsed.host_str().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = parsed.port_or_known_default().unwrap_or(80);
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .collect();
        // Prefer IPv4: --source-ips are IPv4 addresses in practice.
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or_else(|| addrs.first())
            .copied()
            .with_context(|| format!("{host} resolves to no address"))?;
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
    fn urls_need_a_host() {
        assert!(parse_url("ws://127.0.0.1:8080/v1/ws", "--url").is_ok());
        assert!(parse_url("http://api.example.com/", "--api").is_ok());
        assert!(parse_url("ws://[::1]:8080/v1/ws", "--url").is_ok());
        assert!(parse_url("not a url", "--api").is_err());
        assert!(parse_url("unix:/tmp/x", "--api").is_err());
    }

    #[test]
    fn source_ips_must_be_of_the_target_family() {
        let v4: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(check_source_ips(&[ip("127.0.0.2"), ip("10.0.0.3")], v4).is_ok());
        assert!(check_source_ips(&[ip("::1")], v4).is_err());
    }

    #[tokio::test]
    async fn resolves_localhost_and_refuses_other_schemes() {
        let t = Target::resolve("ws://localhost:18080/v1/ws")
            .await
            .expect("resolves");
        assert!(t.addr.ip().is_loopback());
        assert_eq!(t.addr.port(), 18080);
        let e = Target::resolve("wss://127.0.0.1/v1/ws")
            .await
            .expect_err("wss");
        assert!(e.to_string().contains("wss:// is not supported"), "{e}");
        assert!(Target::resolve("http://127.0.0.1/v1/ws").await.is_err());
    }
}
