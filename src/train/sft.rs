//! The SFT trainer: token-mean NLL, or one of the paper's f-divergence objectives anchored to the
//! initial checkpoint (REFERENCE §1.3).
//!
//! Reduction (REFERENCE §6): the loss of a step is `Σ_tokens loss_t / N` where `N` is the number
//! of trained tokens in the WHOLE accumulation window (known before any backward, since the
//! targets are), so `8×1`, `4×2` and `1×8` give the same gradient. The sequence-level
//! f-divergence loss `−h(s)/β` per sequence is divided by the same `N`: its gradient is then
//! `−h'(s)/N` on every token of the sequence, which at `π = π_ref` is exactly token-mean NLL's.
//!
//! The reference log-probs (f-divergence objectives; and the eval split's, for the log-ratio
//! metric) come from the initial checkpoint, computed once before training in a fixed batching
//! (dataset order, `per_device_batch_size`) and kept in memory. A resumed run recomputes them
//! from `model` the same way, so they are bit-identical.
//!
//! Metrics: `loss`, `mean_token_accuracy` (argmax == target over trained tokens), `entropy`
//! (mean over trained tokens), and for f-divergences `nll` and `clamped_tokens` (tokens or
//! sequences whose score was clamped to the divergence's safe range, per step). Eval adds `nll`
//! and `log_ratio` (mean per-token `log π − log π_ref`) for every objective.

use super::config::{SftLevel, SftObjective, TrainConfig};
use super::data::{to_model_batch, StepPlan};
use super::engine::{Engine, TokenOutputs};
use super::trainer::{StepOut, Task};
use crate::data::{self, TokenizedSeq};
use crate::ops::logsoftmax::IGNORE_INDEX;
use crate::ops::seqreduce::segment_ids_from_mask;
use crate::ops::sftloss::{self, SftDivergence};
use anyhow::{ensure, Result};

/// The SFT side of the loop.
pub struct SftTask {
    objective: SftObjective,
    beta: f64,
    level: SftLevel,
    pad_id: u32,
    batch_size: usize,
    plan: StepPlan,
    train: Vec<TokenizedSeq>,
    eval: Vec<TokenizedSeq>,
    ref_train: Option<Vec<Vec<f32>>>,
    ref_eval: Option<Vec<Vec<f32>>>,
}

/// Per-micro-batch sums, reduced to metrics by the window or eval.
#[derive(Default)]
struct Sums {
    loss: f64,
    nll: f64,
    log_ratio: f64,
    correct: u64,
    entropy: f64,
    targets: u64,
    tokens: u64,
    clamped: u64,
}

impl SftTask {
    /// Builds the task over tokenised sequences. `reference` is the initial checkpoint (the
    /// policy itself at step 0); it computes the reference log-probs that the objective and the
    /// eval metrics need.
    pub fn new<E: Engine>(
        cfg: &TrainConfig,
        train: Vec<TokenizedSeq>,
        eval: Vec<TokenizedSeq>,
        pad_id: u32,
        reference: &mut E,
    ) -> Result<Self> {
        let objective = cfg.sft_objective()?;
        let bs = cfg.per_device_batch_size;
        let plan = StepPlan::new(train.len(), bs, cfg.gradient_accumulation_steps, cfg.seed)?;
        let ref_train = match objective {
            SftObjective::Nll => None,
            SftObjective::FDiv(_) => Some(reference_logps(reference, &train, bs, pad_id)?),
        };
        let ref_eval = if eval.is_empty() {
            None
        } else {
            Some(reference_logps(reference, &eval, bs, pad_id)?)
        };
        Ok(SftTask {
            objective,
            beta: cfg.sft_beta.unwrap_or(0.1),
            level: cfg.sft_level.unwrap_or_default(),
            pad_id,
            batch_size: bs,
            plan,
            train,
            eval,
            ref_train,
            ref_eval,
        })
    }

