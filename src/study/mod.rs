//! The paper's claims as a controlled experiment on a task whose true reward is known.
//!
//! For each seed: draw the data ([`data`]) from the built-in task ([`task`]), pre-train a fresh
//! model on the base distribution, then for every [`Arm`] run SFT on the expert demonstrations
//! (an objective and a learning rate) and the same DPO after it, and evaluate every resulting
//! policy by sampling ([`evaluate`]): mean true reward, KL to the base model, win rate against the
//! default arm, and how well the implicit reward `β·log π/π_ref` ranks held-out pairs.
//! [`report`] turns the measurements into a table (JSON, Markdown) and SVG plots.
//!
//! Every stage is an ordinary `irbridge train` run ([`crate::train::run`]) on files in the output
//! folder, so the whole study is reproducible by hand and deterministic for a given config.

pub mod data;
pub mod evaluate;
pub mod pipeline;
pub mod report;
pub mod task;

use crate::analyze::{html_report, ranking_accuracy, token_rewards, RowView};
use crate::model::Model;
use crate::train::CpuEngine;
use crate::Device;
use anyhow::{bail, ensure, Context, Result};
use data::{DataSizes, ModelShape};
use evaluate::{win_rate, Evaluator, PairScores};
use pipeline::final_model;
use report::{ArmResult, SeedBaseline, StudyResults};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The per-token implicit-reward page [`run`] writes next to the results.
pub const REWARD_PAGE: &str = "implicit_rewards.html";

/// Whether a top-level entry of an output folder is one the study writes (its report files, the
/// page, or a `seed-<s>` folder) — what a rerun may remove.
pub fn is_study_output(name: &str) -> bool {
    name == REWARD_PAGE || report::REPORT_FILES.contains(&name) || name.starts_with("seed-")
}

/// Responses drawn from the true distributions to estimate their mean reward.
const DISTRIBUTION_SAMPLES: usize = 8192;
/// Held-out pairs shown on the implicit-reward page.
const PAGE_PAIRS: usize = 24;

/// One SFT recipe of the grid: an objective at a multiple of the usual SFT learning rate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Arm {
    /// `nll` or an f-divergence SFT objective (`pearson_chi2`, `jensen_shannon`, ...).
    pub sft_loss: String,
    /// Multiple of [`StagePlan::learning_rate`] of the SFT stage.
    pub lr_factor: f64,
}

impl Arm {
    /// Folder-safe name, e.g. `nll-lr1` or `jensen_shannon-lr0.25`.
    pub fn slug(&self) -> String {
        format!("{}-lr{}", self.sft_loss, self.lr_factor)
    }

    /// Display name, e.g. `nll, lr×1`.
    pub fn label(&self) -> String {
        format!("{}, lr×{}", self.sft_loss, self.lr_factor)
    }
}

/// Optimisation settings of one stage.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StagePlan {
    /// Optimizer steps.
    pub steps: u64,
    /// Peak learning rate (cosine decay after a 10% warmup).
    pub learning_rate: f64,
    /// Sequences (or pairs) per step.
    pub batch_size: usize,
}

/// Everything that defines a study run; equal configs give equal results. As JSON (the demo
/// writes it as `study.json`), top-level keys left out take [`StudyConfig::quick`]'s values; a
/// nested object (`shape`, `sizes`, `pretrain`, `sft`, `dpo`, an arm) is given whole.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StudyConfig {
    /// One full pipeline per seed (data, initialisation, data order, sampling).
    pub seeds: Vec<u64>,
    /// The model trained from scratch on the base distribution.
    pub shape: ModelShape,
    /// Dataset sizes per seed.
    pub sizes: DataSizes,
    /// Pre-training on the base distribution.
    pub pretrain: StagePlan,
    /// SFT on the demonstrations; its learning rate is the "usual" one the arms scale.
    pub sft: StagePlan,
    /// β of the f-divergence SFT objectives.
    pub sft_beta: f64,
    /// The SFT recipes compared; the first is the default the win rates are measured against.
    pub arms: Vec<Arm>,
    /// DPO after each SFT arm (reference: that arm's SFT model).
    pub dpo: StagePlan,
    /// DPO β (also the β of the implicit rewards that are ranked).
    pub dpo_beta: f64,
    /// Responses sampled per topic to evaluate each policy.
    pub samples_per_topic: usize,
}

impl Default for StudyConfig {
    fn default() -> Self {
        Self::quick()
    }
}

