//! The optimisation loop shared by the SFT and DPO trainers: data position, accumulation window,
//! clipping, schedule, AdamW, logging, evaluation, checkpoints and resume.
//!
//! One optimizer step: zero the gradients; the [`Task`] runs forward/backward over every
//! micro-batch of the window, already scaled by the window's reduction (SFT: its trained-token
//! count, DPO: its pair count — REFERENCE §6), so the accumulated gradient is the gradient of
//! the window's loss whatever the micro-batch split; `grad_norm = ‖g‖₂` (logged before
//! clipping); if `max_grad_norm > 0` and `c = max_grad_norm / (‖g‖ + 1e-6) < 1`, `g *= c`
//! (`torch.nn.utils.clip_grad_norm_`); AdamW at `lr = schedule(step)`.

use super::checkpoint::{self, TrainerState, CONFIG_FILE};
use super::config::TrainConfig;
use super::data::StepPlan;
use super::engine::Engine;
use super::metrics::{Interval, MetricsLog, Progress, METRICS_FILE};
use super::schedule::{warmup_steps, Schedule};
use crate::fsutil::write_atomic;
use crate::ops::adamw::AdamWStep;
use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};

/// What one optimizer step's window produced.
#[derive(Clone, Debug, Default)]
pub struct StepOut {
    /// The window's loss (already reduced over the window).
    pub loss: f64,
    /// Other per-step metrics, averaged over the logging interval.
    pub metrics: Vec<(&'static str, f64)>,
    /// Non-padding tokens processed (all sequences).
    pub tokens: u64,
}

/// A trainer's side of the loop.
pub trait Task<E: Engine> {
    /// How many training examples and how they are batched.
    fn plan(&self) -> StepPlan;
    /// Forward and backward over the micro-batches (example indices) of one window, adding the
    /// gradient of the window's loss into the engine.
    fn train_window(&mut self, engine: &mut E, window: &[Vec<usize>]) -> Result<StepOut>;
    /// Whether there is a held-out split.
    fn has_eval(&self) -> bool;
    /// Metrics on the held-out split, names without the `eval_` prefix.
    fn evaluate(&mut self, engine: &mut E) -> Result<Vec<(String, f64)>>;
}

/// Knobs of a run that are not part of the config.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Print progress and notes on stdout.
    pub progress: bool,
}

/// What a finished run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps completed.
    pub global_step: u64,
    /// Where the final model was written (`output_dir/final`).
    pub final_dir: PathBuf,
    /// The last training log line.
    pub last_metrics: Vec<(String, f64)>,
    /// The last evaluation, if any.
    pub last_eval: Vec<(String, f64)>,
}

