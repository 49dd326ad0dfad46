//! `broker`: one Tether node. Configuration from `--config FILE`,
//! `TETHER_*` variables and flags; logs to stderr; exits 0 after a graceful
//! shutdown on SIGTERM or SIGINT.

use std::process::ExitCode;

use tether_broker::config::LogFormat;
use tether_broker::{Config, Server};
use tracing_subscriber::EnvFilter;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("TETHER_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(false).init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// SIGINT or SIGTERM. The handlers are installed when this is called, not
/// when the future is first polled: a signal that came between `ready` and
/// that first poll would have ended the process at once (the default
/// action), skipping the drain.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn once(s: std::io::Result<Signal>) {
        match s {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    }
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    async move {
        tokio::select! {
            _ = once(int) => tracing::info!("SIGINT received"),
            _ = once(term) => tracing::info!("SIGTERM received"),
        }
    }
}

fn main() -> ExitCode {
    let config = match Config::load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("broker: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    // One crypto provider for the whole process (see CRATES.md): aws-lc-rs.
    if rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .is_err()
    {
        tracing::debug!("a rustls crypto provider was already installed");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("broker: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result: anyhow::Result<()> = runtime.block_on(async {
        let stop = shutdown_signal();
        let server = Server::bind(config).await?;
        server.run(stop).await;
        Ok(())
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("broker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
