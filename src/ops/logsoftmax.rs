//! Fused log-softmax + target gather over logits `[R, V]`, and its in-place backward.
//!
//! Forward: for each row `r`, `lse[r] = log Σ_v exp(x[r,v])` (every row, ignored ones included),
//! `logp[r] = x[r,t_r] − lse[r]` (0 where `t_r == IGNORE_INDEX`), and optionally
//! `entropy[r] = −Σ_v p log p`. The logits are read once; nothing of size `[R, V]` is written.
//!
//! Backward: given `dlogp[r]` (the upstream gradient dL/dlogp_r), overwrites the logits with
//! `dL/dx[r,v] = dlogp[r]·(1[v == t_r] − p[r,v])`, `p` recomputed from `lse`; ignored rows become 0.
//! The true-class term is formed in f32 before rounding to the storage type.

use crate::dtype::Elem;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Targets equal to this are ignored (PyTorch / TRL convention).
pub const IGNORE_INDEX: i64 = -100;

/// Outputs of [`forward_cpu`], one value per row, written into caller-owned slices.
pub struct ForwardOut<'a> {
    /// `log Σ exp(x)` per row; length R.
    pub lse: &'a mut [f32],
    /// Target log-prob per row (0 for ignored rows); length R.
    pub logp: &'a mut [f32],
    /// Softmax entropy per row, when wanted; length R.
    pub entropy: Option<&'a mut [f32]>,
}

/// Validates `[R, V]` logits against per-row targets, naming the offending tensor.
pub fn check_shapes(logits_len: usize, rows: usize, vocab: usize, targets: &[i64]) -> Result<()> {
    ensure!(vocab > 0, "logits: vocabulary size must be positive");
    ensure!(
        logits_len == rows * vocab,
        "logits: expected {rows}×{vocab} = {} elements, got {logits_len}",
        rows * vocab
    );
    ensure!(
        targets.len() == rows,
        "targets: expected {rows} entries (one per logits row), got {}",
        targets.len()
    );
    if let Some((r, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
    {
        anyhow::bail!(
            "targets[{r}] = {t} is outside [0, {vocab}) and is not the ignore index {IGNORE_INDEX}"
        );
    }
    Ok(())
}

/// CPU twin of the fused forward; rows run in parallel.
pub fn forward_cpu<T: Elem>(
    logits: &[T],
    rows: usize,
    vocab: usize,
    targets: &[i64],
    out: ForwardOut<'_>,
) -> Result<()> {
    check_shapes(logits.len(), rows, vocab, targets)?;
    ensure!(
        out.lse.len() == rows,
        "lse: expected {rows} entries, got {}",
        out.lse.len()
    );
    ensure!(
        out.logp.len() == rows,
        "logp: expected {rows} entries, got {}",
        out.logp.len()
    );
    let mut entropy_buf;
    let entropy: &mut [f32] = match out.entropy {
        Some(e) => {
            ensure!(
                e.len() == rows,
                "entropy: expected {rows} entries, got {}",
                e.len()
            );
            e
        }
        None => {
            entropy_buf = Vec::new();
            &mut entropy_buf
        }
    };
    let want_entropy = !entropy.is_empty();
    let row_stats = |r: usize| -> (f32, f32, f32) {
        let x = &logits[r * vocab..(r + 1) * vocab];
        // Online softmax: running max m, running Σ e^(x−m) and Σ e^(x−m)·x, in f32 (f64 for the
        // sums so the CPU twin is the accurate reference the kernels are compared with).
        let mut m = f32::NEG_INFINITY;
        let (mut s, mut sx) = (0f64, 0f64);
        for &xi in x {
            let v = xi.to_f32();
            if v > m {
                let scale = if m == f32::NEG_INFINITY {
                    0.0
                } else {
                    ((m - v) as f64).exp()
                };
                s *= scale;
                sx *= scale;
                m = v;
            }
            let e = ((v - m) as f64).exp();
            s += e;
            sx += e * v as f64;
        }
        let lse = m as f64 + s.ln();
        let entropy = lse - sx / s;
        let t = targets[r];
        let logp = if t == IGNORE_INDEX {
            0.0
        } else {
            x[t as usize].to_f32() as f64 - lse
        };
        (lse as f32, logp as f32, entropy as f32)
    };
    let stats: Vec<(f32, f32, f32)> = (0..rows).into_par_iter().map(row_stats).collect();
    for (r, (l, lp, h)) in stats.into_iter().enumerate() {
        out.lse[r] = l;
        out.logp[r] = lp;
        if want_entropy {
            entropy[r] = h;
        }
    }
    Ok(())
}

/// CPU twin of the in-place backward: `logits` becomes `dL/dlogits`.
pub fn backward_cpu<T: Elem>(
    logits: &mut [T],
    rows: usize,
    vocab: usize,
    targets: &[i64],
    lse: &[f32],
    dlogp: &[f32],
) -> Result<()> {
    check_shapes(logits.len(), rows, vocab, targets)?;
    ensure!(
        lse.len() == rows,
        "lse: expected {rows} entries, got {}",
        lse.len()
    );
    ensure!(
        dlogp.len() == rows,
        "dlogp: expected {rows} entries, got {}",
        dlogp.len()
    );
    logits.par_chunks_mut(vocab).enumerate().for_each(|(r, x)| {
        let t = targets[r];
        if t == IGNORE_INDEX {
            x.fill(T::from_f32(0.0));
            return;
        }
        let (g, l) = (dlogp[r], lse[r]);
        for (v, xi) in x.iter_mut().enumerate() {
            let p = (xi.to_f32() - l).exp();
            let onehot = if v as i64 == t { 1.0 } else { 0.0 };
            *xi = T::from_f32(g * (onehot - p));
        }
    });
    Ok(())
}
