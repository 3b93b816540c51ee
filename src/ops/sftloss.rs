//! The paper's f-divergence SFT objectives (REFERENCE §1.3, fixtures README §4.2).
//!
//! Token level: `s_t = β·(logp_t − ref_logp_t)` for every completion token, `loss_t = −h(s_t)/β`
//! and `d loss_t / d logp_t = −h'(s_t)`: NLL's gradient weighted by `w = h'(s)`.
//! Sequence level: `s = β·Σ_t (logp_t − ref_logp_t)` over each sequence (packed segment ids; use
//! [`crate::ops::seqreduce::segment_ids_from_mask`] for a padded batch), one loss `−h(s)/β` per
//! sequence, and `−h'(s)` broadcast to every token of the sequence.
//!
//! Out-of-domain and near-boundary scores. Every divergence but `tv` has a weight `h'(s)` that
//! blows up at its lower boundary (or, for `neyman_chi2`, turns negative above s = 2). Before `h`
//! and `h'` are evaluated, s is clamped into the *safe range* `[s_min, s_max]`:
//! - `s_min` is where the weight reaches [`MAX_WEIGHT`] = 100 (one token may pull at most 100× as
//!   hard as under plain NLL): pearson `−1 + 1e−4`, hellinger `−0.9`, jensen_shannon
//!   `ln(101/200) ≈ −0.6832` (the domain ends at `−ln 2 ≈ −0.6931`), reverse_kl `−1 − ln 100`
//!   (no domain bound, but an exponentially growing weight);
//! - `s_max = 2` for neyman_chi2: the maximum of h, where the weight is exactly 0 and never negative.
//!
//! The same rule for every divergence keeps the clamp continuous (the weight saturates instead of
//! jumping) and bounds the gradient by construction. Every clamped token (sequence) is counted in
//! the returned counter: that includes all tokens outside the mathematical domain
//! ([`SftDivergence::in_domain`]) and the in-domain ones within the margin.
//! [`SftDivergence::h`] / [`SftDivergence::h_prime`] themselves are the unclamped math, `None`
//! outside the domain (as the goldens' boundary probes).
//!
//! The CPU twin works in f64 (inputs f32 or f64, see [`Real`]); the CUDA kernels in f32.

use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use std::fmt;
use std::str::FromStr;

use super::prefloss::Real;
use super::seqreduce::{check_segment_ids, packed_sums_f64, segment_ranges_cuda};
use crate::device::CudaDevice;

/// The largest per-token weight `h'(s)` the clamp allows.
pub const MAX_WEIGHT: f64 = 100.0;

/// The f-divergence of an SFT objective; the discriminant is the CUDA kernel's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum SftDivergence {
    /// Total variation: `h(s) = s`, plain SFT (NLL up to a constant).
    Tv = 0,
    /// Pearson χ²: `h(s) = 2√(1+s) − 2`, s > −1.
    PearsonChi2 = 1,
    /// Neyman χ²: `h(s) = s − s²/4`, s ≤ 2.
    NeymanChi2 = 2,
    /// Squared Hellinger: `h(s) = s/(1+s)`, s > −1.
    SquaredHellinger = 3,
    /// Jensen–Shannon: `h(s) = log(2 − e^{−s})`, s > −ln 2.
    JensenShannon = 4,
    /// Reverse KL: `h(s) = −e^{−1−s}`.
    ReverseKl = 5,
}

impl SftDivergence {
    /// Every divergence.
    pub const ALL: [SftDivergence; 6] = [
        SftDivergence::Tv,
        SftDivergence::PearsonChi2,
        SftDivergence::NeymanChi2,
        SftDivergence::SquaredHellinger,
        SftDivergence::JensenShannon,
        SftDivergence::ReverseKl,
    ];

