//! `irbridge train sft|dpo`: an optional TOML config, flags laid over it (flags win), then the
//! library's trainer.

use anyhow::Result;
use clap::Args;
use irbridge::train::{self, Kind, RunOptions, TrainConfig};
use std::path::PathBuf;

/// Flags of `train sft` and `train dpo`; each one overrides the config file key of the same name
/// (`-` ↔ `_`).
#[derive(Args, Debug, Default)]
pub struct TrainArgs {
    /// TOML file with any of the keys below.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Model directory (HF layout).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// DPO reference model directory (default: the initial model).
    #[arg(long)]
    pub ref_model: Option<PathBuf>,
    /// Training data (JSON, JSONL or text, optionally gzip).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Use only the first N rows of --data.
    #[arg(long)]
    pub max_samples: Option<u64>,
    /// Held-out data.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Fraction of the data held out for evaluation.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long)]
    pub eval_steps: Option<u64>,
    /// Output directory.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Peak learning rate.
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Sequences (SFT) or pairs (DPO) per micro-batch (TRL: per_device_train_batch_size).
    #[arg(long, visible_alias = "per-device-train-batch-size")]
    pub per_device_batch_size: Option<u64>,
    /// Micro-batches per optimizer step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<u64>,
    /// Total optimizer steps (overrides --num-epochs).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Epochs (fractional allowed; TRL: num_train_epochs).
    #[arg(long, visible_alias = "num-train-epochs")]
    pub num_epochs: Option<f64>,
    /// Maximum tokens per sequence.
    #[arg(long)]
    pub max_length: Option<u64>,
    /// linear, cosine or constant.
    #[arg(long)]
    pub lr_scheduler_type: Option<String>,
    /// Warmup steps.
    #[arg(long)]
    pub warmup_steps: Option<u64>,
    /// Warmup as a fraction of the total steps.
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// AdamW weight decay (matrices only).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Gradient clipping threshold (≤ 0 disables).
    #[arg(long, allow_hyphen_values = true)]
    pub max_grad_norm: Option<f64>,
    /// DPO β.
    #[arg(long)]
    pub beta: Option<f64>,
    /// DPO loss types, comma-separated (e.g. sigmoid,sft).
    #[arg(long)]
    pub loss_type: Option<String>,
    /// Weights of the loss types, comma-separated.
    #[arg(long)]
    pub loss_weights: Option<String>,
    /// DPO score: reverse_kl, forward_kl, js_divergence, alpha_divergence.
    #[arg(long)]
    pub f_divergence_type: Option<String>,
    /// Label smoothing (cDPO / robust / exo_pair).
    #[arg(long)]
    pub label_smoothing: Option<f64>,
    /// DPO: precompute the reference log-probs once (cached in the output dir; TRL:
    /// precompute_ref_log_probs).
    #[arg(long, visible_alias = "precompute-ref-log-probs")]
    pub precompute_ref_logps: bool,
    /// SFT objective: nll or an f-divergence (tv, pearson_chi2, neyman_chi2, squared_hellinger,
    /// jensen_shannon, reverse_kl).
    #[arg(long)]
    pub sft_loss: Option<String>,
    /// β of the f-divergence SFT objectives.
    #[arg(long)]
    pub sft_beta: Option<f64>,
    /// token or sequence.
    #[arg(long)]
    pub sft_level: Option<String>,
    /// Seed of the data order.
    #[arg(long)]
    pub seed: Option<u64>,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// CUDA activation precision: f32 (default) or bf16.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Metrics line every N steps.
    #[arg(long)]
    pub logging_steps: Option<u64>,
    /// Checkpoint every N steps (0: never).
    #[arg(long)]
    pub save_steps: Option<u64>,
    /// Keep at most N checkpoints.
    #[arg(long)]
    pub save_total_limit: Option<u64>,
    /// `latest` or a checkpoint directory.
    #[arg(long)]
    pub resume_from_checkpoint: Option<String>,
    /// Train into an output directory that holds an earlier run's metrics.jsonl or final/
    /// (replacing them); without it such a directory is refused. Checkpoints are never
    /// overwritten: resume from them or choose another directory.
    #[arg(long)]
    pub overwrite_output_dir: bool,
}

impl TrainArgs {
    /// The flags that were given, as config keys.
    fn overrides(&self) -> Result<toml::Table> {
        let mut t = toml::Table::new();
        let mut put = |k: &str, v: Option<toml::Value>| {
            if let Some(v) = v {
                t.insert(k.to_string(), v);
            }
        };
        let path = |p: &Option<PathBuf>| p.as_ref().map(|p| toml::Value::String(p.display().to_string()));
        let s = |x: &Option<String>| x.clone().map(toml::Value::String);
        let f = |x: Option<f64>| x.map(toml::Value::Float);
        let i = |x: Option<u64>| x.map(|v| toml::Value::Integer(v.min(i64::MAX as u64) as i64));
        put("model", path(&self.model));
        put("ref_model", path(&self.ref_model));
        put("data", path(&self.data));
        put("max_samples", i(self.max_samples));
        put("eval_data", path(&self.eval_data));
        put("eval_fraction", f(self.eval_fraction));
        put("eval_steps", i(self.eval_steps));
        put("output_dir", path(&self.output_dir));
        put("learning_rate", f(self.learning_rate));
        put("per_device_batch_size", i(self.per_device_batch_size));
        put("gradient_accumulation_steps", i(self.gradient_accumulation_steps));
        put("max_steps", i(self.max_steps));
        put("num_epochs", f(self.num_epochs));
        put("max_length", i(self.max_length));
        put("lr_scheduler_type", s(&self.lr_scheduler_type));
        put("warmup_steps", i(self.warmup_steps));
        put("warmup_ratio", f(self.warmup_ratio));
        put("weight_decay", f(self.weight_decay));
        put("max_grad_norm", f(self.max_grad_norm));
        put("beta", f(self.beta));
        put("loss_type", s(&self.loss_type));
        put("loss_weights", s(&self.loss_weights));
        put("f_divergence_type", s(&self.f_divergence_type));
        put("label_smoothing", f(self.label_smoothing));
        put(
            "precompute_ref_logps",
            self.precompute_ref_logps.then_some(toml::Value::Boolean(true)),
        );
        put("sft_loss", s(&self.sft_loss));
        put("sft_beta", f(self.sft_beta));
        put("sft_level", s(&self.sft_level));
        put("seed", i(self.seed));
        put("device", s(&self.device));
        put("dtype", s(&self.dtype));
        put("logging_steps", i(self.logging_steps));
        put("save_steps", i(self.save_steps));
        put("save_total_limit", i(self.save_total_limit));
        put("resume_from_checkpoint", s(&self.resume_from_checkpoint));
        put(
            "overwrite_output_dir",
            self.overwrite_output_dir.then_some(toml::Value::Boolean(true)),
        );
        Ok(t)
    }
}

/// Resolves the config and trains.
pub fn run(kind: Kind, args: &TrainArgs) -> Result<()> {
    let cfg = TrainConfig::load(kind, args.config.as_deref(), args.overrides()?)?;
    let outcome = train::run(&cfg, RunOptions { progress: true })?;
    println!(
        "done: {} steps; final model in {}",
        outcome.summary.global_step,
        outcome.summary.final_dir.display()
    );
    Ok(())
}