/// Prepares `output_dir` for a fresh run: refuses one that already holds checkpoints (the user
/// most likely wants `--resume-from-checkpoint`), writes the resolved config.
pub fn prepare_output(cfg: &TrainConfig) -> Result<()> {
    let out = cfg.output_dir();
    if cfg.resume_from_checkpoint.is_none() {
        ensure!(
            checkpoint::list(out)?.is_empty(),
            "output_dir: {} already holds checkpoints; pass --resume-from-checkpoint latest or choose another directory",
            out.display()
        );
        let earlier = [METRICS_FILE, "final"].into_iter().find(|f| out.join(f).exists());
        if let (Some(f), false) = (earlier, cfg.overwrite_output_dir) {
            bail!(
                "output_dir: {} holds an earlier run ({f}); pass --overwrite-output-dir to replace it or choose another directory",
                out.display()
            );
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join(CONFIG_FILE), cfg.to_toml()?.as_bytes())
}

/// Runs the loop from step 0, or from the checkpoint `resume` (whose weights `engine` already
/// holds), to the end; saves checkpoints and the final model.
pub fn run<E: Engine, T: Task<E>>(
    cfg: &TrainConfig,
    engine: &mut E,
    task: &mut T,
    resume: Option<&Path>,
    opts: RunOptions,
) -> Result<RunSummary> {
    let out = cfg.output_dir().to_path_buf();
    let plan = task.plan();
    let total = plan.total_steps(cfg.max_steps, cfg.num_epochs);
    let schedule = Schedule {
        kind: cfg.lr_scheduler_type,
        base_lr: cfg.lr(),
        warmup_steps: warmup_steps(cfg.warmup_steps, cfg.warmup_ratio, total)?,
        total_steps: total,
    };
    let config_toml = cfg.to_toml()?;
    let (mut state, log, mut interval) = match resume {
        Some(dir) => {
            let st = check_resume(cfg, dir, &plan)?;
            engine.load_optimizer(&dir.join(checkpoint::OPTIMIZER_FILE))?;
            let log = MetricsLog::resume(&out, st.global_step)?;
            let interval = Interval::from_state(&st.pending_metrics);
            let st = TrainerState {
                total_steps: total,
                ..st
            };
            (st, log, interval)
        }
        None => {
            let st = TrainerState {
                total_steps: total,
                steps_per_epoch: plan.steps_per_epoch(),
                seed: plan.seed,
                ..Default::default()
            };
            (st, MetricsLog::create(&out)?, Interval::default())
        }
    };
    state.warmup_steps = schedule.warmup_steps;
    let progress = Progress::new(opts.progress, state.global_step, total, state.num_tokens);
    let mut last_metrics = Vec::new();
    let mut last_eval = Vec::new();
    while state.global_step < total {
        let step = state.global_step;
        let window = plan.window(step);
        engine.zero_grads()?;
        let so = task
            .train_window(engine, &window)
            .with_context(|| format!("step {}", step + 1))?;
        ensure!(
            so.loss.is_finite(),
            "step {}: the loss is not finite ({})",
            step + 1,
            so.loss
        );
        let norm = engine.grad_sq_norm()?.sqrt();
        ensure!(norm.is_finite(), "step {}: the gradient norm is not finite", step + 1);
        if cfg.max_grad_norm > 0.0 {
            let c = cfg.max_grad_norm / (norm + 1e-6);
            if c < 1.0 {
                engine.scale_grads(c as f32)?;
            }
        }
        let lr = schedule.lr(step);
        engine.optimizer_step(&AdamWStep {
            lr,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
            step: step + 1,
        })?;
        state.global_step = step + 1;
        state.num_tokens += so.tokens;
        state.epoch = plan.epoch_at(state.global_step);
        interval.add("loss", so.loss);
        for (k, v) in &so.metrics {
            interval.add(k, *v);
        }
        let gs = state.global_step;
        let logged = gs % cfg.logging_steps == 0 || gs == total;
        let mut shown_loss = so.loss;
        if logged {
            let mut line = interval.take_means();
            shown_loss = line.iter().find(|(k, _)| k == "loss").map_or(so.loss, |x| x.1);
            line.push(("grad_norm".into(), norm));
            // As transformers logs it: the scheduler's rate after this step (the next step's).
            line.push(("learning_rate".into(), schedule.lr(gs)));
            line.push(("epoch".into(), state.epoch));
            line.push(("num_tokens".into(), state.num_tokens as f64));
            log.write(gs, &line)?;
            last_metrics = line;
        }
        // On a logged step the terminal shows the logged (interval-mean) loss, so the two agree.
        progress.step(gs, shown_loss, lr, state.num_tokens, logged);
        if task.has_eval() && ((cfg.eval_steps > 0 && gs % cfg.eval_steps == 0) || gs == total) {
            last_eval = evaluate(engine, task, &log, gs, &progress)?;
            state.last_eval_step = gs;
        }
        if cfg.save_steps > 0 && gs % cfg.save_steps == 0 {
            state.pending_metrics = interval.to_state();
            let dir = checkpoint::save(engine, &out, &state, &config_toml)?;
            if let Some(limit) = cfg.save_total_limit {
                checkpoint::rotate(&out, limit)?;
            }
            progress.note(&format!("saved {}", dir.display()));
        }
    }
    let final_dir = out.join("final");
    engine.save_model(&final_dir)?;
    progress.note(&format!("final model: {}", final_dir.display()));
    Ok(RunSummary {
        global_step: state.global_step,
        final_dir,
        last_metrics,
        last_eval,
    })
}

fn evaluate<E: Engine, T: Task<E>>(
    engine: &mut E,
    task: &mut T,
    log: &MetricsLog,
    step: u64,
    progress: &Progress,
) -> Result<Vec<(String, f64)>> {
    let m: Vec<(String, f64)> = task
        .evaluate(engine)
        .context("evaluation")?
        .into_iter()
        .map(|(k, v)| (format!("eval_{k}"), v))
        .collect();
    log.write(step, &m)?;
    let loss = m.iter().find(|(k, _)| k == "eval_loss").map_or(f64::NAN, |x| x.1);
    progress.note(&format!("eval at step {step}: loss {loss:.4}"));
    Ok(m)
}

/// Checks that the checkpoint `dir` was written by this same run — same data order and
/// batching (`plan`), same objective — and returns its state. [`crate::train::run()`] calls it
/// before anything is written to `output_dir`, so a refused resume leaves the folder as it was.
pub fn check_resume(cfg: &TrainConfig, dir: &Path, plan: &StepPlan) -> Result<TrainerState> {
    // The settings first: a checkpoint of another kind of run, model or objective is named as
    // such rather than as a batching mismatch.
    check_same_run(cfg, dir)?;
    let st = checkpoint::load_state(dir)?;
    ensure!(
        st.steps_per_epoch == plan.steps_per_epoch() && st.seed == plan.seed,
        "resume: {} was written by a run with {} steps per epoch and seed {}, this one has {} and {} (different data or batching)",
        dir.display(),
        st.steps_per_epoch,
        st.seed,
        plan.steps_per_epoch(),
        plan.seed
    );
    Ok(st)
}

/// Refuses to resume with settings that change the data order or the objective.
fn check_same_run(cfg: &TrainConfig, dir: &Path) -> Result<()> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let old: TrainConfig = toml::from_str(&text).with_context(|| format!("{}: not a config", path.display()))?;
    for ((k, a), (_, b)) in cfg.run_identity().into_iter().zip(old.run_identity()) {
        ensure!(
            a == b,
            "resume: `{k}` is {a} but the checkpoint {} was written with {b}",
            dir.display()
        );
    }
    Ok(())
}
