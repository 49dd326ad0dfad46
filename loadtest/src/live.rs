//! The progress of a run while it goes on: on a terminal, one live line
//! (indicatif) redrawn in place each second; otherwise (a pipe, a CI log)
//! one plain line a second on stderr, through the log.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// Where progress goes.
pub struct Live {
    bar: Option<ProgressBar>,
}

impl Live {
    /// A live line when stderr is a terminal (and `LOADTEST_PLAIN` is not
    /// set), plain lines otherwise. Only worker 0 draws: the other workers
    /// of a `--workers` run share its terminal and print plain lines.
    pub fn new(worker: usize) -> Live {
        let terminal = worker == 0
            && std::io::stderr().is_terminal()
            && std::env::var_os("LOADTEST_PLAIN").is_none();
        let bar = terminal.then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Live { bar }
    }

    /// This second's figures.
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(text.to_owned()),
            None => tracing::info!("{text}"),
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            // The last line stays on the screen above the report.
            bar.abandon();
        }
    }
}