    /// The config / golden name.
    pub fn name(self) -> &'static str {
        match self {
            SftDivergence::Tv => "tv",
            SftDivergence::PearsonChi2 => "pearson_chi2",
            SftDivergence::NeymanChi2 => "neyman_chi2",
            SftDivergence::SquaredHellinger => "squared_hellinger",
            SftDivergence::JensenShannon => "jensen_shannon",
            SftDivergence::ReverseKl => "reverse_kl",
        }
    }

    /// True when `s` lies in the mathematical domain (h finite and on the valid branch, h' ≥ 0
    /// and finite).
    pub fn in_domain(self, s: f64) -> bool {
        if !s.is_finite() {
            return false;
        }
        match self {
            SftDivergence::Tv | SftDivergence::ReverseKl => true,
            SftDivergence::PearsonChi2 | SftDivergence::SquaredHellinger => s > -1.0,
            SftDivergence::NeymanChi2 => s <= 2.0,
            SftDivergence::JensenShannon => s > -std::f64::consts::LN_2,
        }
    }

    /// `[s_min, s_max]`, the range s is clamped into before `h` and `h'` are evaluated (module
    /// docs).
    pub fn safe_range(self) -> (f64, f64) {
        let inf = f64::INFINITY;
        match self {
            SftDivergence::Tv => (-inf, inf),
            SftDivergence::PearsonChi2 => (-1.0 + 1.0 / (MAX_WEIGHT * MAX_WEIGHT), inf),
            SftDivergence::NeymanChi2 => (-inf, 2.0),
            SftDivergence::SquaredHellinger => (-1.0 + 1.0 / MAX_WEIGHT.sqrt(), inf),
            SftDivergence::JensenShannon => (((1.0 + 1.0 / MAX_WEIGHT) / 2.0).ln(), inf),
            SftDivergence::ReverseKl => (-1.0 - MAX_WEIGHT.ln(), inf),
        }
    }

    /// `(clamped s, whether it was clamped)`.
    pub fn clamp(self, s: f64) -> (f64, bool) {
        let (lo, hi) = self.safe_range();
        if s < lo {
            (lo, true)
        } else if s > hi {
            (hi, true)
        } else {
            (s, false)
        }
    }

    /// h(s) without any clamp, valid for s in the domain (stable forms near s = 0).
    fn h_raw(self, s: f64) -> f64 {
        match self {
            SftDivergence::Tv => s,
            SftDivergence::PearsonChi2 => 2.0 * s / ((1.0 + s).sqrt() + 1.0),
            SftDivergence::NeymanChi2 => s - 0.25 * s * s,
            SftDivergence::SquaredHellinger => s / (1.0 + s),
            SftDivergence::JensenShannon => (-(-s).exp_m1()).ln_1p(),
            SftDivergence::ReverseKl => -(-1.0 - s).exp(),
        }
    }

    /// h'(s) without any clamp.
    fn h_prime_raw(self, s: f64) -> f64 {
        match self {
            SftDivergence::Tv => 1.0,
            SftDivergence::PearsonChi2 => 1.0 / (1.0 + s).sqrt(),
            SftDivergence::NeymanChi2 => 1.0 - 0.5 * s,
            SftDivergence::SquaredHellinger => {
                let d = 1.0 + s;
                1.0 / (d * d)
            }
            SftDivergence::JensenShannon => 1.0 / (1.0 + 2.0 * s.exp_m1()),
            SftDivergence::ReverseKl => (-1.0 - s).exp(),
        }
    }

    /// `h(s) = (f*)^{-1}(s)`; `None` outside the domain or where it is not finite.
    pub fn h(self, s: f64) -> Option<f64> {
        self.in_domain(s).then(|| self.h_raw(s)).filter(|v| v.is_finite())
    }

    /// `h'(s)`, the per-token weight; `None` outside the domain or where it is not finite.
    pub fn h_prime(self, s: f64) -> Option<f64> {
        self.in_domain(s).then(|| self.h_prime_raw(s)).filter(|v| v.is_finite())
    }

    /// `(loss, dloss/dlogp, clamped)` for one score: `−h(s')/β`, `−h'(s')` at the clamped s'.
    pub fn loss_and_grad(self, s: f64, beta: f64) -> (f64, f64, bool) {
        let (sc, clamped) = self.clamp(s);
        (-self.h_raw(sc) / beta, -self.h_prime_raw(sc), clamped)
    }
}

impl fmt::Display for SftDivergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SftDivergence {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        match SftDivergence::ALL.iter().find(|d| d.name() == s) {
            Some(d) => Ok(*d),
            None => bail!(
                "unknown SFT divergence `{s}` (expected tv, pearson_chi2, neyman_chi2, squared_hellinger, jensen_shannon or reverse_kl)"
            ),
        }
    }
}

fn check_beta(beta: f64) -> Result<()> {
    ensure!(
        beta.is_finite() && beta > 0.0,
        "beta must be positive and finite, got {beta}"
    );
    Ok(())
}

fn check_finite<T: Real>(name: &str, v: &[T]) -> Result<()> {
    if let Some(i) = v.iter().position(|x| !x.to_f64().is_finite()) {
        bail!("{name}[{i}] = {} is not finite", v[i].to_f64());
    }
    Ok(())
}

fn check_tokens<T: Real>(logp: &[T], ref_logp: &[T], n_other: usize, other: &str) -> Result<()> {
    let n = logp.len();
    ensure!(
        ref_logp.len() == n,
        "ref_logp: expected {n} entries (as logp), got {}",
        ref_logp.len()
    );
    ensure!(n_other == n, "{other}: expected {n} entries (as logp), got {n_other}");
    check_finite("logp", logp)?;
    check_finite("ref_logp", ref_logp)
}

