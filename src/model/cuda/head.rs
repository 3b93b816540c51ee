//! The chunked LM head on the GPU: head GEMM, fused log-softmax + gather and its in-place
//! backward over chunks of target rows, so logits (and dlogits) exist for at most `chunk` rows
//! at a time, never for the whole batch (REFERENCE.md §8).
//!
//! Forward: the hidden states of the target rows are gathered once into `[R, C]` (saved); per
//! chunk of `m` rows, `logits = h·Wᵀ` (`[m, V]`, activation type), then one fused kernel gives
//! `lse`, `logp` and the entropy, and one more pass the argmax and mean logit (TRL's token
//! accuracy and `logits/*` metrics).
//!
//! Backward: per chunk the logits are recomputed (same GEMM, same inputs, so the same values),
//! turned into `dlogits` in place by the log-softmax backward (true-class term in f32), then
//! `dW += dlogitsᵀ·h` into the fp32 head gradient (β = 1; the tied embedding's buffer when tied)
//! and `dh = dlogits·W`. The `[R, C]` `dh` is finally scattered into the zeroed `[N, C]` gradient
//! of the final norm's output.

use super::acts::{zeros, Acts};
use super::block::Ctx;
use super::gemm::{GemmElem, MatLayout};
use super::plan::DeviceBatch;
use super::precision::Act;
use crate::ops::logsoftmax::{self, CudaForwardOut};
use crate::ops::rows;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// The head's shape: `V`, `C`, the head weight's index, and the chunk (rows at once).
#[derive(Clone, Copy, Debug)]
pub struct HeadSpec {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Parameter index of the head weight `[V, C]`.
    pub weight: usize,
    /// Rows of logits at once.
    pub chunk: usize,
}

impl HeadSpec {
    /// Row ranges of the chunks over `r` target rows.
    fn chunks(&self, r: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
        let step = self.chunk.max(1);
        (0..r).step_by(step).map(move |s| s..(s + step).min(r))
    }

    /// Elements of the logits buffer for `r` rows.
    fn buffer_len(&self, r: usize) -> usize {
        self.chunk.max(1).min(r) * self.vocab
    }
}

/// Logits `[m, V] = h[rows]·Wᵀ` for the target rows `rows` into `logits`.
fn logits_of<T: Act>(
    ctx: &Ctx,
    spec: &HeadSpec,
    what: &str,
    htgt: &CudaSlice<T>,
    rows: &std::ops::Range<usize>,
    logits: &mut CudaSlice<T>,
) -> Result<()> {
    let (c, v, m) = (spec.hidden, spec.vocab, rows.len());
    let w = T::matrix(ctx.w, spec.weight)?;
    ctx.blas.matmul(
        what,
        &mut logits.slice_mut(0..m * v),
        MatLayout::rm(m, v),
        &htgt.slice(rows.start * c..rows.end * c),
        MatLayout::rm(m, c),
        &w,
        MatLayout::rm(v, c).t(),
        false,
    )
}

/// Forward over the `R ≥ 1` target rows: fills `acts.htgt` and the per-row head outputs.
pub fn forward<T: Act>(ctx: &Ctx, spec: &HeadSpec, db: &DeviceBatch, acts: &mut Acts<T>) -> Result<()> {
    let (c, v) = (spec.hidden, spec.vocab);
    let r = db.target_rows.len();
    ensure!(r > 0, "LM head: no target rows");
    rows::gather_cuda(
        ctx.dev,
        &acts.fin.out.as_view(),
        &db.target_rows.as_view(),
        c,
        &mut acts.htgt.as_view_mut(),
    )?;
    let mut logits = zeros::<T>(ctx.dev.stream(), spec.buffer_len(r), "LM head logits chunk")?;
    for rows in spec.chunks(r) {
        let m = rows.len();
        logits_of(ctx, spec, "LM head forward", &acts.htgt, &rows, &mut logits)?;
        let lg = logits.slice(0..m * v);
        let out = CudaForwardOut {
            lse: acts.lse.slice_mut(rows.clone()),
            logp: acts.logp.slice_mut(rows.clone()),
            entropy: Some(acts.entropy.slice_mut(rows.clone())),
        };
        logsoftmax::forward_cuda(ctx.dev, &lg, m, v, &db.targets.slice(rows.clone()), out)?;
        rows::argmax_mean_cuda(
            ctx.dev,
            &lg,
            v,
            &mut acts.argmax.slice_mut(rows.clone()),
            &mut acts.mean.slice_mut(rows),
        )?;
    }
    Ok(())
}

