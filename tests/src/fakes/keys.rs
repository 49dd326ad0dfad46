//! Key material for the fakes, made at test time with the `openssl` CLI
//! (scripts/test installs it when missing): an EC P-256 key like an APNs
//! `.p8`, and an RSA 2048 key like a Google service account's. Each kind is
//! made once per process and shared; `*_fresh` functions make a new one.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

/// A private key (PKCS#8 PEM) and its public key (SPKI PEM).
#[derive(Debug, Clone)]
pub struct KeyPair {
    pub private_pem: String,
    pub public_pem: String,
}

/// The service account the fake FCM expects by default.
pub const CLIENT_EMAIL: &str = "push@tether-test.iam.gserviceaccount.com";
/// The FCM project the fake FCM serves by default.
pub const PROJECT_ID: &str = "tether-test";

fn openssl(args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `openssl` (install the openssl package)")?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .context("openssl stdin")?
            .write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("openssl output is not UTF-8")
}

fn pair(genpkey: &[&str]) -> Result<KeyPair> {
    let private_pem = openssl(genpkey, None)?;
    let public_pem = openssl(&["pkey", "-pubout"], Some(&private_pem))?;
    Ok(KeyPair {
        private_pem,
        public_pem,
    })
}

fn cached(
    cell: &'static OnceLock<Result<KeyPair, String>>,
    make: fn() -> Result<KeyPair>,
) -> Result<KeyPair> {
    match cell.get_or_init(|| make().map_err(|e| format!("{e:#}"))) {
        Ok(k) => Ok(k.clone()),
        Err(e) => bail!("{e}"),
    }
}

/// A new EC P-256 key pair (PKCS#8 PEM, as in an APNs `.p8` file).
pub fn es256_pair_fresh() -> Result<KeyPair> {
    pair(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
    ])
}

/// The process's shared EC P-256 key pair.
pub fn es256_pair() -> Result<KeyPair> {
    static CELL: OnceLock<Result<KeyPair, String>> = OnceLock::new();
    cached(&CELL, es256_pair_fresh)
}

/// A new RSA 2048 key pair (PKCS#8 PEM).
pub fn rsa_pair_fresh() -> Result<KeyPair> {
    pair(&[
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
    ])
}

/// The process's shared RSA 2048 key pair.
pub fn rsa_pair() -> Result<KeyPair> {
    static CELL: OnceLock<Result<KeyPair, String>> = OnceLock::new();
    cached(&CELL, rsa_pair_fresh)
}

/// A Google service-account JSON document for `private_pem`.
pub fn service_account_json(
    project_id: &str,
    client_email: &str,
    token_uri: &str,
    private_pem: &str,
) -> String {
    serde_json::json!({
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "0123456789abcdef",
        "private_key": private_pem,
        "client_email": client_email,
        "client_id": "100000000000000000000",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    })
    .to_string()
}

/// A service account (with [`PROJECT_ID`] and [`CLIENT_EMAIL`]) whose
/// grants go to `token_uri`, using the shared RSA key: the JSON document
/// and the public key PEM the fake FCM verifies with.
pub fn rsa_service_account(token_uri: &str) -> Result<(String, String)> {
    let keys = rsa_pair()?;
    Ok((
        service_account_json(PROJECT_ID, CLIENT_EMAIL, token_uri, &keys.private_pem),
        keys.public_pem,
    ))
}
