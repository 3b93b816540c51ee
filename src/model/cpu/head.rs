//! The LM head fused with log-softmax + target gather, in chunks of rows.
//!
//! Only rows that have a target are projected. For each chunk of at most `chunk` rows the logits
//! `[chunk, V]` are formed, reduced to `lse`/`logp`/`entropy` by the log-softmax twin, and
//! dropped. The backward recomputes each chunk's logits, turns them into `dlogits` in place
//! ([`backward_cpu`]), then accumulates `dW += dlogitsᵀ·h` and scatters `dh = dlogits·W`.
//! The working set is O(chunk·V), never O(rows·V) (REFERENCE.md §8).

use super::matmul::{gemm, View};
use crate::ops::logsoftmax::{backward_cpu, forward_cpu, ForwardOut};
use anyhow::Result;
use rayon::prelude::*;

/// Per-row facts about the logits that the log-softmax does not give: the argmax (first index of
/// the maximum, as `torch.argmax`) and the mean logit over the vocabulary, in one extra read of a
/// chunk that is already in cache.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowExtrema {
    /// Index of the largest logit (the first one on ties).
    pub argmax: u32,
    /// `Σ_v x_v / V`, accumulated in f64.
    pub mean: f32,
}

impl RowExtrema {
    /// Scans one row of logits.
    pub fn of(row: &[f32]) -> Self {
        let (mut best, mut arg, mut sum) = (f32::NEG_INFINITY, 0usize, 0f64);
        for (i, &x) in row.iter().enumerate() {
            if x > best {
                best = x;
                arg = i;
            }
            sum += x as f64;
        }
        RowExtrema {
            argmax: arg as u32,
            mean: (sum / row.len().max(1) as f64) as f32,
        }
    }
}

/// The head weight `[V, C]` and the final hidden states `[N, C]` it reads.
pub struct Head<'a> {
    /// LM head (or tied embedding) `[V, C]`.
    pub weight: &'a [f32],
    /// Vocabulary size `V`.
    pub vocab: usize,
    /// Hidden width `C`.
    pub hidden: usize,
    /// Final-norm outputs `[N, C]` (packed rows).
    pub states: &'a [f32],
    /// Rows at once.
    pub chunk: usize,
}

impl Head<'_> {
    /// Gathers the hidden states of `rows` into `h` and writes their logits into `logits`.
    fn logits_of(&self, rows: &[usize], h: &mut Vec<f32>, logits: &mut Vec<f32>) {
        let c = self.hidden;
        h.clear();
        for &r in rows {
            h.extend_from_slice(&self.states[r * c..(r + 1) * c]);
        }
        logits.resize(rows.len() * self.vocab, 0.0);
        let m = rows.len();
        gemm(
            logits,
            View::row_major(m, self.vocab),
            h,
            View::row_major(m, c),
            self.weight,
            View::row_major(self.vocab, c).t(),
            false,
        );
    }

    /// Per target row: `lse`, `logp` (of `targets[i]`), `entropy`, and the row's [`RowExtrema`]
    /// (argmax for token accuracy, mean logit for TRL's `logits/*` metrics).
    pub fn forward(
        &self,
        rows: &[usize],
        targets: &[i64],
        lse: &mut [f32],
        logp: &mut [f32],
        entropy: &mut [f32],
        extrema: &mut [RowExtrema],
    ) -> Result<()> {
        let (mut h, mut logits) = (Vec::new(), Vec::new());
        let step = self.chunk.max(1);
        for (ci, chunk) in rows.chunks(step).enumerate() {
            let span = ci * step..ci * step + chunk.len();
            self.logits_of(chunk, &mut h, &mut logits);
            let out = ForwardOut {
                lse: &mut lse[span.clone()],
                logp: &mut logp[span.clone()],
                entropy: Some(&mut entropy[span.clone()]),
            };
            forward_cpu(&logits, chunk.len(), self.vocab, &targets[span.clone()], out)?;
            extrema[span]
                .par_iter_mut()
                .zip(logits.par_chunks(self.vocab))
                .for_each(|(e, row)| *e = RowExtrema::of(row));
        }
        Ok(())
    }

    /// Backward for per-row upstream gradients `dlogp`: `dweight += ∂L/∂W`,
    /// `dstates[rows] += ∂L/∂h`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        rows: &[usize],
        targets: &[i64],
        lse: &[f32],
        dlogp: &[f32],
        dweight: &mut [f32],
        dstates: &mut [f32],
    ) -> Result<()> {
        let (c, v) = (self.hidden, self.vocab);
        let (mut h, mut logits, mut dh) = (Vec::new(), Vec::new(), Vec::new());
        let step = self.chunk.max(1);
        for (ci, chunk) in rows.chunks(step).enumerate() {
            let span = ci * step..ci * step + chunk.len();
            let m = chunk.len();
            self.logits_of(chunk, &mut h, &mut logits);
            backward_cpu(
                &mut logits,
                m,
                v,
                &targets[span.clone()],
                &lse[span.clone()],
                &dlogp[span],
            )?;
            let (lv, hv) = (View::row_major(m, v), View::row_major(m, c));
            gemm(dweight, View::row_major(v, c), &logits, lv.t(), &h, hv, true);
            dh.resize(m * c, 0.0);
            gemm(&mut dh, hv, &logits, lv, self.weight, View::row_major(v, c), false);
            for (i, &r) in chunk.iter().enumerate() {
                for (a, &b) in dstates[r * c..(r + 1) * c].iter_mut().zip(&dh[i * c..(i + 1) * c]) {
                    *a += b;
                }
            }
        }
        Ok(())
    }

    /// Full logits `[rows.len(), V]` (the unchunked path, for tests and comparisons).
    pub fn full_logits(&self, rows: &[usize]) -> Vec<f32> {
        let (mut h, mut logits) = (Vec::new(), Vec::new());
        self.logits_of(rows, &mut h, &mut logits);
        logits
    }
}
