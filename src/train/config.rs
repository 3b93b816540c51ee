//! The training configuration: one struct for both trainers, read from TOML, overridden by
//! command-line flags (flags win), validated with errors that name the key, and written back
//! resolved (every default filled in) as `config.toml` next to the outputs.
//!
//! Keys are the flag names with `_` for `-` (`--learning-rate` ↔ `learning_rate`). Keys left out
//! take TRL's defaults for the trainer kind (SFT: lr 2e-5; DPO: lr 1e-6, β 0.1, `sigmoid`).
//! `loss_type` and `loss_weights` are comma-separated strings (`"sigmoid,sft"`, `"1,0.5"`).
//! A key that belongs to the other trainer (`beta` for SFT, `sft_loss` for DPO) is an error, not
//! silently ignored.

use super::schedule::ScheduleKind;
use crate::model::cuda::Precision;
use crate::ops::prefloss::{FDivergence, LossType, PrefLossConfig};
use crate::ops::sftloss::SftDivergence;
use anyhow::{anyhow, bail, ensure, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Which trainer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Supervised fine-tuning.
    Sft,
    /// Direct preference optimisation (and the rest of the preference-loss family).
    Dpo,
}

impl Kind {
    /// `sft` / `dpo`.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Sft => "sft",
            Kind::Dpo => "dpo",
        }
    }
}

/// Token or sequence level for the f-divergence SFT objectives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SftLevel {
    /// One score per completion token.
    #[default]
    Token,
    /// One score per sequence (the log-ratio summed over the completion first).
    Sequence,
}

impl FromStr for SftLevel {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "token" => Ok(SftLevel::Token),
            "sequence" => Ok(SftLevel::Sequence),
            o => bail!("unknown sft_level `{o}` (expected token or sequence)"),
        }
    }
}

/// The SFT objective: plain NLL or an f-divergence of REFERENCE §1.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SftObjective {
    /// Token-mean negative log-likelihood.
    Nll,
    /// `−h(s)/β` with `s = β·(log π − log π_ref)`.
    FDiv(SftDivergence),
}

impl FromStr for SftObjective {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "nll" => Ok(SftObjective::Nll),
            other => other
                .parse::<SftDivergence>()
                .map(SftObjective::FDiv)
                .map_err(|_| anyhow!("unknown sft_loss `{other}` (expected nll, tv, pearson_chi2, neyman_chi2, squared_hellinger, jensen_shannon or reverse_kl)")),
        }
    }
}