/// CPU twin of the token-level objective. `mask[t] == 0` tokens (prompt, padding) get loss 0 and
/// weight 0. Writes `loss[t] = −h(s_t)/β` and `dloss_dlogp[t] = −h'(s_t)`; returns the number of
/// counted tokens whose s was clamped.
pub fn token_forward_cpu<T: Real>(
    div: SftDivergence,
    beta: f64,
    logp: &[T],
    ref_logp: &[T],
    mask: &[u8],
    loss: &mut [T],
    dloss_dlogp: &mut [T],
) -> Result<usize> {
    check_beta(beta)?;
    check_tokens(logp, ref_logp, mask.len(), "mask")?;
    let n = logp.len();
    ensure!(
        loss.len() == n,
        "loss: expected {n} entries (one per token), got {}",
        loss.len()
    );
    ensure!(
        dloss_dlogp.len() == n,
        "dloss_dlogp: expected {n} entries (one per token), got {}",
        dloss_dlogp.len()
    );
    let clamped = loss
        .par_iter_mut()
        .zip(dloss_dlogp.par_iter_mut())
        .enumerate()
        .map(|(t, (l, g))| {
            if mask[t] == 0 {
                *l = T::from_f64(0.0);
                *g = T::from_f64(0.0);
                return 0usize;
            }
            let s = beta * (logp[t].to_f64() - ref_logp[t].to_f64());
            let (lv, gv, c) = div.loss_and_grad(s, beta);
            *l = T::from_f64(lv);
            *g = T::from_f64(gv);
            c as usize
        })
        .sum();
    Ok(clamped)
}

/// CPU twin of the sequence-level objective over packed segment ids (`−1` = not a completion
/// token). Writes one `seq_loss[k] = −h(s_k)/β` per segment and the per-token weight
/// `dloss_dlogp[t] = −h'(s_{seg[t]})` (0 for skipped tokens); returns the number of clamped
/// segments. Empty segments have s = 0.
#[allow(clippy::too_many_arguments)]
pub fn sequence_forward_cpu<T: Real>(
    div: SftDivergence,
    beta: f64,
    logp: &[T],
    ref_logp: &[T],
    seg: &[i32],
    segments: usize,
    seq_loss: &mut [T],
    dloss_dlogp: &mut [T],
) -> Result<usize> {
    check_beta(beta)?;
    check_tokens(logp, ref_logp, seg.len(), "segment_ids")?;
    check_segment_ids(seg, segments)?;
    ensure!(
        seq_loss.len() == segments,
        "seq_loss: expected {segments} entries (one per segment), got {}",
        seq_loss.len()
    );
    ensure!(
        dloss_dlogp.len() == logp.len(),
        "dloss_dlogp: expected {} entries (one per token), got {}",
        logp.len(),
        dloss_dlogp.len()
    );
    let sums = packed_sums_f64(|i| logp[i].to_f64() - ref_logp[i].to_f64(), seg, segments);
    let mut weights = vec![0f64; segments];
    let mut clamped = 0;
    for (k, (sum, _)) in sums.into_iter().enumerate() {
        let (l, g, c) = div.loss_and_grad(beta * sum, beta);
        seq_loss[k] = T::from_f64(l);
        weights[k] = g;
        clamped += c as usize;
    }
    dloss_dlogp.par_iter_mut().zip(seg.par_iter()).for_each(|(d, &s)| {
        *d = T::from_f64(if s >= 0 { weights[s as usize] } else { 0.0 });
    });
    Ok(clamped)
}

/// Threads per block of the f-divergence kernels (`FDIV_BLOCK` in `kernels/sftloss.cu`).
const BLOCK: u32 = 256;

fn elementwise_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The safe range as f32 for the kernels (±∞ where unbounded).
fn safe_range_f32(div: SftDivergence) -> (f32, f32) {
    let (lo, hi) = div.safe_range();
    (lo as f32, hi as f32)
}

