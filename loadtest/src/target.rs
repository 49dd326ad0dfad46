//! Where the load goes: the URLs the load tester is given, checked, and the
//! WebSocket URL resolved to one socket address, once, before the run.
//!
//! Any host may be targeted (an SRE points the load tester at a staging
//! deployment); the tests of this repository only ever target loopback.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use reqwest::Url;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

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
    /// For `wss://`: how to open TLS, and the name to verify.
    pub tls: Option<Tls>,
}

/// TLS for `wss://` targets.
#[derive(Clone)]
pub struct Tls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A TLS client configuration that trusts `ca` (PEM, one or more
/// certificates: a staging deployment's own CA or self-signed certificate)
/// or else the system's roots.
pub fn tls_connector(ca: Option<&Path>) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in root_certs(ca)? {
        roots
            .add(cert)
            .context("--tls-ca: not a usable certificate")?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// The certificates to trust: those of `ca` (PEM, one or more), or else
/// the system's roots (an error when there are none).
pub fn root_certs(ca: Option<&Path>) -> Result<Vec<CertificateDer<'static>>> {
    match ca {
        Some(path) => {
            let mut certs = Vec::new();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("--tls-ca {}: cannot read it", path.display()))?
            {
                certs.push(cert.with_context(|| format!("--tls-ca {}: not PEM", path.display()))?);
            }
            if certs.is_empty() {
                bail!("--tls-ca {}: no certificate in it", path.display());
            }
            Ok(certs)
        }
        None => {
            let found = rustls_native_certs::load_native_certs().certs;
            if found.is_empty() {
                bail!("no system root certificates found: give --tls-ca FILE");
            }
            Ok(found)
        }
    }
}

impl Target {
    /// Checks `url` (`ws://` or `wss://`, verified against `ca` or the
    /// system's roots) and resolves its host once.
    pub async fn resolve_with(url: &str, ca: Option<&Path>) -> Result<Target> {
        let parsed = parse_url(url, "--url")?;
        let secure = match parsed.scheme() {
            "ws" => false,
            "wss" => true,
            other => bail!("--url {url:?}: expected a ws:// or wss:// URL, not {other}://"),
        };
        let host = parsed.host_str().unwrap_or_default();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let port = parsed
            .port_or_known_default()
            .unwrap_or(if secure { 443 } else { 80 });
        let tls = if secure {
            let server_name = ServerName::try_from(bare.to_owned())
                .with_context(|| format!("--url {url:?}: {bare} is not a TLS server name"))?;
            Some(Tls {
                connector: tls_connector(ca)?,
                server_name,
            })
        } else {
            None
        };
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
            tls,
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
        let t = Target::resolve_with("ws://localhost:18080/v1/ws", None)
            .await
            .expect("resolves");
        assert!(t.addr.ip().is_loopback());
        assert_eq!(t.addr.port(), 18080);
        let t = Target::resolve_with("wss://localhost/v1/ws", None).await;
        // The system may have no roots here; either way, a wss target
        // carries TLS and defaults to port 443.
        if let Ok(t) = t {
            assert!(t.tls.is_some());
            assert_eq!(t.addr.port(), 443);
        }
        let e = Target::resolve_with("wss://localhost/v1/ws", Some(Path::new("/nonexistent.pem")))
            .await
            .expect_err("no such CA file");
        assert!(e.to_string().contains("--tls-ca"), "{e}");
        assert!(
            Target::resolve_with("http://127.0.0.1/v1/ws", None)
                .await
                .is_err()
        );
    }
}
