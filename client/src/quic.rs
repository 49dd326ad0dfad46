//! The QUIC side of the client: endpoint, TLS with certificate pinning for
//! development servers, the session stream.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use tether_protocol::QUIC_ALPN;

use crate::{ClientError, FrameReader};

/// How the client checks the server's certificate.
#[derive(Debug, Clone)]
pub enum ServerCert {
    /// Trust exactly the certificate with this SHA-256 fingerprint (hex), as
    /// logged by a development broker with a self-signed certificate.
    Pinned(String),
    /// Trust certificates signed by these roots (DER).
    Roots(Vec<CertificateDer<'static>>),
}

/// Options of a QUIC connection.
#[derive(Debug, Clone)]
pub struct QuicOptions {
    pub server_name: String,
    pub cert: ServerCert,
    /// Local address to bind (default: an ephemeral port on the matching family).
    pub bind: Option<SocketAddr>,
}

impl QuicOptions {
    pub fn pinned(server_name: &str, fingerprint: &str) -> Self {
        Self {
            server_name: server_name.to_owned(),
            cert: ServerCert::Pinned(fingerprint.to_ascii_lowercase()),
            bind: None,
        }
    }
}

#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if hex::encode(Sha256::digest(end_entity)) == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "certificate fingerprint does not match the pinned one".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config(cert: &ServerCert) -> Result<quinn::ClientConfig, ClientError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut tls = match cert {
        ServerCert::Pinned(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                fingerprint: fp.clone(),
                provider,
            }))
            .with_no_client_auth(),
        ServerCert::Roots(roots) => {
            let mut store = rustls::RootCertStore::empty();
            for r in roots {
                store
                    .add(r.clone())
                    .map_err(|e| ClientError::Tls(e.to_string()))?;
            }
            builder.with_root_certificates(store).with_no_client_auth()
        }
    };
    tls.alpn_protocols = vec![QUIC_ALPN.to_vec()];
    tls.enable_early_data = true;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| ClientError::Tls(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

pub(crate) struct QuicConn {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) conn: quinn::Connection,
    pub(crate) send: quinn::SendStream,
    recv: quinn::RecvStream,
    reader: FrameReader,
}

/// A client endpoint configured with `options`. Connections made through
/// the same endpoint share a TLS session cache, so reconnects resume their
/// TLS session (and may send early data).
pub fn endpoint(addr: SocketAddr, options: &QuicOptions) -> Result<quinn::Endpoint, ClientError> {
    let bind = options.bind.unwrap_or_else(|| {
        if addr.is_ipv4() {
            SocketAddr::from(([0, 0, 0, 0], 0))
        } else {
            SocketAddr::from(([0u16; 8], 0))
        }
    });
    let mut endpoint = quinn::Endpoint::client(bind)?;
    endpoint.set_default_client_config(client_config(&options.cert)?);
    Ok(endpoint)
}

impl QuicConn {
    pub(crate) async fn connect(
        addr: SocketAddr,
        options: QuicOptions,
    ) -> Result<QuicConn, ClientError> {
        let endpoint = endpoint(addr, &options)?;
        Self::connect_on(endpoint, addr, &options.server_name).await
    }

    pub(crate) async fn connect_on(
        endpoint: quinn::Endpoint,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<QuicConn, ClientError> {
        let conn = endpoint.connect(addr, server_name)?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(QuicConn {
            endpoint,
            conn,
            send,
            recv,
            reader: FrameReader::new(),
        })
    }

    pub(crate) async fn next_frame(&mut self) -> Result<Option<bytes::Bytes>, ClientError> {
        self.reader.next(&mut self.recv).await
    }

    /// The application close code, once the connection is closed.
    pub(crate) async fn close_code(&self) -> Option<u64> {
        match self.conn.closed().await {
            quinn::ConnectionError::ApplicationClosed(c) => Some(c.error_code.into_inner()),
            _ => None,
        }
    }
}
