//! A progress line for long CLI jobs: redrawn in place on a terminal, a plain line every tenth of
//! the work otherwise (so logs stay readable).

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Progress over `total` items, written to stderr.
pub struct Progress {
    what: &'static str,
    total: usize,
    start: Instant,
    tty: bool,
    last_decile: usize,
}

impl Progress {
    /// Starts reporting progress of `what` over `total` items.
    pub fn new(what: &'static str, total: usize) -> Self {
        Progress {
            what,
            total,
            start: Instant::now(),
            tty: std::io::stderr().is_terminal(),
            last_decile: 0,
        }
    }

    /// Reports that `done` items are finished.
    pub fn update(&mut self, done: usize) {
        let secs = self.start.elapsed().as_secs_f64();
        let rate = done as f64 / secs.max(1e-9);
        let eta = if done > 0 {
            (self.total.saturating_sub(done)) as f64 / rate
        } else {
            0.0
        };
        let line = format!("{}: {done}/{} ({rate:.1}/s, ETA {eta:.0}s)", self.what, self.total);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(err, "\r{line}\x1b[K");
            if done >= self.total {
                let _ = writeln!(err);
            }
        } else {
            let decile = (done * 10) / self.total.max(1);
            if decile > self.last_decile || done >= self.total {
                self.last_decile = decile;
                let _ = writeln!(err, "{line}");
            }
        }
    }
}
