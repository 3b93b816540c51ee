//! Subcommand implementations of the `irbridge` binary, one module each. `main.rs` only parses.

pub mod analyze;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod info;
pub mod inspect;
pub mod logps;
pub mod plot;
mod progress;
pub mod train;

use anyhow::{bail, Result};
use clap::Args;
use irbridge::data::{read_records, tokenize_dpo, tokenize_sft, DpoDataset, SftDataset, TokenizeOptions, Tokenizer};
use irbridge::model::cuda::{CudaModel, Precision};
use irbridge::model::Model;
use irbridge::train::{CpuEngine, CudaEngine, Engine};
use irbridge::Device;
use std::path::{Path, PathBuf};

/// The device flags of every command that runs a model (scoring and generation).
#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Device: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Activation precision on CUDA: f32 or bf16 (fp32 accumulation either way; CPU: f32 only).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
}

impl DeviceArgs {
    /// The device to run on. An unusable CUDA device fails here with the reason (no driver,
    /// no GPU, a build without kernels) instead of silently falling back to the CPU; so does
    /// bf16 on the CPU, which has only the f32 engine.
    fn check_device(&self) -> Result<Device> {
        let d = self
            .device
            .ensure_available()
            .map_err(|e| anyhow::anyhow!("--device {}: {e}", self.device))?;
        if d == Device::Cpu && self.dtype != Precision::F32 {
            bail!(
                "--dtype {}: the CPU engine computes in f32; use --device cuda for bf16",
                self.dtype
            );
        }
        Ok(d)
    }

    /// The activation precision on CUDA.
    fn dtype(&self) -> Precision {
        self.dtype
    }
}

/// Data and device flags shared by the scoring commands.
#[derive(Args)]
pub struct ModelArgs {
    /// Dataset file: JSON array or JSONL, optionally gzip (REFERENCE §2 formats).
    #[arg(long)]
    data: PathBuf,
    /// Maximum prompt+completion tokens per sequence (keep_start truncation).
    #[arg(long, default_value_t = irbridge::data::DEFAULT_MAX_LENGTH)]
    max_length: usize,
    #[command(flatten)]
    dev: DeviceArgs,
}

impl ModelArgs {
    /// See [`DeviceArgs::check_device`].
    fn check_device(&self) -> Result<Device> {
        self.dev.check_device()
    }

    /// Puts `model` on the device chosen by [`ModelArgs::check_device`] and runs `f` with its
    /// engine.
    fn with_engine<R>(&self, device: Device, model: Model, f: impl EngineFn<R>) -> Result<R> {
        match device {
            Device::Cpu => f.call(&mut CpuEngine::new(model)),
            Device::Cuda(n) => {
                let m = CudaModel::new(&model, n, self.dev.dtype())?;
                drop(model);
                f.call(&mut CudaEngine::new(m))
            }
        }
    }

    /// A GPT-2-style model cannot score rows longer than its learned positions: say so before
    /// any work, with the flag that fixes it, rather than failing on the first long row.
    fn check_positions(&self, model: &Model, dir: &Path) -> Result<()> {
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

/// Work generic over the engine: a closure cannot be generic, so the scoring commands pass this.
pub trait EngineFn<R> {
    /// Runs with `engine`.
    fn call<E: Engine>(self, engine: &mut E) -> Result<R>;
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

    /// The report's counts on one line, for an error message.
    pub fn summary(&self) -> String {
        match self {
            Dataset::Sft(d) => d.report.summary(),
            Dataset::Dpo(d) => d.report.summary(),
        }
    }
}

/// Refuses to compare two models that do not share a vocabulary: their log-probs would be of
/// different token sequences, and the numbers would look plausible while meaning nothing.
pub fn check_same_vocabulary(policy: &Model, policy_dir: &Path, reference: &Model, reference_dir: &Path) -> Result<()> {
    let (p, r) = (policy.config().vocab_size, reference.config().vocab_size);
    if p != r {
        bail!(
            "{} has a {p}-token vocabulary but the reference {} has {r}: the two models must share a tokenizer",
            policy_dir.display(),
            reference_dir.display()
        );
    }
    Ok(())
}

/// Refuses an `--output` file that would overwrite the `--data` it is computed from, or that
/// cannot be written (a folder, or a parent that is not a folder) — checked before any work.
pub fn check_output_file(output: &Path, data: &Path) -> Result<()> {
    let same = match (output.canonicalize(), data.canonicalize()) {
        (Ok(o), Ok(d)) => o == d,
        _ => false,
    };
    if same {
        bail!(
            "--output {} is the --data file: choose another name, the input would be overwritten",
            output.display()
        );
    }
    if output.is_dir() || output.file_name().is_none() {
        bail!("--output {}: is a folder, expected a file name", output.display());
    }
    if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
        if parent.exists() && !parent.is_dir() {
            bail!("--output {}: {} is not a folder", output.display(), parent.display());
        }
    }
    Ok(())
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
