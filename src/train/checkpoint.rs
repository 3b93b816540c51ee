//! Checkpoints: `output_dir/checkpoint-<step>/` holds the model in the Hugging Face layout,
//! `optimizer.safetensors` (AdamW moments), `trainer_state.json` and the resolved
//! `config.toml`. The directory is assembled under a temporary name and renamed into place, so a
//! `checkpoint-<step>` directory is always complete; resume only trusts those.

use super::engine::Engine;
use crate::fsutil::{sync_dir, write_atomic};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File name of the optimizer state inside a checkpoint.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// File name of the trainer state inside a checkpoint.
pub const STATE_FILE: &str = "trainer_state.json";
/// File name of the resolved config (in `output_dir` and in each checkpoint).
pub const CONFIG_FILE: &str = "config.toml";

/// Everything besides weights and moments that a resumed run needs to continue bit-for-bit.
/// Floats that must survive exactly are stored as their IEEE bit patterns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub global_step: u64,
    /// Fractional epoch reached.
    pub epoch: f64,
    /// Total steps of the run.
    pub total_steps: u64,
    /// Warmup steps of the schedule.
    pub warmup_steps: u64,
    /// Steps per epoch (the data position is `global_step` within this).
    pub steps_per_epoch: u64,
    /// Seed of the data order.
    pub seed: u64,
    /// Tokens (non-padding, all sides) processed so far.
    pub num_tokens: u64,
    /// Metrics accumulated since the last logging line: name → (sum bits, count).
    pub pending_metrics: BTreeMap<String, (u64, u64)>,
    /// Step of the last evaluation (0 = none).
    pub last_eval_step: u64,
}

/// The directory name of the checkpoint after `step` steps.
pub fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step}")
}

/// Writes `out/checkpoint-<step>/` atomically.
pub fn save<E: Engine>(engine: &E, out: &Path, state: &TrainerState, config_toml: &str) -> Result<PathBuf> {
    let dest = out.join(checkpoint_name(state.global_step));
    let tmp = out.join(format!(
        ".{}.tmp-{}",
        checkpoint_name(state.global_step),
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    let written = (|| {
        engine.save_model(&tmp)?;
        engine.save_optimizer(&tmp.join(OPTIMIZER_FILE))?;
        write_atomic(&tmp.join(CONFIG_FILE), config_toml.as_bytes())?;
        let json = serde_json::to_string_pretty(state)? + "\n";
        write_atomic(&tmp.join(STATE_FILE), json.as_bytes())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("saving {}", dest.display())));
    }
    if dest.exists() {
        std::fs::remove_dir_all(&dest).with_context(|| format!("replacing {}", dest.display()))?;
    }
    std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))?;
    sync_dir(out)?;
    Ok(dest)
}

/// Complete checkpoints under `out`, sorted by step.
pub fn list(out: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir(out) else {
        return Ok(v);
    };
    for entry in rd {
        let entry = entry.with_context(|| format!("listing {}", out.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<u64>().ok()) {
            if entry.path().join(STATE_FILE).is_file() {
                v.push((step, entry.path()));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Deletes the oldest checkpoints so that at most `limit` remain.
pub fn rotate(out: &Path, limit: usize) -> Result<()> {
    let all = list(out)?;
    if all.len() > limit {
        for (_, p) in &all[..all.len() - limit] {
            std::fs::remove_dir_all(p).with_context(|| format!("removing old checkpoint {}", p.display()))?;
        }
    }
    Ok(())
}

/// `latest` → the newest complete checkpoint in `out`; anything else is a directory that must
/// hold a complete checkpoint.
pub fn resolve(spec: &str, out: &Path) -> Result<PathBuf> {
    if spec == "latest" {
        return match list(out)?.pop() {
            Some((_, p)) => Ok(p),
            None => bail!(
                "resume_from_checkpoint: `latest` but {} has no complete checkpoint",
                out.display()
            ),
        };
    }
    let p = PathBuf::from(spec);
    ensure!(
        p.join(STATE_FILE).is_file(),
        "resume_from_checkpoint: {} is not a complete checkpoint (no {STATE_FILE})",
        p.display()
    );
    Ok(p)
}

/// Reads a checkpoint's trainer state.
pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a trainer state", path.display()))
}