/// Backward for per-target-row upstream gradients `dlogp` (`[R]`): accumulates the head weight
/// gradient into `grads[spec.weight]` and overwrites `dhidden` (`[N, C]`) with ∂L/∂(final norm
/// output) — zero on every row without a target.
pub fn backward<T: Act>(
    ctx: &Ctx,
    spec: &HeadSpec,
    db: &DeviceBatch,
    acts: &Acts<T>,
    dlogp: &CudaView<f32>,
    grads: &mut [CudaSlice<f32>],
    dhidden: &mut CudaSlice<T>,
) -> Result<()> {
    let (c, v) = (spec.hidden, spec.vocab);
    let r = db.target_rows.len();
    ensure!(dlogp.len() == r, "dlogp: expected {r} target rows, got {}", dlogp.len());
    let s = ctx.dev.stream();
    let mut dh = zeros::<T>(s, r * c, "target hidden-state gradients")?;
    let mut logits = zeros::<T>(s, spec.buffer_len(r), "LM head logits chunk")?;
    let w = T::matrix(ctx.w, spec.weight)?;
    for rows in spec.chunks(r) {
        let m = rows.len();
        logits_of(ctx, spec, "LM head recompute", &acts.htgt, &rows, &mut logits)?;
        let mut lg = logits.slice_mut(0..m * v);
        logsoftmax::backward_cuda(
            ctx.dev,
            &mut lg,
            m,
            v,
            &db.targets.slice(rows.clone()),
            &acts.lse.slice(rows.clone()),
            &dlogp.slice(rows.clone()),
        )?;
        let h = acts.htgt.slice(rows.start * c..rows.end * c);
        ctx.blas.matmul(
            "LM head weight gradient",
            &mut grads[spec.weight].as_view_mut(),
            MatLayout::rm(v, c),
            &lg.as_view(),
            MatLayout::rm(m, v).t(),
            &h,
            MatLayout::rm(m, c),
            true,
        )?;
        ctx.blas.matmul(
            "LM head input gradient",
            &mut dh.slice_mut(rows.start * c..rows.end * c),
            MatLayout::rm(m, c),
            &lg.as_view(),
            MatLayout::rm(m, v),
            &w,
            MatLayout::rm(v, c),
            false,
        )?;
    }
    s.memset_zeros(dhidden)?;
    rows::scatter_cuda(
        ctx.dev,
        &dh.as_view(),
        &db.target_rows.as_view(),
        c,
        &mut dhidden.as_view_mut(),
    )
}

/// Logits of every one of the `n` rows of `hidden` (`[n, C]` → `[n, V]`): the unchunked path,
/// for tests and comparisons (memory `n·V`).
pub fn full_logits<T: Act>(ctx: &Ctx, spec: &HeadSpec, hidden: &CudaSlice<T>, n: usize) -> Result<CudaSlice<T>> {
    let mut out = zeros::<T>(ctx.dev.stream(), n * spec.vocab, "full logits")?;
    logits_into(
        ctx,
        spec,
        "LM head (full logits)",
        &hidden.as_view(),
        n,
        &mut out.as_view_mut(),
    )?;
    Ok(out)
}

/// `out[n, V] = hidden[n, C]·Wᵀ` into a caller-owned view, stored as the activation type or as
/// f32 (cuBLAS accumulates in f32 either way; decoding asks for f32 so bf16 logits are not
/// rounded before they reach the sampler).
pub fn logits_into<T: Act, O: GemmElem>(
    ctx: &Ctx,
    spec: &HeadSpec,
    what: &str,
    hidden: &CudaView<T>,
    n: usize,
    out: &mut CudaViewMut<O>,
) -> Result<()> {
    let (c, v) = (spec.hidden, spec.vocab);
    let w = T::matrix(ctx.w, spec.weight)?;
    ctx.blas.matmul(
        what,
        out,
        MatLayout::rm(n, v),
        hidden,
        MatLayout::rm(n, c),
        &w,
        MatLayout::rm(v, c).t(),
        false,
    )
}
