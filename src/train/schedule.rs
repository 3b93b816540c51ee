//! Learning-rate schedules with warmup, as transformers' `get_scheduler` defines them.
//!
//! `lr(s) = base · λ(s)` where `s` is the number of optimizer steps already taken (the first step
//! uses `s = 0`, so with warmup it runs at lr 0, exactly as transformers does), `W` the warmup
//! steps and `T` the total steps:
//! - warmup (every type): `λ = s / max(1, W)` for `s < W`;
//! - `linear`: `λ = max(0, (T − s) / max(1, T − W))`;
//! - `cosine`: `p = (s − W) / max(1, T − W)`, `λ = max(0, ½(1 + cos(π·p)))` (half a cycle);
//! - `constant`: `λ = 1` (`constant_with_warmup` is accepted as the same thing: irbridge's
//!   `constant` honours a warmup when one is given, transformers' `constant` would ignore it).
//!
//! `warmup_ratio` becomes `W = ceil(ratio · T)` (transformers' `get_warmup_steps`); an explicit
//! `warmup_steps > 0` wins.

use anyhow::{bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The decay shape after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Linear decay to 0 at the last step (transformers' default).
    #[default]
    Linear,
    /// Half-cosine decay to 0.
    Cosine,
    /// Flat after warmup.
    #[serde(alias = "constant_with_warmup")]
    Constant,
}

impl FromStr for ScheduleKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            "constant" | "constant_with_warmup" => ScheduleKind::Constant,
            other => bail!("unknown lr_scheduler_type `{other}` (expected linear, cosine or constant)"),
        })
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::Linear => "linear",
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Constant => "constant",
        })
    }
}

/// A resolved schedule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Shape after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f64,
    /// Warmup steps `W`.
    pub warmup_steps: u64,
    /// Total optimizer steps `T`.
    pub total_steps: u64,
}

/// `W` from the two ways of asking for warmup: explicit steps win, else `ceil(ratio · T)`.
pub fn warmup_steps(steps: u64, ratio: f64, total: u64) -> Result<u64> {
    ensure!(
        ratio.is_finite() && (0.0..=1.0).contains(&ratio),
        "warmup_ratio must be in [0, 1], got {ratio}"
    );
    Ok(if steps > 0 {
        steps
    } else {
        (ratio * total as f64).ceil() as u64
    })
}

impl Schedule {
    /// The multiplier `λ(s)` after `s` completed steps.
    pub fn factor(&self, s: u64) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if s < w {
            return s as f64 / w.max(1) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => (t.saturating_sub(s) as f64 / t.saturating_sub(w).max(1) as f64).max(0.0),
            ScheduleKind::Cosine => {
                let p = (s - w) as f64 / t.saturating_sub(w).max(1) as f64;
                (0.5 * (1.0 + (std::f64::consts::PI * p).cos())).max(0.0)
            }
        }
    }

    /// The learning rate of the step taken after `s` completed steps.
    pub fn lr(&self, s: u64) -> f64 {
        self.base_lr * self.factor(s)
    }
}
