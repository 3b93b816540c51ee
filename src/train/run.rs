//! Entry points: a resolved [`TrainConfig`] in, a finished run out. Everything that can fail on
//! user input (config, model, tokenizer, data, resume checkpoint) is checked before anything is
//! written to `output_dir`.

use super::checkpoint;
use super::config::{Kind, TrainConfig};
use super::cuda_engine::CudaEngine;
use super::data::{split_eval, StepPlan};
use super::dpo::{cached_reference, ref_cache_key, DpoTask, PairSeqs, RefSource};
use super::engine::{CpuEngine, Engine};
use super::sft::SftTask;
use super::trainer::{self, RunOptions, RunSummary};
use crate::data::{read_records, tokenize_dpo, tokenize_sft, TokenizeOptions, TokenizeReport, TokenizedSeq, Tokenizer};
use crate::model::{Arch, ModelConfig};
use crate::Device;
use anyhow::{anyhow, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// A finished run and what tokenisation reported.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The loop's summary.
    pub summary: RunSummary,
    /// Counts of the training data file (drops, truncations, identical pairs, ...).
    pub train_report: TokenizeReport,
    /// Counts of the eval data file, when one was given.
    pub eval_report: Option<TokenizeReport>,
}

/// Runs `train sft` or `train dpo` on the configured device. A CUDA device that cannot be used
/// (no driver, no GPU, a build without kernels) fails here, before anything is written.
pub fn run(cfg: &TrainConfig, opts: RunOptions) -> Result<Outcome> {
    let device: Device = cfg.device.parse().map_err(|e| anyhow!("device: {e}"))?;
    let precision = cfg.precision()?;
    match device.ensure_available().map_err(|e| anyhow!("device: {e}"))? {
        Device::Cpu => run_with(cfg, opts, &CpuEngine::load),
        Device::Cuda(n) => run_with(cfg, opts, &|dir: &Path| CudaEngine::load(dir, n, precision)),
    }
}

