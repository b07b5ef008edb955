//! Progress bars for long transfers: shown on a terminal (stderr), absent when piped.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar(ProgressBar);

impl Bar {
    /// A byte-count bar; `total` None draws a spinner with bytes and rate.
    pub fn bytes(total: Option<u64>, label: &str) -> Bar {
        let bar = match total {
            Some(t) => ProgressBar::new(t),
            None => ProgressBar::no_length(),
        };
        if !std::io::stderr().is_terminal() {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
        } else {
            "{msg} {spinner} {bytes} {binary_bytes_per_sec}"
        };
        bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
        bar.set_message(label.to_string());
        Bar(bar)
    }

    pub fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    /// A line of output on stdout (the bar, on stderr, is cleared for it and drawn again).
    pub fn println(&self, line: &str) {
        self.0.suspend(|| println!("{line}"));
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}
