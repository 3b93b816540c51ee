//! Fused log-softmax + target gather over logits `[R, V]`, and its in-place backward.
//!
//! Forward: for each row `r`, `lse[r] = log Σ_v exp(x[r,v])` (every row, ignored ones included),
//! `logp[r] = x[r,t_r] − lse[r]` (0 where `t_r == IGNORE_INDEX`), and optionally
//! `entropy[r] = −Σ_v p log p`. The logits are read once; nothing of size `[R, V]` is written.
//!
//! Backward: given `dlogp[r]` (the upstream gradient dL/dlogp_r), overwrites the logits with
//! `dL/dx[r,v] = dlogp[r]·(1[v == t_r] − p[r,v])`, `p` recomputed from `lse`; ignored rows become 0.
//!
//! # Why this design
//!
//! The op is memory-bound (REFERENCE.md §8): for a bf16 `[8192 × 128256]` batch the logits are
//! 2.1 GB, so the only thing that matters is how many times they cross HBM.
//! * **Read once.** An online softmax (running max and running sums, rescaled once per block of
//!   elements) gives `lse`, the target log-prob and the entropy in one sweep; the target logit is
//!   gathered in the same kernel.
//! * **No fp32 `[R, V]` tensor.** Only `lse[R]` and `logp[R]` are kept; the backward recomputes
//!   `p = exp(x − lse)` from the logits and writes the gradient over them (in place), so the whole
//!   loss side needs no memory beyond the logits. The unfused path eager frameworks take (an fp32
//!   log-prob tensor, a gather, a backward that reads it) moves several times the bytes; it exists
//!   here only as the `unfused_*` benchmark baseline.
//! * **fp32 true-class term.** `1 − p_t` is formed in f32 and rounded to the storage type once:
//!   in bf16, `1 − p` rounded after `−p` was rounded loses the gradient of confident tokens.
//! * **Forward + backward in one launch** when `dlogp` is known before the forward (NLL, SFT):
//!   the second sweep re-reads a row that is still in L2, so HBM sees one read and one write.
//!
//! Every CUDA kernel has a CPU twin here with the same semantics; the twins accumulate row sums in
//! f64 over f32 exponentials, so they are the accurate side of every comparison.
//!
//! # Example
//!
//! ```
//! use irbridge::ops::logsoftmax::{backward_cpu, forward_cpu, ForwardOut, IGNORE_INDEX};
//! // Two rows of three logits; the second row is ignored.
//! let mut logits = vec![1.0f32, 2.0, 3.0, 0.5, 0.5, 0.5];
//! let targets = [2i64, IGNORE_INDEX];
//! let (mut lse, mut logp, mut entropy) = ([0f32; 2], [0f32; 2], [0f32; 2]);
//! let out = ForwardOut { lse: &mut lse, logp: &mut logp, entropy: Some(&mut entropy) };
//! forward_cpu(&logits, 2, 3, &targets, out)?;
//! assert!((logp[0] - (3.0 - lse[0])).abs() < 1e-6);
//! assert_eq!(logp[1], 0.0);
//! assert!((entropy[1] - 3f32.ln()).abs() < 1e-6); // uniform row
//! // Gradient of L = Σ_r logp_r (dlogp = 1) overwrites the logits.
//! backward_cpu(&mut logits, 2, 3, &targets, &lse, &[1.0, 1.0])?;
//! assert!(logits[2] > 0.0 && logits[0] < 0.0);
//! assert!(logits[3..].iter().all(|&g| g == 0.0));
//! # anyhow::Ok(())
//! ```

mod cuda;

pub use cuda::{
    backward_cuda, forward_backward_cuda, forward_cuda, unfused_backward_cuda, unfused_forward_cuda, CudaElem,
    CudaForwardOut,
};

use crate::dtype::Elem;
use anyhow::{ensure, Result};
use rayon::prelude::*;

/// Targets equal to this are ignored (PyTorch / TRL convention).
pub const IGNORE_INDEX: i64 = -100;

/// Elements per block of the CPU twin: the running max (and the rescale of the sums) moves at most
/// once per block.
const CPU_BLOCK: usize = 256;

/// Outputs of [`forward_cpu`], one value per row, written into caller-owned slices.
pub struct ForwardOut<'a> {
    /// `log Σ exp(x)` per row; length R.
    pub lse: &'a mut [f32],
    /// Target log-prob per row (0 for ignored rows); length R.
    pub logp: &'a mut [f32],
    /// Softmax entropy per row, when wanted; length R.
    pub entropy: Option<&'a mut [f32]>,
}