/// Runs with any [`Engine`]; `load` builds one from a model directory.
pub fn run_with<E: Engine>(cfg: &TrainConfig, opts: RunOptions, load: &dyn Fn(&Path) -> Result<E>) -> Result<Outcome> {
    let model_dir = cfg.model.clone().context("model: required")?;
    let mcfg = ModelConfig::load(&model_dir)?;
    if mcfg.arch == Arch::Gpt2 {
        ensure!(
            cfg.max_length <= mcfg.max_positions,
            "max_length: {} exceeds the model's {} learned positions (n_positions)",
            cfg.max_length,
            mcfg.max_positions
        );
    }
    let resume = cfg
        .resume_from_checkpoint
        .as_deref()
        .map(|s| checkpoint::resolve(s, cfg.output_dir()))
        .transpose()?;
    let tok = Tokenizer::from_dir(&model_dir)?;
    let pad = tok.pad_id()?;
    let topts = TokenizeOptions {
        max_length: cfg.max_length,
        ..Default::default()
    };
    let note = |m: &str| {
        if opts.progress {
            println!("{m}");
        }
    };
    let data_path = cfg.data.clone().context("data: required")?;
    let mut records = read_records(&data_path)?;
    if let Some(n) = cfg.max_samples {
        records.truncate(n);
    }
    let eval_records = cfg.eval_data.as_deref().map(read_records).transpose()?;
    let mut policy = load(resume.as_deref().unwrap_or(&model_dir))
        .with_context(|| format!("loading {}", resume.as_deref().unwrap_or(&model_dir).display()))?;
    match cfg.kind() {
        Kind::Sft => {
            let ds = tokenize_sft(&records, &tok, &topts)?;
            let eds = eval_records
                .as_deref()
                .map(|r| tokenize_sft(r, &tok, &topts))
                .transpose()?;
            note(&format!("training data {}:\n{}", data_path.display(), ds.report));
            let kept: Vec<TokenizedSeq> = ds.kept().map(|e| e.info.seq.clone()).collect();
            let (train, eval) = match &eds {
                Some(e) => (kept, e.kept().map(|e| e.info.seq.clone()).collect()),
                None => split(kept, cfg),
            };
            ensure!(
                !train.is_empty(),
                "data: no training example reaches the loss (see the report)"
            );
            check_eval(cfg, eds.as_ref().map(|e| &e.report), eval.is_empty(), &note)?;
            check_resume(cfg, resume.as_deref(), train.len())?;
            trainer::prepare_output(cfg)?;
            let mut task = match &resume {
                None => SftTask::new(cfg, train, eval, pad, &mut policy)?,
                Some(_) => SftTask::new(cfg, train, eval, pad, &mut load(&model_dir)?)?,
            };
            let summary = trainer::run(cfg, &mut policy, &mut task, resume.as_deref(), opts)?;
            Ok(Outcome {
                summary,
                train_report: ds.report,
                eval_report: eds.map(|e| e.report),
            })
        }
        Kind::Dpo => {
            let ds = tokenize_dpo(&records, &tok, &topts)?;
            let eds = eval_records
                .as_deref()
                .map(|r| tokenize_dpo(r, &tok, &topts))
                .transpose()?;
            note(&format!("training data {}:\n{}", data_path.display(), ds.report));
            let kept: Vec<PairSeqs> = ds.kept().map(PairSeqs::from).collect();
            let (train, eval) = match &eds {
                Some(e) => (kept, e.kept().map(PairSeqs::from).collect()),
                None => split(kept, cfg),
            };
            ensure!(
                !train.is_empty(),
                "data: no preference pair reaches the loss (see the report)"
            );
            check_eval(cfg, eds.as_ref().map(|e| &e.report), eval.is_empty(), &note)?;
            check_resume(cfg, resume.as_deref(), train.len())?;
            let ref_dir: PathBuf = cfg.ref_model.clone().unwrap_or_else(|| model_dir.clone());
            trainer::prepare_output(cfg)?;
            let reference = if cfg.precompute_ref_logps.unwrap_or(false) {
                let mut files: Vec<&Path> = vec![&data_path];
                files.extend(cfg.eval_data.as_deref());
                let key = ref_cache_key(&ref_dir, &files, cfg.max_length)?;
                let key = format!("{key}:{}:{}", cfg.eval_fraction, cfg.seed);
                let key = hex_sha(&key);
                let bs = cfg.per_device_batch_size;
                let out = cfg.output_dir();
                let (t, e, hit) = if resume.is_none() && cfg.ref_model.is_none() {
                    cached_reference(&mut policy, out, &key, &train, &eval, bs, pad)?
                } else {
                    cached_reference(&mut load(&ref_dir)?, out, &key, &train, &eval, bs, pad)?
                };
                note(if hit {
                    "reference log-probs: reused the cache"
                } else {
                    "reference log-probs: computed and cached"
                });
                RefSource::Cached { train: t, eval: e }
            } else {
                RefSource::Live(load(&ref_dir).with_context(|| format!("loading the reference {}", ref_dir.display()))?)
            };
            let mut task = DpoTask::new(cfg, train, eval, pad, reference)?;
            let summary = trainer::run(cfg, &mut policy, &mut task, resume.as_deref(), opts)?;
            Ok(Outcome {
                summary,
                train_report: ds.report,
                eval_report: eds.map(|e| e.report),
            })
        }
    }
}

/// Prints the eval file's report, and refuses an eval file of which nothing reaches the loss:
/// the user asked for evaluation, so a run that silently skips it would mislead.
fn check_eval(cfg: &TrainConfig, report: Option<&TokenizeReport>, eval_empty: bool, note: &dyn Fn(&str)) -> Result<()> {
    if let (Some(path), Some(report)) = (cfg.eval_data.as_deref(), report) {
        note(&format!("eval data {}:\n{report}", path.display()));
        ensure!(
            !eval_empty,
            "eval_data: no example of {} reaches the loss (see the report: {} rows, {} dropped)",
            path.display(),
            report.n_rows,
            report.n_dropped()
        );
    }
    Ok(())
}

/// Validates a resume against the checkpoint before `output_dir` is touched.
fn check_resume(cfg: &TrainConfig, resume: Option<&Path>, n_train: usize) -> Result<()> {
    if let Some(dir) = resume {
        let plan = StepPlan::new(
            n_train,
            cfg.per_device_batch_size,
            cfg.gradient_accumulation_steps,
            cfg.seed,
        )?;
        trainer::check_resume(cfg, dir, &plan)?;
    }
    Ok(())
}

/// Holds out `eval_fraction` of the kept examples (seeded), keeping both parts in data order.
fn split<T>(kept: Vec<T>, cfg: &TrainConfig) -> (Vec<T>, Vec<T>) {
    if cfg.eval_fraction <= 0.0 {
        return (kept, Vec::new());
    }
    let (tr, ev) = split_eval(cfg.seed, kept.len(), cfg.eval_fraction);
    let mut slots: Vec<Option<T>> = kept.into_iter().map(Some).collect();
    let mut take = |ix: Vec<usize>| ix.into_iter().filter_map(|i| slots[i].take()).collect::<Vec<T>>();
    let train = take(tr);
    let eval = take(ev);
    (train, eval)
}

fn hex_sha(s: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