/// Every setting of a training run. `Option` fields whose default depends on the trainer kind
/// are filled by [`TrainConfig::resolve`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// `sft` or `dpo` (set by the subcommand; a file that says otherwise is an error).
    pub kind: Option<Kind>,
    /// Model directory (HF layout) to start from.
    pub model: Option<PathBuf>,
    /// DPO reference model directory (default: `model`).
    pub ref_model: Option<PathBuf>,
    /// Training data file.
    pub data: Option<PathBuf>,
    /// Use only the first N rows of `data` (LLaMA-Factory's `max_samples`): a quick run, or
    /// several epochs over a subset, without writing a trimmed copy of the file. Applied to the
    /// rows as read, before tokenisation and the eval split; `eval_data` is never trimmed.
    pub max_samples: Option<usize>,
    /// Held-out data file.
    pub eval_data: Option<PathBuf>,
    /// Fraction of `data` held out for evaluation when there is no `eval_data`.
    pub eval_fraction: f64,
    /// Evaluate every N optimizer steps (0: only at the end); needs an eval split.
    pub eval_steps: u64,
    /// Where checkpoints, metrics and the final model go.
    pub output_dir: Option<PathBuf>,
    /// Peak learning rate (SFT 2e-5, DPO 1e-6).
    pub learning_rate: Option<f64>,
    /// Sequences (SFT) or pairs (DPO) per micro-batch.
    pub per_device_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Total optimizer steps; when set it overrides `num_epochs`.
    pub max_steps: Option<u64>,
    /// Passes over the data (fractional allowed), used when `max_steps` is not set.
    pub num_epochs: f64,
    /// Maximum prompt+completion tokens per sequence.
    pub max_length: usize,
    /// `linear`, `cosine` or `constant`.
    pub lr_scheduler_type: ScheduleKind,
    /// Warmup steps (wins over `warmup_ratio` when > 0).
    pub warmup_steps: u64,
    /// Warmup as a fraction of the total steps.
    pub warmup_ratio: f64,
    /// Decoupled AdamW weight decay on matrices (never on norms and biases).
    pub weight_decay: f64,
    /// Global-norm gradient clipping threshold (≤ 0 disables it).
    pub max_grad_norm: f64,
    /// AdamW β1.
    pub adam_beta1: f64,
    /// AdamW β2.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// DPO β (default 0.1).
    pub beta: Option<f64>,
    /// DPO loss types, comma-separated (default `sigmoid`).
    pub loss_type: Option<String>,
    /// Weights of the loss types, comma-separated (default all 1).
    pub loss_weights: Option<String>,
    /// DPO score: `reverse_kl`, `forward_kl`, `js_divergence`, `alpha_divergence`.
    pub f_divergence_type: Option<String>,
    /// α of `alpha_divergence` (default 0.5).
    pub f_alpha_divergence_coef: Option<f64>,
    /// Label smoothing ε (cDPO `sigmoid`, `robust`, `exo_pair`).
    pub label_smoothing: Option<f64>,
    /// DPO: compute the reference log-probs once up front and cache them in `output_dir`.
    pub precompute_ref_logps: Option<bool>,
    /// SFT objective: `nll` or an f-divergence name.
    pub sft_loss: Option<String>,
    /// β of the f-divergence SFT objectives (default 0.1).
    pub sft_beta: Option<f64>,
    /// `token` or `sequence`.
    pub sft_level: Option<SftLevel>,
    /// Seed of the data order and the eval split.
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Activation precision of the CUDA engine: `f32` (default) or `bf16` (fp32 accumulation and
    /// fp32 master weights either way); the CPU engine is f32 only.
    pub dtype: String,
    /// Write a metrics line every N optimizer steps.
    pub logging_steps: u64,
    /// Save a checkpoint every N optimizer steps (0: never).
    pub save_steps: u64,
    /// Keep at most this many checkpoints (oldest deleted first).
    pub save_total_limit: Option<usize>,
    /// `latest` or a checkpoint directory to continue from.
    pub resume_from_checkpoint: Option<String>,
    /// Allow a fresh run into an `output_dir` holding an earlier run's `metrics.jsonl` or
    /// `final/` (transformers' name); checkpoints are refused regardless.
    pub overwrite_output_dir: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            kind: None,
            model: None,
            ref_model: None,
            data: None,
            max_samples: None,
            eval_data: None,
            eval_fraction: 0.0,
            eval_steps: 0,
            output_dir: None,
            learning_rate: None,
            per_device_batch_size: 8,
            gradient_accumulation_steps: 1,
            max_steps: None,
            num_epochs: 3.0,
            max_length: 1024,
            lr_scheduler_type: ScheduleKind::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            beta: None,
            loss_type: None,
            loss_weights: None,
            f_divergence_type: None,
            f_alpha_divergence_coef: None,
            label_smoothing: None,
            precompute_ref_logps: None,
            sft_loss: None,
            sft_beta: None,
            sft_level: None,
            seed: 42,
            device: "cpu".into(),
            dtype: "f32".into(),
            logging_steps: 10,
            save_steps: 500,
            save_total_limit: None,
            resume_from_checkpoint: None,
            overwrite_output_dir: false,
        }
    }
}

/// Parses a TOML config. Errors are one line: `FILE:LINE: message (key `k`)`.
pub fn parse_toml(name: &str, text: &str) -> Result<toml::Table> {
    let to_err = |e: toml::de::Error| -> anyhow::Error {
        let msg = e.message().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                let key = text
                    .lines()
                    .nth(line - 1)
                    .and_then(|l| l.split_once('='))
                    .map(|(k, _)| k.trim().to_string())
                    .filter(|k| !k.is_empty() && !k.starts_with('['));
                match key {
                    Some(k) => anyhow!("{name}:{line}: {msg} (key `{k}`)"),
                    None => anyhow!("{name}:{line}: {msg}"),
                }
            }
            None => anyhow!("{name}: {msg}"),
        }
    };
    // Typed parse first, so unknown keys and wrong types are reported with their line.
    toml::from_str::<TrainConfig>(text).map_err(to_err)?;
    toml::from_str::<toml::Table>(text).map_err(to_err)
}

