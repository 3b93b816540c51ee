//! `metrics.jsonl` (one JSON object per logging step, plus eval lines with `eval_` names, as
//! transformers logs them) and the progress line on the terminal.
//!
//! Within a logging interval, per-step metrics (`loss`, rewards, accuracies, ...) are averaged
//! over the steps; `grad_norm` (before clipping), `epoch` and `num_tokens` are the values at the
//! logging step, and `learning_rate` is the scheduler's rate after it (the next step's), as
//! transformers logs it — 0 at the end of a linear or cosine schedule.

use crate::fsutil::write_atomic;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// File name of the metrics log in `output_dir`.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Running sums of per-step metrics since the last log line.
#[derive(Clone, Debug, Default)]
pub struct Interval {
    sums: BTreeMap<String, (f64, u64)>,
}

impl Interval {
    /// Adds one step's value.
    pub fn add(&mut self, name: &str, v: f64) {
        let e = self.sums.entry(name.to_string()).or_insert((0.0, 0));
        e.0 += v;
        e.1 += 1;
    }
    /// Means, then clears.
    pub fn take_means(&mut self) -> Vec<(String, f64)> {
        let out = self
            .sums
            .iter()
            .map(|(k, (s, n))| (k.clone(), s / (*n).max(1) as f64))
            .collect();
        self.sums.clear();
        out
    }
    /// Exact state for a checkpoint (sums as bit patterns).
    pub fn to_state(&self) -> BTreeMap<String, (u64, u64)> {
        self.sums
            .iter()
            .map(|(k, (s, n))| (k.clone(), (s.to_bits(), *n)))
            .collect()
    }
    /// Restores [`Interval::to_state`].
    pub fn from_state(st: &BTreeMap<String, (u64, u64)>) -> Self {
        Interval {
            sums: st
                .iter()
                .map(|(k, (s, n))| (k.clone(), (f64::from_bits(*s), *n)))
                .collect(),
        }
    }
}

/// Appends JSON lines to `output_dir/metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// A fresh log (an existing file is replaced).
    pub fn create(out: &Path) -> Result<Self> {
        let path = out.join(METRICS_FILE);
        write_atomic(&path, b"")?;
        Ok(MetricsLog { path })
    }

    /// Continues a log after resuming from step `step`: lines of later steps (written by the
    /// interrupted run after its checkpoint) are dropped so the file reads as one run.
    pub fn resume(out: &Path, step: u64) -> Result<Self> {
        let path = out.join(METRICS_FILE);
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let kept: String = old
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(Value::as_u64))
                    .is_some_and(|s| s <= step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        write_atomic(&path, kept.as_bytes())?;
        Ok(MetricsLog { path })
    }

    /// Appends one line `{"step": step, name: value, ...}` (non-finite values become null).
    pub fn write(&self, step: u64, values: &[(String, f64)]) -> Result<()> {
        let mut obj = Map::new();
        obj.insert("step".into(), Value::from(step));
        for (k, v) in values {
            obj.insert(
                k.clone(),
                serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
            );
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .with_context(|| format!("opening {}", self.path.display()))?;
        writeln!(f, "{}", Value::Object(obj)).with_context(|| format!("writing {}", self.path.display()))
    }
}

/// The progress display: an updating line on a terminal, plain lines otherwise, nothing when
/// disabled (tests, library use).
pub struct Progress {
    enabled: bool,
    tty: bool,
    start: Instant,
    start_step: u64,
    total: u64,
    tokens_at_start: u64,
}

impl Progress {
    /// Starts timing at `start_step` of `total`.
    pub fn new(enabled: bool, start_step: u64, total: u64, tokens: u64) -> Self {
        Progress {
            enabled,
            tty: std::io::stdout().is_terminal(),
            start: Instant::now(),
            start_step,
            total,
            tokens_at_start: tokens,
        }
    }

    /// Prints a free-form message line (data report, where the outputs are).
    pub fn note(&self, msg: &str) {
        if self.enabled {
            if self.tty {
                print!("\r\x1b[2K");
            }
            println!("{msg}");
        }
    }

    /// Reports step `step` (completed); on a non-terminal only when `logged`.
    pub fn step(&self, step: u64, loss: f64, lr: f64, tokens: u64, logged: bool) {
        if !self.enabled || !(self.tty || logged) {
            return;
        }
        let secs = self.start.elapsed().as_secs_f64().max(1e-9);
        let done = (step - self.start_step) as f64;
        let tps = (tokens - self.tokens_at_start) as f64 / secs;
        let eta = if done > 0.0 {
            secs / done * (self.total - step) as f64
        } else {
            0.0
        };
        let line = format!(
            "step {step}/{} | loss {loss:.4} | lr {lr:.3e} | {tps:.0} tok/s | ETA {}",
            self.total,
            hms(eta)
        );
        if self.tty {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
            if step == self.total {
                println!();
            }
        } else {
            println!("{line}");
        }
    }
}

fn hms(secs: f64) -> String {
    let s = secs.round() as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// A `metrics.jsonl` read back (for charts and analyses): every line's object, checked to be
/// JSON, with errors naming the file and line.
pub struct MetricsFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// `(1-based line, object)` for every non-blank line.
    lines: Vec<(usize, Map<String, Value>)>,
}

impl MetricsFile {
    /// Reads and parses every non-blank line; a file without lines is an error.
    pub fn read(path: &Path) -> Result<MetricsFile> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut lines = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", path.display(), i + 1);
            match serde_json::from_str::<Value>(line) {
                Ok(Value::Object(o)) => lines.push((i + 1, o)),
                Ok(_) => bail!("{at}: expected a JSON object per line"),
                Err(e) => bail!("{at}: malformed JSON at column {}: {e}", e.column()),
            }
        }
        ensure!(!lines.is_empty(), "{}: no metrics lines", path.display());
        Ok(MetricsFile {
            path: path.to_path_buf(),
            lines,
        })
    }

    /// `(x, y)` of every line that has `key`; `null` becomes NaN, which the chart skips.
    /// An error names the line where a value is not a number, and the keys present when no
    /// line has `key`.
    pub fn points(&self, x_key: &str, key: &str) -> Result<Vec<(f64, f64)>> {
        let mut pts = Vec::new();
        for (line, obj) in &self.lines {
            let Some(v) = obj.get(key) else { continue };
            let at = || format!("{}:{line}", self.path.display());
            let y = match v {
                Value::Null => f64::NAN,
                v => v
                    .as_f64()
                    .with_context(|| format!("{}: `{key}` is {v}, not a number", at()))?,
            };
            let x = match obj.get(x_key) {
                Some(Value::Null) => f64::NAN,
                Some(v) => v
                    .as_f64()
                    .with_context(|| format!("{}: `{x_key}` is {v}, not a number", at()))?,
                None => bail!("{}: has `{key}` but no `{x_key}`", at()),
            };
            pts.push((x, y));
        }
        if pts.is_empty() {
            let have: BTreeSet<&str> = self
                .lines
                .iter()
                .flat_map(|(_, o)| o.keys().map(String::as_str))
                .collect();
            let have: Vec<&str> = have.into_iter().collect();
            bail!(
                "{}: no line has the key `{key}` (keys present: {})",
                self.path.display(),
                have.join(", ")
            );
        }
        Ok(pts)
    }
}
