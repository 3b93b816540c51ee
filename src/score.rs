//! Scoring datasets with a model: per-sequence completion log-probs (REFERENCE §2) and the
//! preference metrics of a policy against a reference over a whole file (REFERENCE §3, §5).
//!
//! This is what `irbridge logps` and `irbridge eval` print, and what a DPO run uses to
//! precompute reference log-probs.

use crate::data::{Batch as DataBatch, DpoExample, TokenizedSeq};
use crate::model::Batch;
use crate::ops::logsoftmax::IGNORE_INDEX;
use crate::ops::prefloss::{self, BatchMetrics, PairInputs, PairOutputs, PrefLossConfig};
use crate::train::{Engine, TokenOutputs};
use anyhow::{ensure, Context, Result};

/// Default number of sequences per forward pass when scoring.
pub const DEFAULT_SCORE_BATCH: usize = 8;

/// The completion log-prob sum of one sequence and the number of completion tokens in it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqScore {
    /// Σ over completion tokens of `log π(y_t | y_<t, x)`, accumulated in f64.
    pub logp: f64,
    /// Completion tokens that contributed (after truncation).
    pub tokens: usize,
}

/// Converts a padded data batch into the model's batch (same ids, lengths and targets).
pub fn model_batch(b: &DataBatch) -> Result<Batch> {
    let ids: Vec<i64> = b.input_ids.iter().map(|&x| i64::from(x)).collect();
    Batch::new(&ids, b.batch_size, b.seq_len, &b.lengths, &b.targets)
}

/// Scores `seqs` in micro-batches of `batch_size` on any [`Engine`] (the CPU one, or a GPU's),
/// calling `progress(done)` after each one. Results are in input order.
pub fn score_sequences<E: Engine>(
    engine: &mut E,
    seqs: &[&TokenizedSeq],
    pad_id: u32,
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<SeqScore>> {
    ensure!(batch_size > 0, "batch size must be positive");
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size) {
        let data = DataBatch::from_seqs(chunk, pad_id)?;
        let batch = model_batch(&data)?;
        let fwd = engine.forward(&batch).context("forward pass while scoring")?;
        let t = fwd.seq();
        for (b, &tokens) in data.n_targets.iter().enumerate() {
            // Positions without a target hold 0, so the row sum is the completion sum.
            let logp = fwd.logp()[b * t..(b + 1) * t].iter().map(|&x| x as f64).sum();
            out.push(SeqScore { logp, tokens });
        }
        progress(out.len());
    }
    Ok(out)
}

/// Per-token completion log-probs of each sequence, in target order (`log π(y_t | y_<t, x)` for
/// every trained token, fp32 as the loss sees them), in micro-batches of `batch_size`. For
/// looking at where a sequence's log-prob comes from, and for checking a saved model against
/// another framework token by token (`scripts/check_hf_load.py`).
pub fn token_logps<E: Engine>(
    engine: &mut E,
    seqs: &[&TokenizedSeq],
    pad_id: u32,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    ensure!(batch_size > 0, "batch size must be positive");
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size) {
        let data = DataBatch::from_seqs(chunk, pad_id)?;
        let fwd = engine
            .forward(&model_batch(&data)?)
            .context("forward pass while scoring")?;
        let t = data.seq_len;
        for r in 0..data.batch_size {
            out.push(
                (0..t)
                    .filter(|&j| data.targets[r * t + j] != IGNORE_INDEX)
                    .map(|j| fwd.logp()[r * t + j])
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// Chosen and rejected scores of each pair, in input order.
pub fn score_pairs<E: Engine>(
    engine: &mut E,
    pairs: &[&DpoExample],
    pad_id: u32,
    batch_size: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<(SeqScore, SeqScore)>> {
    let seqs: Vec<&TokenizedSeq> = pairs.iter().flat_map(|p| [&p.chosen.seq, &p.rejected.seq]).collect();
    let scores = score_sequences(engine, &seqs, pad_id, batch_size, &mut |n| progress(n / 2))?;
    Ok(scores.chunks_exact(2).map(|c| (c[0], c[1])).collect())
}

/// Per-pair losses and the batch means of a policy against a reference over a whole dataset
/// (the step-loss semantics: mean over pairs).
pub fn preference_metrics(
    cfg: &PrefLossConfig,
    policy: &[(SeqScore, SeqScore)],
    reference: &[(SeqScore, SeqScore)],
) -> Result<(Vec<f64>, BatchMetrics)> {
    ensure!(
        policy.len() == reference.len(),
        "reference scores: expected {} pairs, got {}",
        policy.len(),
        reference.len()
    );
    let col = |v: &[(SeqScore, SeqScore)], chosen: bool| -> Vec<f64> {
        v.iter().map(|(c, r)| if chosen { c.logp } else { r.logp }).collect()
    };
    let count = |chosen: bool| -> Vec<i32> {
        policy
            .iter()
            .map(|(c, r)| (if chosen { c.tokens } else { r.tokens }) as i32)
            .collect()
    };
    let (pc, pr, rc, rr) = (
        col(policy, true),
        col(policy, false),
        col(reference, true),
        col(reference, false),
    );
    let (cc, rcnt) = (count(true), count(false));
    let inputs = PairInputs {
        policy_chosen: &pc,
        policy_rejected: &pr,
        ref_chosen: &rc,
        ref_rejected: &rr,
        chosen_counts: &cc,
        rejected_counts: &rcnt,
    };
    let n = inputs.check()?;
    let mut bufs = vec![vec![0f64; n]; 7];
    let [loss, dc, dr, rwc, rwr, mar, acc] = &mut bufs[..] else {
        unreachable!("seven buffers were allocated")
    };
    prefloss::forward_cpu(
        cfg,
        &inputs,
        PairOutputs {
            loss,
            dpolicy_chosen: dc,
            dpolicy_rejected: dr,
            rewards_chosen: rwc,
            rewards_rejected: rwr,
            margins: mar,
            accuracies: acc,
        },
    )?;
    let metrics = BatchMetrics::from_pairs(&inputs, loss, rwc, rwr, mar, acc)?;
    Ok((loss.clone(), metrics))
}
