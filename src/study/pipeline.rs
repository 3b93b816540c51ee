//! One seed of the study: data → fresh model → pre-training → SFT per arm → DPO per arm, each
//! stage an ordinary training run whose folder (config, metrics, final model) stays on disk.
//!
//! Layout under `seed-<s>/`: `data/` (the JSONL files and the tokenizer), `init/` (the random
//! model), `base/`, `sft-<arm>/`, `dpo-<arm>/` (training output folders; the model is in
//! `final/`).

use super::data::{write_datasets, write_tokenizer, DataFiles};
use super::{StagePlan, StudyConfig};
use crate::model::save::save_pretrained;
use crate::model::{Model, ModelConfig};
use crate::train::{self, Kind, RunOptions, ScheduleKind, TrainConfig};
use crate::Device;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Longest sequence the study trains on (prompt + the longest grammatical response + slack).
pub const MAX_LENGTH: usize = 40;

/// The trained models of one seed.
#[derive(Clone, Debug)]
pub struct SeedModels {
    /// The seed.
    pub seed: u64,
    /// Its data files.
    pub files: DataFiles,
    /// The pre-trained base model (`base/final`).
    pub base: PathBuf,
    /// Per arm, in config order: the SFT output folder (model in `final/`, `metrics.jsonl`).
    pub sft: Vec<PathBuf>,
    /// Per arm: the DPO output folder.
    pub dpo: Vec<PathBuf>,
}

/// The final model folder of a training output folder.
pub fn final_model(run_dir: &Path) -> PathBuf {
    run_dir.join("final")
}

/// Writes the tokenizer, the data and a random model for `seed` under `dir`; returns the data
/// files and the model folder.
fn prepare(cfg: &StudyConfig, seed: u64, dir: &Path) -> Result<(DataFiles, PathBuf)> {
    let data_dir = dir.join("data");
    write_tokenizer(&data_dir)?;
    let files = write_datasets(&data_dir, &cfg.sizes, seed)?;
    let mcfg = ModelConfig::from_json(cfg.shape.config_json()).context("the study's model config")?;
    let model = Model::init_random(mcfg, seed)?;
    let init = dir.join("init");
    save_pretrained(model.config(), model.params(), Some(&data_dir), &init)?;
    Ok((files, init))
}

/// Where and how one seed's stages run.
struct Stages<'a> {
    seed: u64,
    device: Device,
    dir: &'a Path,
}

impl Stages<'_> {
    /// A training run of the study: the stage's plan with a cosine schedule and 10% warmup, no
    /// intermediate checkpoints, quiet.
    fn config(&self, kind: Kind, model: &Path, data: &Path, name: &str, plan: &StagePlan) -> TrainConfig {
        TrainConfig {
            model: Some(model.to_path_buf()),
            data: Some(data.to_path_buf()),
            output_dir: Some(self.dir.join(name)),
            learning_rate: Some(plan.learning_rate),
            per_device_batch_size: plan.batch_size,
            max_steps: Some(plan.steps),
            max_length: MAX_LENGTH,
            lr_scheduler_type: ScheduleKind::Cosine,
            warmup_ratio: 0.1,
            save_steps: 0,
            logging_steps: 5,
            seed: self.seed,
            device: self.device.to_string(),
            kind: Some(kind),
            ..TrainConfig::default()
        }
    }
}

fn train(cfg: TrainConfig) -> Result<()> {
    let kind = cfg.kind();
    let cfg = cfg.resolve(kind)?;
    let out = cfg.output_dir().to_path_buf();
    train::run(&cfg, RunOptions { progress: false }).with_context(|| format!("training {}", out.display()))?;
    Ok(())
}

/// Runs every stage of one seed under `dir` on `device`, calling `note` before each.
pub fn run_seed(
    cfg: &StudyConfig,
    seed: u64,
    device: Device,
    dir: &Path,
    note: &mut dyn FnMut(&str),
) -> Result<SeedModels> {
    note(&format!("seed {seed}: data and a fresh model"));
    let (files, init) = prepare(cfg, seed, dir)?;
    let st = Stages { seed, device, dir };
    note(&format!(
        "seed {seed}: pre-training the base model ({} steps)",
        cfg.pretrain.steps
    ));
    train(st.config(Kind::Sft, &init, &files.pretrain, "base", &cfg.pretrain))?;
    let base = final_model(&dir.join("base"));
    let (mut sft, mut dpo) = (Vec::new(), Vec::new());
    for arm in &cfg.arms {
        note(&format!("seed {seed}: SFT {} → DPO", arm.label()));
        let (sft_name, dpo_name) = (format!("sft-{}", arm.slug()), format!("dpo-{}", arm.slug()));
        let plan = StagePlan {
            learning_rate: cfg.sft.learning_rate * arm.lr_factor,
            ..cfg.sft
        };
        let mut c = st.config(Kind::Sft, &base, &files.sft, &sft_name, &plan);
        c.sft_loss = Some(arm.sft_loss.clone());
        c.sft_beta = Some(cfg.sft_beta);
        train(c)?;
        let sft_run = dir.join(sft_name);
        let mut c = st.config(Kind::Dpo, &final_model(&sft_run), &files.dpo, &dpo_name, &cfg.dpo);
        c.beta = Some(cfg.dpo_beta);
        c.precompute_ref_logps = Some(true);
        train(c)?;
        sft.push(sft_run);
        dpo.push(dir.join(dpo_name));
    }
    Ok(SeedModels {
        seed,
        files,
        base,
        sft,
        dpo,
    })
}