/// Validates the lengths of `[R, V]` logits and per-row targets, naming the offending tensor.
/// The CUDA launchers use this alone (they never copy targets to the host).
pub fn check_lengths(logits_len: usize, rows: usize, vocab: usize, targets_len: usize) -> Result<()> {
    ensure!(vocab > 0, "logits: vocabulary size must be positive");
    let want = rows
        .checked_mul(vocab)
        .ok_or_else(|| anyhow::anyhow!("logits: {rows}×{vocab} elements overflow usize"))?;
    ensure!(
        logits_len == want,
        "logits: expected {rows}×{vocab} = {want} elements, got {logits_len}"
    );
    ensure!(
        targets_len == rows,
        "targets: expected {rows} entries (one per logits row), got {targets_len}"
    );
    Ok(())
}

/// Validates `[R, V]` logits against per-row targets (lengths and target range), naming the
/// offending tensor.
pub fn check_shapes(logits_len: usize, rows: usize, vocab: usize, targets: &[i64]) -> Result<()> {
    check_lengths(logits_len, rows, vocab, targets.len())?;
    if let Some((r, &t)) = targets
        .iter()
        .enumerate()
        .find(|(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
    {
        anyhow::bail!("targets[{r}] = {t} is outside [0, {vocab}) and is not the ignore index {IGNORE_INDEX}");
    }
    Ok(())
}

/// Checks that a per-row tensor has R entries.
pub(crate) fn check_rows(name: &str, len: usize, rows: usize) -> Result<()> {
    ensure!(
        len == rows,
        "{name}: expected {rows} entries (one per logits row), got {len}"
    );
    Ok(())
}

/// `e^d` in f32 to about 2 ulp, written so that loops over slices auto-vectorise (libm's `expf`
/// is a call per element and was most of the CPU twin's time). Cody–Waite reduction
/// `d = k·ln2 + r` with `|r| ≤ ln2/2`, a degree-7 Taylor polynomial for `e^r` (truncation error
/// below 6e-9), and `2^k` built from its exponent bits. Returns 0 below −87 (where `e^d` is
/// subnormal) and +inf above 88; NaN stays NaN.
#[inline(always)]
fn fast_exp(d: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_145_75; // few mantissa bits: k·LN2_HI is exact
    const LN2_LO: f32 = 1.428_606_8e-6;
    let dc = d.clamp(-87.0, 88.0);
    let t = dc * std::f32::consts::LOG2_E + MAGIC;
    let kf = t - MAGIC;
    let k = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (dc - kf * LN2_HI) - kf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let e = p * f32::from_bits(((k + 127) as u32) << 23);
    if d < -87.0 {
        0.0
    } else if d > 88.0 {
        f32::INFINITY
    } else {
        e
    }
}

/// Σ v in f32 over groups of 8, in f64 across groups.
fn grouped_sum(v: &[f32]) -> f64 {
    v.chunks(8).map(|c| c.iter().sum::<f32>() as f64).sum()
}

/// One row's `(lse, entropy)` by an online softmax: f32 exponentials relative to a running max
/// that moves at most once per block of [`CPU_BLOCK`] elements; sums in f64.
/// `sd` is Σ e^(x−m)·(x−m), so `entropy = ln s − sd/s` without a second exponential.
fn row_stats<T: Elem>(x: &[T], want_entropy: bool) -> (f64, f64) {
    let mut m = f32::NEG_INFINITY;
    let (mut s, mut sd) = (0f64, 0f64);
    let mut buf = [0f32; CPU_BLOCK];
    let (mut e_buf, mut ed_buf) = ([0f32; CPU_BLOCK], [0f32; CPU_BLOCK]);
    for chunk in x.chunks(CPU_BLOCK) {
        let buf = &mut buf[..chunk.len()];
        for (b, &xi) in buf.iter_mut().zip(chunk) {
            *b = xi.to_f32();
        }
        let cm = buf.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if cm > m {
            if s > 0.0 {
                let delta = (m - cm) as f64;
                let sc = delta.exp();
                sd = sc * (sd + delta * s);
                s *= sc;
            }
            m = cm;
        }
        if m == f32::NEG_INFINITY {
            continue; // everything so far is −inf: nothing to add
        }
        // f32 exponentials (vectorised), summed in f32 over groups of 8 and in f64 across groups:
        // one f32 running sum over many equal small terms drifts systematically (3e-6 over 256
        // elements), which the reference side of every comparison cannot afford.
        let (e, ed) = (&mut e_buf[..buf.len()], &mut ed_buf[..buf.len()]);
        if want_entropy {
            for ((ei, edi), &v) in e.iter_mut().zip(ed.iter_mut()).zip(buf.iter()) {
                let d = v - m;
                *ei = fast_exp(d);
                *edi = if *ei > 0.0 { *ei * d } else { 0.0 };
            }
            sd += grouped_sum(ed);
        } else {
            for (ei, &v) in e.iter_mut().zip(buf.iter()) {
                *ei = fast_exp(v - m);
            }
        }
        s += grouped_sum(e);
    }
    let ln_s = s.ln();
    (m as f64 + ln_s, ln_s - sd / s)
}

/// Writes one row's gradient over its logits: `g·(1[v == t] − exp(x − lse))`, formed in f32.
fn row_grad<T: Elem>(x: &mut [T], t: i64, lse: f32, g: f32) {
    if t == IGNORE_INDEX {
        x.fill(T::from_f32(0.0));
        return;
    }
    let t = t as usize;
    // The true-class term is formed from the logit in f32, never from the rounded −g·p.
    let grad_t = g * (1.0 - fast_exp(x[t].to_f32() - lse));
    for xi in x.iter_mut() {
        *xi = T::from_f32(-g * fast_exp(xi.to_f32() - lse));
    }
    x[t] = T::from_f32(grad_t);
}

impl ForwardOut<'_> {
    /// Checks that every requested output has one entry per row.
    fn check(&self, rows: usize) -> Result<()> {
        check_rows("lse", self.lse.len(), rows)?;
        check_rows("logp", self.logp.len(), rows)?;
        if let Some(e) = &self.entropy {
            check_rows("entropy", e.len(), rows)?;
        }
        Ok(())
    }
}

/// Per-row forward results `(lse, logp, entropy)` in f32.
fn row_forward<T: Elem>(x: &[T], t: i64, want_entropy: bool) -> (f32, f32, f32) {
    let (lse, entropy) = row_stats(x, want_entropy);
    let logp = if t == IGNORE_INDEX {
        0.0
    } else {
        x[t as usize].to_f32() as f64 - lse
    };
    (lse as f32, logp as f32, entropy as f32)
}

/// Scatters per-row results into the caller's output slices.
fn write_rows(stats: Vec<(f32, f32, f32)>, lse: &mut [f32], logp: &mut [f32], entropy: Option<&mut [f32]>) {
    for (r, &(l, lp, _)) in stats.iter().enumerate() {
        lse[r] = l;
        logp[r] = lp;
    }
    if let Some(e) = entropy {
        for (dst, &(_, _, h)) in e.iter_mut().zip(&stats) {
            *dst = h;
        }
    }
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
    out.check(rows)?;
    let ForwardOut { lse, logp, entropy } = out;
    let want_entropy = entropy.is_some();
    let stats: Vec<(f32, f32, f32)> = logits
        .par_chunks(vocab)
        .zip(targets.par_iter())
        .map(|(x, &t)| row_forward(x, t, want_entropy))
        .collect();
    write_rows(stats, lse, logp, entropy);
    Ok(())
}

/// CPU twin of the in-place backward: `logits` becomes `dL/dlogits` given the forward's `lse`
/// and the upstream `dlogp` (one value per row; ignored for ignored rows).
pub fn backward_cpu<T: Elem>(
    logits: &mut [T],
    rows: usize,
    vocab: usize,
    targets: &[i64],
    lse: &[f32],
    dlogp: &[f32],
) -> Result<()> {
    check_shapes(logits.len(), rows, vocab, targets)?;
    check_rows("lse", lse.len(), rows)?;
    check_rows("dlogp", dlogp.len(), rows)?;
    logits
        .par_chunks_mut(vocab)
        .enumerate()
        .for_each(|(r, x)| row_grad(x, targets[r], lse[r], dlogp[r]));
    Ok(())
}

/// CPU twin of the one-launch forward + in-place backward, for when `dlogp` is known before the
/// forward (NLL-type losses): fills `out` exactly as [`forward_cpu`] would, then overwrites the
/// logits exactly as [`backward_cpu`] would with that `lse`.
pub fn forward_backward_cpu<T: Elem>(
    logits: &mut [T],
    rows: usize,
    vocab: usize,
    targets: &[i64],
    dlogp: &[f32],
    out: ForwardOut<'_>,
) -> Result<()> {
    check_shapes(logits.len(), rows, vocab, targets)?;
    check_rows("dlogp", dlogp.len(), rows)?;
    out.check(rows)?;
    let ForwardOut { lse, logp, entropy } = out;
    let want_entropy = entropy.is_some();
    let stats: Vec<(f32, f32, f32)> = logits
        .par_chunks_mut(vocab)
        .zip(targets.par_iter().zip(dlogp.par_iter()))
        .map(|(x, (&t, &g))| {
            let st = row_forward(x, t, want_entropy);
            row_grad(x, t, st.0, g);
            st
        })
        .collect();
    write_rows(stats, lse, logp, entropy);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_accurate_over_the_f32_range() {
        let mut worst = 0f64;
        let n = 200_000;
        for i in 0..=n {
            let d = -87.0 + 175.0 * i as f32 / n as f32;
            let want = (d as f64).exp();
            worst = worst.max(((fast_exp(d) as f64) - want).abs() / want);
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(fast_exp(0.0), 1.0);
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp(-100.0), 0.0);
        assert_eq!(fast_exp(100.0), f32::INFINITY);
        assert!(fast_exp(f32::NAN).is_nan());
    }
}
