//! `irbridge eval`: the preference loss and the REFERENCE §5 metrics of a policy against a
//! reference over a whole file, printed as one JSON object (mean over pairs, as a step loss).

use super::progress::Progress;
use super::{load_dataset, Dataset, EngineFn, ModelArgs};
use anyhow::{bail, Context, Result};
use clap::Args;
use irbridge::data::{DpoExample, Tokenizer};
use irbridge::model::Model;
use irbridge::ops::prefloss::{FDivergence, LossType, PrefLossConfig};
use irbridge::score::{preference_metrics, score_pairs, SeqScore, DEFAULT_SCORE_BATCH};
use irbridge::train::Engine;
use serde_json::{Map, Value};
use std::path::PathBuf;

/// Arguments of `irbridge eval`.
#[derive(Args)]
pub struct EvalArgs {
    /// The policy checkpoint (its tokenizer is used for both models).
    #[arg(long)]
    policy: PathBuf,
    /// The reference checkpoint (must share the policy's tokenizer).
    #[arg(long = "ref", visible_alias = "ref-model")]
    reference: PathBuf,
    #[command(flatten)]
    common: ModelArgs,
    /// β of the implicit reward.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// TRL loss type(s), comma-separated (e.g. `sigmoid` or `sigmoid,sft`).
    #[arg(long, default_value = "sigmoid")]
    loss_type: String,
    /// Weights of the loss types (default 1 each).
    #[arg(long)]
    loss_weights: Option<String>,
    /// f-divergence score of the log-ratios.
    #[arg(long, default_value = "reverse_kl")]
    f_divergence_type: String,
    /// Label smoothing ε (conservative DPO / robust).
    #[arg(long, default_value_t = 0.0)]
    label_smoothing: f64,
}

/// Builds the preference-loss configuration from TRL-named flags.
pub fn pref_config(
    beta: f64,
    loss_type: &str,
    loss_weights: Option<&str>,
    f_divergence_type: &str,
    label_smoothing: f64,
) -> Result<PrefLossConfig> {
    let types: Vec<LossType> = loss_type.split(',').map(|s| s.trim().parse()).collect::<Result<_>>()?;
    let weights: Vec<f64> = match loss_weights {
        None => vec![1.0; types.len()],
        Some(w) => w
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<f64>()
                    .map_err(|e| anyhow::anyhow!("--loss-weights: `{s}`: {e}"))
            })
            .collect::<Result<_>>()?,
    };
    if weights.len() != types.len() {
        bail!(
            "--loss-weights has {} values for {} loss types",
            weights.len(),
            types.len()
        );
    }
    let mut cfg = PrefLossConfig::single(types[0]);
    cfg.terms = types.into_iter().zip(weights).collect();
    cfg.beta = beta;
    cfg.f_divergence = f_divergence_type.parse::<FDivergence>()?;
    cfg.label_smoothing = label_smoothing;
    cfg.validate()?;
    Ok(cfg)
}

/// Chosen/rejected scores of the kept pairs on whichever engine, with a progress bar.
struct Pairs<'a> {
    kept: &'a [&'a DpoExample],
    pad: u32,
    label: &'static str,
}

impl EngineFn<Vec<(SeqScore, SeqScore)>> for Pairs<'_> {
    fn call<E: Engine>(self, engine: &mut E) -> Result<Vec<(SeqScore, SeqScore)>> {
        let mut bar = Progress::new(self.label, self.kept.len());
        score_pairs(engine, self.kept, self.pad, DEFAULT_SCORE_BATCH, &mut |n| bar.update(n))
    }
}

/// Runs `irbridge eval`.
pub fn run(args: EvalArgs) -> Result<()> {
    let device = args.common.check_device()?;
    let cfg = pref_config(
        args.beta,
        &args.loss_type,
        args.loss_weights.as_deref(),
        &args.f_divergence_type,
        args.label_smoothing,
    )?;
    let tok = Tokenizer::from_dir(&args.policy)?;
    let policy = Model::load(&args.policy)?;
    let reference = Model::load(&args.reference).with_context(|| format!("--ref {}", args.reference.display()))?;
    super::check_same_vocabulary(&policy, &args.policy, &reference, &args.reference)?;
    args.common.check_positions(&policy, &args.policy)?;
    args.common.check_positions(&reference, &args.reference)?;
    let pad = tok.pad_id()?;
    let Dataset::Dpo(ds) = load_dataset(&args.common.data, &tok, args.common.max_length)? else {
        bail!(
            "{}: eval needs preference rows (prompt/chosen/rejected)",
            args.common.data.display()
        );
    };
    let kept: Vec<_> = ds.kept().collect();
    if kept.is_empty() {
        bail!(
            "{}: no pair survived tokenisation ({})",
            args.common.data.display(),
            ds.report.summary()
        );
    }
    // One model on the device at a time: the policy is scored and dropped before the reference.
    let score = |label, model| {
        let pairs = Pairs {
            kept: &kept,
            pad,
            label,
        };
        args.common.with_engine(device, model, pairs)
    };
    let pol = score("eval policy", policy)?;
    let refs = score("eval reference", reference)?;
    let (_, metrics) = preference_metrics(&cfg, &pol, &refs)?;
    eprintln!("{}", ds.report);
    let mut out = Map::new();
    for (k, v) in metrics.named() {
        out.insert(k.to_string(), Value::from(v));
    }
    out.insert("n_pairs".into(), Value::from(kept.len()));
    out.insert("n_dropped".into(), Value::from(ds.report.n_dropped()));
    println!("{}", Value::Object(out));
    Ok(())
}