/// CUDA token-level objective (one launch after zeroing `clamped`, a 1-entry counter the caller
/// owns). Same semantics as [`token_forward_cpu`], in f32.
#[allow(clippy::too_many_arguments)]
pub fn token_forward_cuda(
    dev: &CudaDevice,
    div: SftDivergence,
    beta: f32,
    logp: &CudaView<'_, f32>,
    ref_logp: &CudaView<'_, f32>,
    mask: &CudaView<'_, u8>,
    loss: &mut CudaViewMut<'_, f32>,
    dloss_dlogp: &mut CudaViewMut<'_, f32>,
    clamped: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    check_beta(beta as f64)?;
    let n = logp.len();
    ensure!(n <= i32::MAX as usize, "logp: {n} tokens exceed the i32 range");
    for (name, len) in [
        ("ref_logp", ref_logp.len()),
        ("mask", mask.len()),
        ("loss", loss.len()),
        ("dloss_dlogp", dloss_dlogp.len()),
    ] {
        ensure!(len == n, "{name}: expected {n} entries (as logp), got {len}");
    }
    ensure!(
        clamped.len() == 1,
        "clamped: expected a 1-entry counter, got {}",
        clamped.len()
    );
    dev.stream().memset_zeros(clamped)?;
    if n == 0 {
        return Ok(());
    }
    let (lo, hi) = safe_range_f32(div);
    let (d, n_i) = (div as i32, n as i32);
    let f = dev.function("sftloss", "fdiv_token_forward")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&d)
        .arg(&beta)
        .arg(&lo)
        .arg(&hi)
        .arg(logp)
        .arg(ref_logp)
        .arg(mask)
        .arg(&n_i)
        .arg(loss)
        .arg(dloss_dlogp)
        .arg(clamped);
    // SAFETY: the argument list matches `fdiv_token_forward`; lengths were checked above.
    unsafe { b.launch(elementwise_cfg(n)) }?;
    Ok(())
}

/// CUDA sequence-level objective over packed segment ids: segment ranges, one block per segment
/// (f32 tree sum of the log-ratios, h and h'), then a broadcast of the weights to the tokens.
/// Same semantics as [`sequence_forward_cpu`] in f32; ids outside `[−1, S)` are skipped rather
/// than rejected. `clamped` is a caller-owned 1-entry counter (zeroed here).
#[allow(clippy::too_many_arguments)]
pub fn sequence_forward_cuda(
    dev: &CudaDevice,
    div: SftDivergence,
    beta: f32,
    logp: &CudaView<'_, f32>,
    ref_logp: &CudaView<'_, f32>,
    seg: &CudaView<'_, i32>,
    segments: usize,
    seq_loss: &mut CudaViewMut<'_, f32>,
    dloss_dlogp: &mut CudaViewMut<'_, f32>,
    clamped: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    check_beta(beta as f64)?;
    let n = logp.len();
    for (name, len) in [
        ("ref_logp", ref_logp.len()),
        ("segment_ids", seg.len()),
        ("dloss_dlogp", dloss_dlogp.len()),
    ] {
        ensure!(len == n, "{name}: expected {n} entries (as logp), got {len}");
    }
    ensure!(
        seq_loss.len() == segments,
        "seq_loss: expected {segments} entries (one per segment), got {}",
        seq_loss.len()
    );
    ensure!(
        clamped.len() == 1,
        "clamped: expected a 1-entry counter, got {}",
        clamped.len()
    );
    dev.stream().memset_zeros(clamped)?;
    if segments == 0 {
        if n > 0 {
            dev.stream().memset_zeros(dloss_dlogp)?;
        }
        return Ok(());
    }
    let stream = dev.stream();
    let mut lo = stream.alloc_zeros::<i32>(segments)?;
    let mut hi = stream.alloc_zeros::<i32>(segments)?;
    let mut weights = stream.alloc_zeros::<f32>(segments)?;
    segment_ranges_cuda(dev, seg, segments, &mut lo.as_view_mut(), &mut hi.as_view_mut())?;
    let (lo_s, hi_s) = safe_range_f32(div);
    let (d, s_i, n_i) = (div as i32, segments as i32, n as i32);
    let f = dev.function("sftloss", "fdiv_seq_forward")?;
    let cfg = LaunchConfig {
        grid_dim: (segments as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = stream.launch_builder(&f);
    b.arg(&d)
        .arg(&beta)
        .arg(&lo_s)
        .arg(&hi_s)
        .arg(logp)
        .arg(ref_logp)
        .arg(seg)
        .arg(&s_i)
        .arg(&lo)
        .arg(&hi);
    b.arg(seq_loss).arg(&mut weights).arg(&mut *clamped);
    // SAFETY: the argument list matches `fdiv_seq_forward`; every buffer has its checked length.
    unsafe { b.launch(cfg) }?;
    if n == 0 {
        return Ok(());
    }
    let f = dev.function("sftloss", "fdiv_seq_broadcast")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&weights).arg(seg).arg(&n_i).arg(&s_i).arg(dloss_dlogp);
    // SAFETY: as above.
    unsafe { b.launch(elementwise_cfg(n)) }?;
    Ok(())
}