impl TrainConfig {
    /// Reads `file` (when given), lays the flag `overrides` over it (flags win), and resolves
    /// the defaults for `kind`.
    pub fn load(kind: Kind, file: Option<&Path>, overrides: toml::Table) -> Result<TrainConfig> {
        let mut table = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| anyhow!("reading {}: {e}", p.display()))?;
                parse_toml(&p.display().to_string(), &text)?
            }
            None => toml::Table::new(),
        };
        for (k, v) in overrides {
            table.insert(k, v);
        }
        let cfg: TrainConfig = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| {
                // A value that came from a flag has no line to point at, and toml's message for
                // it ("unknown variant `x`") does not say which key: find the key whose value
                // alone fails (every other key has a default, so a one-key table isolates it).
                let msg = e.message().replace('\n', " ");
                let culprit = table.iter().find(|(k, v)| {
                    let one = toml::Table::from_iter([((*k).clone(), (*v).clone())]);
                    toml::Value::Table(one).try_into::<TrainConfig>().is_err()
                });
                match culprit {
                    Some((k, _)) => anyhow!("{k}: {msg}"),
                    None => anyhow!("{msg}"),
                }
            })?;
        cfg.resolve(kind)
    }

    /// Checks the kind, rejects keys of the other trainer, fills kind-dependent defaults and
    /// validates every value.
    pub fn resolve(mut self, kind: Kind) -> Result<TrainConfig> {
        if let Some(k) = self.kind {
            ensure!(
                k == kind,
                "kind: the config file is for `{}` but the command is `train {}`",
                k.name(),
                kind.name()
            );
        }
        self.kind = Some(kind);
        let set = |b: bool, key: &str, other: &str| -> Result<()> {
            ensure!(!b, "{key}: only applies to `train {other}`");
            Ok(())
        };
        match kind {
            Kind::Sft => {
                for (b, key) in [
                    (self.ref_model.is_some(), "ref_model"),
                    (self.beta.is_some(), "beta"),
                    (self.loss_type.is_some(), "loss_type"),
                    (self.loss_weights.is_some(), "loss_weights"),
                    (self.f_divergence_type.is_some(), "f_divergence_type"),
                    (self.f_alpha_divergence_coef.is_some(), "f_alpha_divergence_coef"),
                    (self.label_smoothing.is_some(), "label_smoothing"),
                    (self.precompute_ref_logps.is_some(), "precompute_ref_logps"),
                ] {
                    set(b, key, "dpo")?;
                }
                self.learning_rate.get_or_insert(2e-5);
                self.sft_loss.get_or_insert_with(|| "nll".into());
                self.sft_beta.get_or_insert(0.1);
                self.sft_level.get_or_insert(SftLevel::Token);
            }
            Kind::Dpo => {
                for (b, key) in [
                    (self.sft_loss.is_some(), "sft_loss"),
                    (self.sft_beta.is_some(), "sft_beta"),
                    (self.sft_level.is_some(), "sft_level"),
                ] {
                    set(b, key, "sft")?;
                }
                self.learning_rate.get_or_insert(1e-6);
                self.beta.get_or_insert(0.1);
                self.loss_type.get_or_insert_with(|| "sigmoid".into());
                self.f_divergence_type.get_or_insert_with(|| "reverse_kl".into());
                self.f_alpha_divergence_coef.get_or_insert(0.5);
                self.label_smoothing.get_or_insert(0.0);
                self.precompute_ref_logps.get_or_insert(false);
            }
        }
        self.validate()?;
        Ok(self)
    }

    fn validate(&self) -> Result<()> {
        ensure!(
            self.model.is_some(),
            "model: required (--model DIR or `model = \"DIR\"`)"
        );
        ensure!(self.data.is_some(), "data: required (--data FILE or `data = \"FILE\"`)");
        ensure!(
            self.output_dir.is_some(),
            "output_dir: required (--output-dir DIR or `output_dir = \"DIR\"`)"
        );
        let lr = self.learning_rate.unwrap_or(0.0);
        ensure!(
            lr.is_finite() && lr >= 0.0,
            "learning_rate: must be ≥ 0 and finite, got {lr}"
        );
        ensure!(self.per_device_batch_size > 0, "per_device_batch_size: must be ≥ 1");
        ensure!(
            self.gradient_accumulation_steps > 0,
            "gradient_accumulation_steps: must be ≥ 1"
        );
        if let Some(m) = self.max_steps {
            ensure!(m > 0, "max_steps: must be ≥ 1");
        } else {
            ensure!(
                self.num_epochs.is_finite() && self.num_epochs > 0.0,
                "num_epochs: must be > 0, got {}",
                self.num_epochs
            );
        }
        ensure!(self.max_length >= 2, "max_length: must be ≥ 2, got {}", self.max_length);
        ensure!(
            self.warmup_ratio.is_finite() && (0.0..=1.0).contains(&self.warmup_ratio),
            "warmup_ratio: must be in [0, 1], got {}",
            self.warmup_ratio
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay: must be ≥ 0, got {}",
            self.weight_decay
        );
        ensure!(self.max_grad_norm.is_finite(), "max_grad_norm: must be finite");
        for (k, v) in [("adam_beta1", self.adam_beta1), ("adam_beta2", self.adam_beta2)] {
            ensure!((0.0..1.0).contains(&v), "{k}: must be in [0, 1), got {v}");
        }
        ensure!(
            self.adam_epsilon.is_finite() && self.adam_epsilon > 0.0,
            "adam_epsilon: must be > 0, got {}",
            self.adam_epsilon
        );
        ensure!(
            self.eval_fraction.is_finite() && (0.0..1.0).contains(&self.eval_fraction),
            "eval_fraction: must be in [0, 1), got {}",
            self.eval_fraction
        );
        ensure!(
            !(self.eval_data.is_some() && self.eval_fraction > 0.0),
            "eval_fraction: give eval_data or eval_fraction, not both"
        );
        ensure!(
            self.eval_steps == 0 || self.eval_data.is_some() || self.eval_fraction > 0.0,
            "eval_steps: {} but there is no eval split to evaluate on (give eval_data or eval_fraction)",
            self.eval_steps
        );
        if let Some(n) = self.max_samples {
            ensure!(n > 0, "max_samples: must be ≥ 1 (leave it out to use every row)");
        }
        ensure!(self.logging_steps > 0, "logging_steps: must be ≥ 1");
        if let Some(l) = self.save_total_limit {
            ensure!(
                l > 0,
                "save_total_limit: must be ≥ 1 (leave it out to keep every checkpoint)"
            );
        }
        match self.device.as_str() {
            "cpu" => ensure!(
                self.precision()? == Precision::F32,
                "dtype: `{}` needs device = \"cuda\" (the CPU engine computes in f32)",
                self.dtype
            ),
            d if d == "cuda" || d.starts_with("cuda:") => {
                d.parse::<crate::Device>().map_err(|e| anyhow!("device: {e}"))?;
                self.precision()?;
            }
            d => bail!("device: unknown device `{d}` (expected cpu, cuda or cuda:N)"),
        }
        match self.kind {
            Some(Kind::Sft) => {
                self.sft_objective()?;
                let b = self.sft_beta.unwrap_or(0.0);
                ensure!(b.is_finite() && b > 0.0, "sft_beta: must be > 0, got {b}");
            }
            Some(Kind::Dpo) => {
                self.pref_loss()?;
            }
            None => bail!("kind: not set"),
        }
        Ok(())
    }

    /// The resolved SFT objective.
    pub fn sft_objective(&self) -> Result<SftObjective> {
        self.sft_loss
            .as_deref()
            .unwrap_or("nll")
            .parse()
            .map_err(|e: anyhow::Error| anyhow!("sft_loss: {e}"))
    }

    /// The resolved preference-loss configuration (TRL's mapping of `label_smoothing` onto the
    /// `robust` and `exo_pair` epsilons).
    pub fn pref_loss(&self) -> Result<PrefLossConfig> {
        let types: Vec<LossType> = self
            .loss_type
            .as_deref()
            .unwrap_or("sigmoid")
            .split(',')
            .map(|s| s.parse::<LossType>())
            .collect::<Result<_>>()
            .map_err(|e| anyhow!("loss_type: {e}"))?;
        let weights: Vec<f64> = match &self.loss_weights {
            None => vec![1.0; types.len()],
            Some(w) => w
                .split(',')
                .map(|s| {
                    s.trim()
                        .parse::<f64>()
                        .map_err(|_| anyhow!("loss_weights: `{}` is not a number", s.trim()))
                })
                .collect::<Result<_>>()?,
        };
        ensure!(
            weights.len() == types.len(),
            "loss_weights: {} weights for {} loss types",
            weights.len(),
            types.len()
        );
        let fdiv: FDivergence = self
            .f_divergence_type
            .as_deref()
            .unwrap_or("reverse_kl")
            .parse()
            .map_err(|e: anyhow::Error| anyhow!("f_divergence_type: {e}"))?;
        let ls = self.label_smoothing.unwrap_or(0.0);
        let cfg = PrefLossConfig {
            terms: types.into_iter().zip(weights).collect(),
            beta: self.beta.unwrap_or(0.1),
            f_divergence: fdiv,
            alpha: self.f_alpha_divergence_coef.unwrap_or(0.5),
            label_smoothing: ls,
            robust_eps: ls,
            exo_eps: if ls > 0.0 { ls } else { 1e-3 },
            ..PrefLossConfig::default()
        };
        cfg.validate().map_err(|e| {
            let msg = format!("{e:#}");
            let key = ["beta", "label_smoothing", "alpha", "weight"]
                .into_iter()
                .find(|k| msg.contains(k))
                .map(|k| match k {
                    "alpha" => "f_alpha_divergence_coef",
                    "weight" => "loss_weights",
                    k => k,
                })
                .unwrap_or("loss_type");
            anyhow!("{key}: {msg}")
        })?;
        Ok(cfg)
    }

    /// The CUDA engine's activation precision (`dtype`).
    pub fn precision(&self) -> Result<Precision> {
        self.dtype.parse().map_err(|e: anyhow::Error| anyhow!("dtype: {e}"))
    }

    /// The learning rate (resolved).
    pub fn lr(&self) -> f64 {
        self.learning_rate.unwrap_or(0.0)
    }

    /// The trainer kind (resolved).
    pub fn kind(&self) -> Kind {
        self.kind.unwrap_or(Kind::Sft)
    }

    /// The output directory (resolved).
    pub fn output_dir(&self) -> &Path {
        self.output_dir.as_deref().unwrap_or(Path::new("."))
    }

    /// The resolved config as TOML text.
    pub fn to_toml(&self) -> Result<String> {
        let mut c = self.clone();
        // Where to resume from is a property of one invocation, not of the run.
        c.resume_from_checkpoint = None;
        Ok(toml::to_string(&c)?)
    }

    /// Keys whose change would make a resumed run a different run (data order, shapes of the
    /// steps, the objective); compared against the checkpoint's config on resume.
    pub fn run_identity(&self) -> Vec<(&'static str, String)> {
        vec![
            ("kind", opt(&self.kind)),
            ("model", opt(&self.model)),
            ("ref_model", opt(&self.ref_model)),
            ("data", opt(&self.data)),
            ("max_samples", opt(&self.max_samples)),
            ("eval_data", opt(&self.eval_data)),
            ("eval_fraction", self.eval_fraction.to_string()),
            ("per_device_batch_size", self.per_device_batch_size.to_string()),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps.to_string(),
            ),
            ("max_length", self.max_length.to_string()),
            ("seed", self.seed.to_string()),
            ("sft_loss", opt(&self.sft_loss)),
            ("sft_level", opt(&self.sft_level)),
            ("loss_type", opt(&self.loss_type)),
            ("loss_weights", opt(&self.loss_weights)),
            ("f_divergence_type", opt(&self.f_divergence_type)),
            ("beta", opt(&self.beta)),
            ("sft_beta", opt(&self.sft_beta)),
            ("label_smoothing", opt(&self.label_smoothing)),
            ("learning_rate", opt(&self.learning_rate)),
            ("lr_scheduler_type", format!("{:?}", self.lr_scheduler_type)),
            ("warmup_steps", self.warmup_steps.to_string()),
            ("warmup_ratio", self.warmup_ratio.to_string()),
            ("weight_decay", self.weight_decay.to_string()),
        ]
    }
}

/// An optional setting as it reads in an error message: the value, or `unset`.
fn opt<T: std::fmt::Debug>(o: &Option<T>) -> String {
    o.as_ref().map_or_else(|| "unset".to_string(), |v| format!("{v:?}"))
}