    /// Forward of one micro-batch, its objective, and (when `scale` is given) the backward of
    /// `loss · scale`.
    fn micro<E: Engine>(
        &self,
        engine: &mut E,
        seqs: &[&TokenizedSeq],
        refs: Option<Vec<&[f32]>>,
        scale: Option<f64>,
        sums: &mut Sums,
    ) -> Result<()> {
        let db = data::Batch::from_seqs(seqs, self.pad_id)?;
        let mb = to_model_batch(&db)?;
        let f = engine.forward(&mb)?;
        let (b, t) = (db.batch_size, db.seq_len);
        let mask: Vec<u8> = db.targets.iter().map(|&x| u8::from(x != IGNORE_INDEX)).collect();
        let logp = f.logp();
        let ref_padded = refs.map(|r| scatter_rows(&r, &db.targets, b, t)).transpose()?;
        let mut dloss = vec![0f32; b * t];
        match (self.objective, &ref_padded) {
            (SftObjective::FDiv(div), Some(rp)) => {
                let clamped = self.fdiv(div, logp, rp, &mask, b, t, &mut dloss, &mut sums.loss)?;
                sums.clamped += clamped as u64;
            }
            _ => {
                for (i, &m) in mask.iter().enumerate() {
                    if m != 0 {
                        sums.loss -= logp[i] as f64;
                        dloss[i] = -1.0;
                    }
                }
            }
        }
        let (argmax, entropy) = (f.argmax(), f.entropy());
        for (i, &m) in mask.iter().enumerate() {
            if m != 0 {
                sums.nll -= logp[i] as f64;
                sums.entropy += entropy[i] as f64;
                sums.correct += u64::from(i64::from(argmax[i]) == db.targets[i]);
                if let Some(rp) = &ref_padded {
                    sums.log_ratio += logp[i] as f64 - rp[i] as f64;
                }
            }
        }
        sums.targets += db.total_targets() as u64;
        sums.tokens += db.lengths.iter().sum::<usize>() as u64;
        if let Some(scale) = scale {
            let dlogp: Vec<f32> = dloss.iter().map(|&d| (d as f64 * scale) as f32).collect();
            engine.backward(&f, &dlogp)?;
        }
        Ok(())
    }

    /// The f-divergence objective on one micro-batch: adds the loss sum, writes `dloss/dlogp`.
    #[allow(clippy::too_many_arguments)]
    fn fdiv(
        &self,
        div: SftDivergence,
        logp: &[f32],
        ref_logp: &[f32],
        mask: &[u8],
        b: usize,
        t: usize,
        dloss: &mut [f32],
        loss_sum: &mut f64,
    ) -> Result<usize> {
        match self.level {
            SftLevel::Token => {
                let mut loss = vec![0f32; b * t];
                let c = sftloss::token_forward_cpu(div, self.beta, logp, ref_logp, mask, &mut loss, dloss)?;
                *loss_sum += loss.iter().map(|&x| x as f64).sum::<f64>();
                Ok(c)
            }
            SftLevel::Sequence => {
                let seg = segment_ids_from_mask(mask, b, t)?;
                let mut seq_loss = vec![0f64; b];
                let mut d = vec![0f64; b * t];
                let l64: Vec<f64> = logp.iter().map(|&x| x as f64).collect();
                let r64: Vec<f64> = ref_logp.iter().map(|&x| x as f64).collect();
                let c = sftloss::sequence_forward_cpu(div, self.beta, &l64, &r64, &seg, b, &mut seq_loss, &mut d)?;
                *loss_sum += seq_loss.iter().sum::<f64>();
                dloss.iter_mut().zip(&d).for_each(|(o, &x)| *o = x as f32);
                Ok(c)
            }
        }
    }
}