impl StudyConfig {
    /// Reads a JSON study config (e.g. a demo's `study.json`), naming the file and the line of a
    /// syntax error or unknown key.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let cfg: StudyConfig =
            serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), e.line()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rejects grids that cannot run, naming the key.
    pub fn validate(&self) -> Result<()> {
        ensure!(!self.seeds.is_empty(), "seeds: give at least one seed");
        let mut seen = std::collections::BTreeSet::new();
        if let Some(s) = self.seeds.iter().find(|&&s| !seen.insert(s)) {
            bail!("seeds: {s} is listed twice; a repeated seed repeats the same run and fakes a spread");
        }
        ensure!(!self.arms.is_empty(), "arms: give at least one SFT arm");
        for (i, a) in self.arms.iter().enumerate() {
            a.sft_loss
                .parse::<crate::train::SftObjective>()
                .with_context(|| format!("arms[{i}].sft_loss"))?;
            ensure!(
                a.lr_factor.is_finite() && a.lr_factor > 0.0,
                "arms[{i}].lr_factor: must be > 0, got {}",
                a.lr_factor
            );
        }
        for (name, p) in [("pretrain", &self.pretrain), ("sft", &self.sft), ("dpo", &self.dpo)] {
            ensure!(p.steps > 0, "{name}.steps: must be ≥ 1");
            ensure!(p.batch_size > 0, "{name}.batch_size: must be ≥ 1");
            ensure!(
                p.learning_rate.is_finite() && p.learning_rate > 0.0,
                "{name}.learning_rate: must be > 0, got {}",
                p.learning_rate
            );
        }
        let s = &self.sizes;
        ensure!(
            (0.0..=1.0).contains(&s.pair_expert_fraction),
            "sizes.pair_expert_fraction: must be in [0, 1], got {}",
            s.pair_expert_fraction
        );
        for (name, n) in [
            ("sizes.pretrain", s.pretrain),
            ("sizes.demos", s.demos),
            ("sizes.pairs", s.pairs),
            ("sizes.heldout_pairs", s.heldout_pairs),
            ("samples_per_topic", self.samples_per_topic),
        ] {
            ensure!(n > 0, "{name}: must be ≥ 1");
        }
        let m = &self.shape;
        ensure!(
            m.heads > 0 && m.kv_heads > 0 && m.hidden.is_multiple_of(m.heads) && m.heads.is_multiple_of(m.kv_heads),
            "shape: hidden must divide into heads, and heads into kv_heads"
        );
        ensure!(
            (m.hidden / m.heads).is_multiple_of(2),
            "shape: the head width hidden/heads must be even (rotary)"
        );
        for (k, b) in [("sft_beta", self.sft_beta), ("dpo_beta", self.dpo_beta)] {
            ensure!(b.is_finite() && b > 0.0, "{k}: must be > 0, got {b}");
        }
        Ok(())
    }

    /// The `irbridge demo` default: two seeds, four arms (NLL at the usual learning rate, at ½ and
    /// ¼ of it, and Jensen–Shannon at the usual one), sized to finish in about three minutes on
    /// two CPU cores.
    pub fn quick() -> Self {
        let arm = |loss: &str, f: f64| Arm {
            sft_loss: loss.into(),
            lr_factor: f,
        };
        StudyConfig {
            seeds: vec![1, 2],
            shape: ModelShape {
                hidden: 64,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 128,
            },
            sizes: DataSizes {
                pretrain: 4096,
                demos: 512,
                pairs: 1024,
                heldout_pairs: 256,
                pair_expert_fraction: 0.5,
            },
            pretrain: StagePlan {
                steps: 2000,
                learning_rate: 3e-3,
                batch_size: 32,
            },
            sft: StagePlan {
                steps: 300,
                learning_rate: 1e-3,
                batch_size: 16,
            },
            sft_beta: 0.1,
            arms: vec![
                arm("nll", 1.0),
                arm("nll", 0.5),
                arm("nll", 0.25),
                arm("jensen_shannon", 1.0),
            ],
            dpo: StagePlan {
                steps: 200,
                learning_rate: 2e-5,
                batch_size: 32,
            },
            dpo_beta: 0.1,
            samples_per_topic: 64,
        }
    }

    /// `irbridge demo --full`: five seeds; NLL at four learning rates (×1, ½, ¼, ⅛) and every
    /// other f-divergence objective at two (×1, ¼); twice the samples per evaluation.
    pub fn full() -> Self {
        let mut arms = Vec::new();
        for f in [1.0, 0.5, 0.25, 0.125] {
            arms.push(Arm {
                sft_loss: "nll".into(),
                lr_factor: f,
            });
        }
        for loss in [
            "pearson_chi2",
            "neyman_chi2",
            "squared_hellinger",
            "jensen_shannon",
            "reverse_kl",
        ] {
            for f in [1.0, 0.25] {
                arms.push(Arm {
                    sft_loss: loss.into(),
                    lr_factor: f,
                });
            }
        }
        StudyConfig {
            seeds: vec![1, 2, 3, 4, 5],
            arms,
            samples_per_topic: 128,
            ..Self::quick()
        }
    }
}

