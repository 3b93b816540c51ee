//! Subcommand implementations of the `irbridge` binary, one module each. `main.rs` only parses.

pub mod eval;
pub mod info;
pub mod inspect;
pub mod logps;
pub mod plot;
mod progress;
pub mod train;

use anyhow::{bail, Result};
use clap::Args;
use irbridge::data::{read_records, tokenize_dpo, tokenize_sft, DpoDataset, SftDataset, TokenizeOptions, Tokenizer};
use irbridge::Device;
use std::path::{Path, PathBuf};

/// Data and device flags shared by the scoring commands.
#[derive(Args)]
pub struct ModelArgs {
    /// Dataset file: JSON array or JSONL, optionally gzip (REFERENCE §2 formats).
    #[arg(long)]
    data: PathBuf,
    /// Maximum prompt+completion tokens per sequence (keep_start truncation).
    #[arg(long, default_value_t = irbridge::data::DEFAULT_MAX_LENGTH)]
    max_length: usize,
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
}

impl ModelArgs {
    /// The model engine runs on the CPU; a CUDA request fails plainly instead of silently
    /// falling back.
    fn check_device(&self) -> Result<()> {
        match self.device.ensure_available()? {
            Device::Cpu => Ok(()),
            d => bail!("--device {d}: scoring runs on the CPU engine only in this build; use --device cpu"),
        }
    }

    /// A GPT-2-style model cannot score rows longer than its learned positions: say so before
    /// any work, with the flag that fixes it, rather than failing on the first long row.
    fn check_positions(&self, model: &irbridge::model::Model, dir: &Path) -> Result<()> {
        let cfg = model.config();
        if cfg.arch == irbridge::model::Arch::Gpt2 && self.max_length > cfg.max_positions {
            bail!(
                "--max-length {} exceeds the {} learned positions of {} (n_positions); pass --max-length {} or less",
                self.max_length,
                cfg.max_positions,
                dir.display(),
                cfg.max_positions
            );
        }
        Ok(())
    }
}

/// A tokenised dataset of either kind.
pub enum Dataset {
    /// Prompt/completion, messages, text or Alpaca rows.
    Sft(SftDataset),
    /// Preference pairs.
    Dpo(DpoDataset),
}

impl Dataset {
    /// The tokenisation report (drops, truncations, boundary mismatches).
    pub fn report(&self) -> String {
        match self {
            Dataset::Sft(d) => d.report.to_string(),
            Dataset::Dpo(d) => d.report.to_string(),
        }
    }
}

/// Reads and tokenises a dataset file; its kind follows its rows (all must agree).
pub fn load_dataset(path: &Path, tok: &Tokenizer, max_length: usize) -> Result<Dataset> {
    let records = read_records(path)?;
    let Some(first) = records.first() else {
        bail!("{}: the file has no rows", path.display());
    };
    let pref = first.row.is_preference();
    if let Some(r) = records.iter().find(|r| r.row.is_preference() != pref) {
        bail!(
            "{}: a {} row among {} rows; one file holds one kind",
            r.source,
            r.row.kind(),
            first.row.kind()
        );
    }
    let opts = TokenizeOptions {
        max_length,
        ..TokenizeOptions::default()
    };
    Ok(if pref {
        Dataset::Dpo(tokenize_dpo(&records, tok, &opts)?)
    } else {
        Dataset::Sft(tokenize_sft(&records, tok, &opts)?)
    })
}