/// Places each row's per-target values (in target order) into the padded `[B, T]` layout.
fn scatter_rows(rows: &[&[f32]], targets: &[i64], b: usize, t: usize) -> Result<Vec<f32>> {
    let mut out = vec![0f32; b * t];
    for (r, vals) in rows.iter().enumerate() {
        let pos: Vec<usize> = (0..t).filter(|&j| targets[r * t + j] != IGNORE_INDEX).collect();
        ensure!(
            pos.len() == vals.len(),
            "reference log-probs: row {r} has {} trained tokens but {} cached values",
            pos.len(),
            vals.len()
        );
        for (&j, &v) in pos.iter().zip(vals.iter()) {
            out[r * t + j] = v;
        }
    }
    Ok(out)
}

/// Per-sequence log-probs of the trained tokens (in order), batched in dataset order.
pub fn reference_logps<E: Engine>(
    engine: &mut E,
    seqs: &[TokenizedSeq],
    batch_size: usize,
    pad_id: u32,
) -> Result<Vec<Vec<f32>>> {
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size) {
        let refs: Vec<&TokenizedSeq> = chunk.iter().collect();
        let db = data::Batch::from_seqs(&refs, pad_id)?;
        let f = engine.forward(&to_model_batch(&db)?)?;
        let t = db.seq_len;
        for r in 0..db.batch_size {
            out.push(
                (0..t)
                    .filter(|&j| db.targets[r * t + j] != IGNORE_INDEX)
                    .map(|j| f.logp()[r * t + j])
                    .collect(),
            );
        }
    }
    Ok(out)
}

impl<E: Engine> Task<E> for SftTask {
    fn plan(&self) -> StepPlan {
        self.plan
    }

    fn train_window(&mut self, engine: &mut E, window: &[Vec<usize>]) -> Result<StepOut> {
        let n_window: usize = window.iter().flatten().map(|&i| self.train[i].n_completion()).sum();
        ensure!(n_window > 0, "the window has no trained tokens");
        let scale = 1.0 / n_window as f64;
        let mut sums = Sums::default();
        for micro in window {
            let seqs: Vec<&TokenizedSeq> = micro.iter().map(|&i| &self.train[i]).collect();
            let refs = self
                .ref_train
                .as_ref()
                .map(|r| micro.iter().map(|&i| r[i].as_slice()).collect());
            self.micro(engine, &seqs, refs, Some(scale), &mut sums)?;
        }
        let n = sums.targets as f64;
        let mut metrics = vec![
            ("mean_token_accuracy", sums.correct as f64 / n),
            ("entropy", sums.entropy / n),
        ];
        if let SftObjective::FDiv(_) = self.objective {
            metrics.push(("nll", sums.nll / n));
            metrics.push(("clamped_tokens", sums.clamped as f64));
        }
        Ok(StepOut {
            loss: sums.loss * scale,
            metrics,
            tokens: sums.tokens,
        })
    }

    fn has_eval(&self) -> bool {
        !self.eval.is_empty()
    }

    fn evaluate(&mut self, engine: &mut E) -> Result<Vec<(String, f64)>> {
        let mut sums = Sums::default();
        for (k, chunk) in self.eval.chunks(self.batch_size).enumerate() {
            let seqs: Vec<&TokenizedSeq> = chunk.iter().collect();
            let refs = self.ref_eval.as_ref().map(|r| {
                r[k * self.batch_size..k * self.batch_size + chunk.len()]
                    .iter()
                    .map(Vec::as_slice)
                    .collect()
            });
            self.micro(engine, &seqs, refs, None, &mut sums)?;
        }
        let n = sums.targets.max(1) as f64;
        Ok(vec![
            ("loss".into(), sums.loss / n),
            ("nll".into(), sums.nll / n),
            ("log_ratio".into(), sums.log_ratio / n),
            ("mean_token_accuracy".into(), sums.correct as f64 / n),
            ("entropy".into(), sums.entropy / n),
            ("num_tokens".into(), sums.targets as f64),
        ])
    }
}