/// Runs the study into `out` (one `seed-<s>/` folder per seed), training and sampling on
/// `device` (scoring on the CPU, see [`evaluate`]), calling `note` at every stage, and returns
/// what it measured. Also writes `implicit_rewards.html`: the first seed's default SFT model
/// against the base model on held-out pairs, token by token.
pub fn run(cfg: &StudyConfig, out: &Path, device: Device, note: &mut dyn FnMut(&str)) -> Result<StudyResults> {
    cfg.validate()?;
    let (mut baselines, mut runs) = (Vec::new(), Vec::new());
    for (k, &seed) in cfg.seeds.iter().enumerate() {
        let dir = out.join(format!("seed-{seed}"));
        let models = pipeline::run_seed(cfg, seed, device, &dir, note)?;
        note(&format!("seed {seed}: evaluating every model by sampling"));
        let mut ev = Evaluator::new(
            &models.base,
            [&models.files.heldout, &models.files.heldout_base],
            cfg.samples_per_topic,
            seed,
            device,
        )?;
        baselines.push(SeedBaseline {
            seed,
            base: ev.policy(&Model::load(&models.base)?)?,
            base_distribution_reward: task::mean_reward(&task::BASE, seed, DISTRIBUTION_SAMPLES),
            expert_distribution_reward: task::mean_reward(&task::EXPERT, seed, DISTRIBUTION_SAMPLES),
        });
        let first = runs.len();
        for (i, (sft_dir, dpo_dir)) in models.sft.iter().zip(&models.dpo).enumerate() {
            let mut sft = CpuEngine::load(&final_model(sft_dir))?;
            let mut dpo = CpuEngine::load(&final_model(dpo_dir))?;
            let sft_scores = ev.pair_scores(&mut sft)?;
            let dpo_scores = ev.pair_scores(&mut dpo)?;
            if k == 0 && i == 0 {
                write_reward_page(cfg, &ev, sft.model(), &out.join(REWARD_PAGE))?;
            }
            runs.push(ArmResult {
                seed,
                arm: i,
                sft: ev.policy(sft.model())?,
                dpo: ev.policy(dpo.model())?,
                win_rate: 0.0,
                sft_ranking: rankings(&sft_scores, ev.base_pair_scores())?,
                dpo_ranking: rankings(&dpo_scores, &sft_scores)?,
                sft_dir: sft_dir.clone(),
                dpo_dir: dpo_dir.clone(),
            });
        }
        let default = runs[first].dpo.rewards.clone();
        for r in &mut runs[first..] {
            r.win_rate = win_rate(&r.dpo.rewards, &default);
        }
    }
    Ok(StudyResults {
        config: cfg.clone(),
        baselines,
        runs,
    })
}

/// Ranking accuracy of `policy` against `reference` on both held-out sets.
fn rankings(policy: &[PairScores; 2], reference: &[PairScores; 2]) -> Result<[f64; 2]> {
    Ok([
        ranking_accuracy(&policy[0], &reference[0])?,
        ranking_accuracy(&policy[1], &reference[1])?,
    ])
}

/// The Q-function view of claim (c): per-token implicit rewards of an SFT model against the base
/// model on held-out pairs.
fn write_reward_page(cfg: &StudyConfig, ev: &Evaluator, sft: &Model, path: &Path) -> Result<()> {
    let pairs = &ev.heldout()[..ev.heldout().len().min(PAGE_PAIRS)];
    let seqs: Vec<&crate::data::TokenizedSeq> = pairs.iter().flat_map(|p| [&p.chosen.seq, &p.rejected.seq]).collect();
    let pad = ev.tokenizer().pad_id()?;
    let rw = token_rewards(sft, ev.base(), &seqs, pad, cfg.dpo_beta, 64)?;
    let views: Vec<RowView> = pairs
        .iter()
        .zip(rw.chunks_exact(2))
        .map(|(p, c)| RowView {
            source: &p.source,
            chosen: &c[0],
            rejected: Some(&c[1]),
        })
        .collect();
    let right = rw.chunks_exact(2).filter(|c| c[0].total > c[1].total).count();
    let summary = vec![
        (
            "policy".to_string(),
            format!("SFT {} (seed {})", cfg.arms[0].label(), cfg.seeds[0]),
        ),
        ("reference".to_string(), "the pre-trained base model".to_string()),
        ("β".to_string(), cfg.dpo_beta.to_string()),
        (
            "pairs shown ranked right".to_string(),
            format!("{right} of {}", views.len()),
        ),
    ];
    let html = html_report(
        "Implicit rewards of an SFT model on held-out preference pairs",
        &summary,
        ev.tokenizer(),
        &views,
    )?;
    crate::fsutil::write_atomic(path, html.as_bytes())
}
