//! Causal multi-head attention with grouped-query heads and right padding, flash-attention style.
//!
//! Shapes: `q`, `out` `[B, T, Hq, D]`; `k`, `v` `[B, T, Hkv, D]`; `lengths` `[B]`; `lse`
//! `[B, Hq, T]`. Query head `h` attends with kv head `h / (Hq/Hkv)`. For a row `t < len_b`,
//! `s_j = (q_t·k_j)/sqrt(D)` over keys `j ≤ t` (keys at `j ≥ len_b` are masked by causality),
//! `out_t = Σ_j softmax(s)_j v_j` and `lse_t = log Σ_j e^{s_j}`. Query rows `t ≥ len_b` produce
//! zeros (out, lse and every gradient), so padding never leaks into the loss.
//!
//! Saved for the backward: only `lse` (not the `[T, T]` probabilities): the backward recomputes
//! `p_ij = exp(s_ij − lse_i)`, with `delta_i = dout_i·out_i`, `ds_ij = p_ij (dout_i·v_j − delta_i)`,
//! `dq_i = Σ_j ds_ij k_j/√D`, `dk_j = Σ_i ds_ij q_i/√D`, `dv_j = Σ_i p_ij dout_i` (dk/dv summed
//! over the query heads of the group). All outputs are overwritten. The CUDA kernels own every
//! output row with one warp (no atomics, deterministic); `head_dim` ≤ 128 on CUDA.
//!
//! Decoding ([`decode_cpu`], [`decode_cuda`]): new rows attend over a KV cache instead of over
//! each other. The cache is `[B·cap, Hkv, D]` (slot `b·cap + t` holds the rotated key, or the
//! value, of token `t` of sequence `b`); row `r` is token `pos[r]` of sequence `seq[r]` and sees
//! the slots `seq[r]·cap + lo ..= seq[r]·cap + pos[r]`, `lo = pos[r] + 1 − window` (0 without a
//! window), which the caller has written first (this step's rows included, so a prefill and a
//! single-token step are the same call). Nothing is saved: decoding has no backward. The numerics
//! are those of the CPU engine's cached attention: fp32 scores, the maximum first, one `exp` per
//! score, one division at the end.

use super::support::{cfg, dim_i32, ensure_len, GpuElem};
use crate::device::CudaDevice;
use crate::dtype::Elem;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use rayon::prelude::*;

/// Largest head_dim the CUDA kernels support (4 dims per lane of a warp).
pub const CUDA_MAX_HEAD_DIM: usize = 128;
/// Rows per CUDA block (one warp each); fixed by the kernels.
const ROWS_PER_BLOCK: usize = 8;

/// The attention problem size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnShape {
    /// Batch rows B.
    pub batch: usize,
    /// Padded sequence length T.
    pub seq: usize,
    /// Query heads Hq.
    pub heads_q: usize,
    /// Key/value heads Hkv (divides Hq).
    pub heads_kv: usize,
    /// Head dimension D.
    pub head_dim: usize,
}

impl AttnShape {
    /// The softmax scale 1/sqrt(D) (HF `head_dim**-0.5`).
    pub fn scale(&self) -> f32 {
        (1.0 / (self.head_dim as f64).sqrt()) as f32
    }

    fn q_len(&self) -> usize {
        self.batch * self.seq * self.heads_q * self.head_dim
    }

    fn kv_len(&self) -> usize {
        self.batch * self.seq * self.heads_kv * self.head_dim
    }

    fn lse_len(&self) -> usize {
        self.batch * self.heads_q * self.seq
    }

    fn check(&self) -> Result<()> {
        check_heads(self.heads_q, self.heads_kv, self.head_dim)
    }

    /// Validates the forward tensors' lengths, naming the offender.
    fn check_fwd(&self, q: usize, k: usize, v: usize, lengths: usize, out: usize, lse: usize) -> Result<()> {
        self.check()?;
        ensure_len("q", q, self.q_len())?;
        ensure_len("k", k, self.kv_len())?;
        ensure_len("v", v, self.kv_len())?;
        ensure_len("lengths", lengths, self.batch)?;
        ensure_len("out", out, self.q_len())?;
        ensure_len("lse", lse, self.lse_len())
    }

    fn check_cuda(&self) -> Result<(i32, i32, i32, i32, i32)> {
        ensure!(
            self.head_dim <= CUDA_MAX_HEAD_DIM,
            "attention: head_dim {} exceeds the CUDA kernels' {CUDA_MAX_HEAD_DIM}",
            self.head_dim
        );
        ensure!(
            self.batch * self.heads_q <= 65535,
            "attention: batch·heads_q {} exceeds 65535",
            self.batch * self.heads_q
        );
        Ok((
            dim_i32("batch", self.batch)?,
            dim_i32("seq", self.seq)?,
            dim_i32("heads_q", self.heads_q)?,
            dim_i32("heads_kv", self.heads_kv)?,
            dim_i32("head_dim", self.head_dim)?,
        ))
    }
}

/// The head geometry both attention problems share: `D > 0` and whole query-head groups.
fn check_heads(heads_q: usize, heads_kv: usize, head_dim: usize) -> Result<()> {
    ensure!(head_dim > 0, "attention: head_dim must be positive");
    ensure!(
        heads_kv > 0 && heads_q.is_multiple_of(heads_kv),
        "attention: heads_q {heads_q} is not a multiple of heads_kv {heads_kv}"
    );
    Ok(())
}

fn check_lengths(lengths: &[u32], seq: usize) -> Result<()> {
    if let Some((b, &l)) = lengths.iter().enumerate().find(|(_, &l)| l as usize > seq) {
        anyhow::bail!("lengths[{b}] = {l} exceeds the padded length {seq}");
    }
    Ok(())
}

fn dot<T: Elem>(a: &[T], b: &[T]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.to_f32() * y.to_f32()).sum()
}

/// CPU forward: fills `out` and `lse`.
pub fn forward_cpu<T: Elem>(
    s: AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    lengths: &[u32],
    out: &mut [T],
    lse: &mut [f32],
) -> Result<()> {
    s.check_fwd(q.len(), k.len(), v.len(), lengths.len(), out.len(), lse.len())?;
    check_lengths(lengths, s.seq)?;
    let (t_, hq, hk, d) = (s.seq, s.heads_q, s.heads_kv, s.head_dim);
    let group = hq / hk;
    let scale = s.scale();
    let row = |b: usize, t: usize, h: usize, heads: usize| ((b * t_ + t) * heads + h) * d;
    // Parallel over tokens (b, t): out[b, t] is one contiguous [Hq, D] chunk; lse is transposed after.
    let mut lse_bt = vec![0f32; s.batch * t_ * hq];
    out.par_chunks_mut(hq * d.max(1))
        .zip(lse_bt.par_chunks_mut(hq.max(1)))
        .enumerate()
        .for_each(|(bt, (o, l))| {
            let (b, t) = (bt / t_, bt % t_);
            if t >= lengths[b] as usize {
                o.fill(T::from_f32(0.0));
                l.fill(0.0);
                return;
            }
            let mut p = vec![0f32; t + 1];
            let mut acc = vec![0f32; d];
            for h in 0..hq {
                let qr = &q[row(b, t, h, hq)..][..d];
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = dot(qr, &k[row(b, j, h / group, hk)..][..d]) * scale;
                }
                let m = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                acc.fill(0.0);
                for (j, pj) in p.iter_mut().enumerate() {
                    *pj = (*pj - m).exp();
                    sum += *pj;
                    for (a, vv) in acc.iter_mut().zip(&v[row(b, j, h / group, hk)..][..d]) {
                        *a += *pj * vv.to_f32();
                    }
                }
                for (oo, a) in o[h * d..][..d].iter_mut().zip(&acc) {
                    *oo = T::from_f32(a / sum);
                }
                l[h] = m + sum.ln();
            }
        });
    for b in 0..s.batch {
        for h in 0..hq {
            for t in 0..t_ {
                lse[(b * hq + h) * t_ + t] = lse_bt[(b * t_ + t) * hq + h];
            }
        }
    }
    Ok(())
}

/// Gradients of [`forward_cpu`]'s inputs, written by the backward (overwritten, same shapes).
pub struct AttnGrads<'a, T> {
    /// dL/dq `[B, T, Hq, D]`.
    pub dq: &'a mut [T],
    /// dL/dk `[B, T, Hkv, D]`.
    pub dk: &'a mut [T],
    /// dL/dv `[B, T, Hkv, D]`.
    pub dv: &'a mut [T],
}

/// CPU backward from the saved `out` and `lse` and the upstream `dout`.
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu<T: Elem>(
    s: AttnShape,
    q: &[T],
    k: &[T],
    v: &[T],
    out: &[T],
    dout: &[T],
    lse: &[f32],
    lengths: &[u32],
    grads: AttnGrads<'_, T>,
) -> Result<()> {
    s.check_fwd(q.len(), k.len(), v.len(), lengths.len(), out.len(), lse.len())?;
    check_lengths(lengths, s.seq)?;
    ensure_len("dout", dout.len(), s.q_len())?;
    ensure_len("dq", grads.dq.len(), s.q_len())?;
    ensure_len("dk", grads.dk.len(), s.kv_len())?;
    ensure_len("dv", grads.dv.len(), s.kv_len())?;
    let (t_, hq, hk, d) = (s.seq, s.heads_q, s.heads_kv, s.head_dim);
    let group = hq / hk;
    let scale = s.scale();
    let row = |b: usize, t: usize, h: usize, heads: usize| ((b * t_ + t) * heads + h) * d;
    let lse_at = |b: usize, h: usize, t: usize| lse[(b * hq + h) * t_ + t];
    // delta[b, t, h] = dout·out per query row.
    let delta: Vec<f32> = (0..s.batch * t_ * hq)
        .into_par_iter()
        .map(|i| {
            let off = i * d;
            dot(&dout[off..][..d], &out[off..][..d])
        })
        .collect();
    // ds for query row (b, t, h) and key j <= t.
    let ds_p = |b: usize, t: usize, h: usize, j: usize| -> (f32, f32) {
        let kv = row(b, j, h / group, hk);
        let qi = row(b, t, h, hq);
        let p = (dot(&q[qi..][..d], &k[kv..][..d]) * scale - lse_at(b, h, t)).exp();
        let dp = dot(&dout[qi..][..d], &v[kv..][..d]);
        (p * (dp - delta[(b * t_ + t) * hq + h]), p)
    };
    grads
        .dq
        .par_chunks_mut(hq * d.max(1))
        .enumerate()
        .for_each(|(bt, dqr)| {
            let (b, t) = (bt / t_, bt % t_);
            dqr.fill(T::from_f32(0.0));
            if t >= lengths[b] as usize {
                return;
            }
            let mut acc = vec![0f32; d];
            for h in 0..hq {
                acc.fill(0.0);
                for j in 0..=t {
                    let (ds, _) = ds_p(b, t, h, j);
                    for (a, kk) in acc.iter_mut().zip(&k[row(b, j, h / group, hk)..][..d]) {
                        *a += ds * kk.to_f32();
                    }
                }
                for (o, a) in dqr[h * d..][..d].iter_mut().zip(&acc) {
                    *o = T::from_f32(a * scale);
                }
            }
        });
    grads
        .dk
        .par_chunks_mut(hk * d.max(1))
        .zip(grads.dv.par_chunks_mut(hk * d.max(1)))
        .enumerate()
        .for_each(|(bj, (dkr, dvr))| {
            let (b, j) = (bj / t_, bj % t_);
            dkr.fill(T::from_f32(0.0));
            dvr.fill(T::from_f32(0.0));
            let len = lengths[b] as usize;
            if j >= len {
                return;
            }
            let (mut ak, mut av) = (vec![0f32; d], vec![0f32; d]);
            for g in 0..hk {
                ak.fill(0.0);
                av.fill(0.0);
                for h in g * group..(g + 1) * group {
                    for t in j..len {
                        let (ds, p) = ds_p(b, t, h, j);
                        let qi = row(b, t, h, hq);
                        for x in 0..d {
                            ak[x] += ds * q[qi + x].to_f32();
                            av[x] += p * dout[qi + x].to_f32();
                        }
                    }
                }
                for x in 0..d {
                    dkr[g * d + x] = T::from_f32(ak[x] * scale);
                    dvr[g * d + x] = T::from_f32(av[x]);
                }
            }
        });
    Ok(())
}

/// CUDA forward (same contract as [`forward_cpu`]). `lengths` must not exceed T (the kernels
/// clamp them; the CPU twin rejects them).
#[allow(clippy::too_many_arguments)]
pub fn forward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    s: AttnShape,
    q: &CudaView<T>,
    k: &CudaView<T>,
    v: &CudaView<T>,
    lengths: &CudaView<u32>,
    out: &mut CudaViewMut<T>,
    lse: &mut CudaViewMut<f32>,
) -> Result<()> {
    s.check_fwd(q.len(), k.len(), v.len(), lengths.len(), out.len(), lse.len())?;
    let (b_, t_, hq, hk, d) = s.check_cuda()?;
    if s.batch * s.seq * s.heads_q == 0 {
        return Ok(());
    }
    let scale = s.scale();
    let f = dev.function("attention", &format!("attention_forward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(q).arg(k).arg(v).arg(lengths).arg(out).arg(lse);
    b.arg(&b_).arg(&t_).arg(&hq).arg(&hk).arg(&d).arg(&scale);
    let grid = (s.seq.div_ceil(ROWS_PER_BLOCK) as u32, (s.batch * s.heads_q) as u32, 1);
    unsafe { b.launch(cfg(grid, (32 * ROWS_PER_BLOCK as u32, 1, 1))) }?;
    Ok(())
}

/// CUDA gradients plus the `delta` workspace `[B, Hq, T]` f32 (rowsum of dout·out, written by
/// the dq kernel and read by the dk/dv kernel; caller-owned so the backward allocates nothing).
pub struct AttnGradsCuda<'a, 'b, T> {
    /// dL/dq `[B, T, Hq, D]`.
    pub dq: &'a mut CudaViewMut<'b, T>,
    /// dL/dk `[B, T, Hkv, D]`.
    pub dk: &'a mut CudaViewMut<'b, T>,
    /// dL/dv `[B, T, Hkv, D]`.
    pub dv: &'a mut CudaViewMut<'b, T>,
    /// Workspace `[B, Hq, T]`.
    pub delta: &'a mut CudaViewMut<'b, f32>,
}

/// CUDA backward (same contract as [`backward_cpu`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    s: AttnShape,
    q: &CudaView<T>,
    k: &CudaView<T>,
    v: &CudaView<T>,
    out: &CudaView<T>,
    dout: &CudaView<T>,
    lse: &CudaView<f32>,
    lengths: &CudaView<u32>,
    grads: AttnGradsCuda<'_, '_, T>,
) -> Result<()> {
    s.check_fwd(q.len(), k.len(), v.len(), lengths.len(), out.len(), lse.len())?;
    ensure_len("dout", dout.len(), s.q_len())?;
    ensure_len("dq", grads.dq.len(), s.q_len())?;
    ensure_len("dk", grads.dk.len(), s.kv_len())?;
    ensure_len("dv", grads.dv.len(), s.kv_len())?;
    ensure_len("delta", grads.delta.len(), s.lse_len())?;
    let (b_, t_, hq, hk, d) = s.check_cuda()?;
    if s.batch * s.seq * s.heads_q == 0 {
        return Ok(());
    }
    let scale = s.scale();
    let block = (32 * ROWS_PER_BLOCK as u32, 1, 1);
    let rows = s.seq.div_ceil(ROWS_PER_BLOCK) as u32;
    let f = dev.function("attention", &format!("attention_backward_dq_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(q)
        .arg(k)
        .arg(v)
        .arg(out)
        .arg(dout)
        .arg(lse)
        .arg(lengths)
        .arg(grads.dq)
        .arg(&mut *grads.delta);
    b.arg(&b_).arg(&t_).arg(&hq).arg(&hk).arg(&d).arg(&scale);
    unsafe { b.launch(cfg((rows, (s.batch * s.heads_q) as u32, 1), block)) }?;
    let f = dev.function("attention", &format!("attention_backward_dkv_{}", T::SUFFIX))?;
    let delta = grads.delta.as_view();
    let mut b = dev.stream().launch_builder(&f);
    b.arg(q)
        .arg(k)
        .arg(v)
        .arg(dout)
        .arg(lse)
        .arg(&delta)
        .arg(lengths)
        .arg(grads.dk)
        .arg(grads.dv);
    b.arg(&b_).arg(&t_).arg(&hq).arg(&hk).arg(&d).arg(&scale);
    unsafe { b.launch(cfg((rows, (s.batch * s.heads_kv) as u32, 1), block)) }?;
    Ok(())
}

/// The problem size of one cached-attention step: `rows` new query rows over a cache of `batch`
/// sequences of `capacity` slots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeShape {
    /// New query rows `N`.
    pub rows: usize,
    /// Sequences `B` in the cache.
    pub batch: usize,
    /// Slots per sequence.
    pub capacity: usize,
    /// Query heads Hq.
    pub heads_q: usize,
    /// Key/value heads Hkv (divides Hq).
    pub heads_kv: usize,
    /// Head dimension D.
    pub head_dim: usize,
    /// Score multiplier (the model's; `1/√D` for every model the CUDA engine runs).
    pub scale: f32,
    /// Sliding window: keys with `pos − key ≥ window` are masked; `None` sees every earlier key.
    pub window: Option<usize>,
}

impl DecodeShape {
    fn q_len(&self) -> usize {
        self.rows * self.heads_q * self.head_dim
    }

    fn cache_len(&self) -> usize {
        self.batch * self.capacity * self.heads_kv * self.head_dim
    }

    /// Validates the geometry and every tensor's length, naming the offender.
    fn check(&self, q: usize, k_cache: usize, v_cache: usize, seq: usize, pos: usize, out: usize) -> Result<()> {
        check_heads(self.heads_q, self.heads_kv, self.head_dim)?;
        ensure!(self.heads_q > 0, "attention decode: heads_q must be positive");
        ensure!(
            self.window != Some(0),
            "attention decode: a sliding window must be at least 1 token"
        );
        ensure_len("q", q, self.q_len())?;
        ensure_len("k_cache", k_cache, self.cache_len())?;
        ensure_len("v_cache", v_cache, self.cache_len())?;
        ensure_len("seq", seq, self.rows)?;
        ensure_len("pos", pos, self.rows)?;
        ensure_len("out", out, self.q_len())
    }
}

/// Fails unless every row lies inside a cache of `batch` sequences × `capacity` slots
/// (`seq[r] < batch`, `pos[r] < capacity`), naming the first that does not. [`decode_cpu`] calls
/// it; callers of [`decode_cuda`] call it on the host copies of `seq`/`pos` before uploading them
/// (the launcher cannot read device memory).
pub fn check_decode_rows(batch: usize, capacity: usize, seq: &[u32], pos: &[u32]) -> Result<()> {
    if let Some((r, &b)) = seq.iter().enumerate().find(|(_, &b)| b as usize >= batch) {
        anyhow::bail!("seq[{r}] = {b} is outside the cache's {batch} sequences");
    }
    if let Some((r, &t)) = pos.iter().enumerate().find(|(_, &t)| t as usize >= capacity) {
        anyhow::bail!("pos[{r}] = {t} is outside the cache's {capacity} slots per sequence");
    }
    Ok(())
}

/// CPU cached attention: `out[r, h] = Σ_j softmax_j(scale·q[r,h]·k_j) v_j` over the slots row `r`
/// sees (see the module docs), query head `h` reading kv head `h / (Hq/Hkv)`. In f32 this is
/// bitwise the CPU engine's cached attention (same dot products, softmax and final scaling).
#[allow(clippy::too_many_arguments)]
pub fn decode_cpu<T: Elem>(
    s: DecodeShape,
    q: &[T],
    k_cache: &[T],
    v_cache: &[T],
    seq: &[u32],
    pos: &[u32],
    out: &mut [T],
) -> Result<()> {
    s.check(q.len(), k_cache.len(), v_cache.len(), seq.len(), pos.len(), out.len())?;
    check_decode_rows(s.batch, s.capacity, seq, pos)?;
    let (hq, d) = (s.heads_q, s.head_dim);
    let (group, kvw) = (hq / s.heads_kv, s.heads_kv * d);
    out.par_chunks_mut(hq * d).enumerate().for_each_init(
        || (Vec::new(), vec![0f32; d]),
        |(scores, acc), (r, o)| {
            let (t, base) = (pos[r] as usize, seq[r] as usize * s.capacity);
            let lo = s.window.map_or(0, |w| (t + 1).saturating_sub(w));
            let slots = base + lo..base + t + 1;
            for h in 0..hq {
                let qh = &q[(r * hq + h) * d..][..d];
                let off = h / group * d;
                scores.clear();
                scores.extend(slots.clone().map(|j| s.scale * dot(qh, &k_cache[j * kvw + off..][..d])));
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for x in scores.iter_mut() {
                    *x = (*x - m).exp();
                    sum += *x;
                }
                acc.fill(0.0);
                for (&p, j) in scores.iter().zip(slots.clone()) {
                    for (a, vv) in acc.iter_mut().zip(&v_cache[j * kvw + off..][..d]) {
                        *a += p * vv.to_f32();
                    }
                }
                let inv = 1.0 / sum;
                for (oo, &a) in o[h * d..(h + 1) * d].iter_mut().zip(acc.iter()) {
                    *oo = T::from_f32(a * inv);
                }
            }
        },
    );
    Ok(())
}

/// Warps (one per query row and head) per block of the decode kernel; fixed by the kernel.
const DECODE_WARPS: usize = 4;

/// CUDA [`decode_cpu`]. `seq` and `pos` live on the device: the caller checks their host copies
/// with [`check_decode_rows`] (a row outside the cache would write NaN, never out of bounds).
#[allow(clippy::too_many_arguments)]
pub fn decode_cuda<T: GpuElem>(
    dev: &CudaDevice,
    s: DecodeShape,
    q: &CudaView<T>,
    k_cache: &CudaView<T>,
    v_cache: &CudaView<T>,
    seq: &CudaView<u32>,
    pos: &CudaView<u32>,
    out: &mut CudaViewMut<T>,
) -> Result<()> {
    s.check(q.len(), k_cache.len(), v_cache.len(), seq.len(), pos.len(), out.len())?;
    ensure!(
        s.head_dim <= CUDA_MAX_HEAD_DIM,
        "attention decode: head_dim {} exceeds the CUDA kernel's {CUDA_MAX_HEAD_DIM}",
        s.head_dim
    );
    ensure!(
        s.heads_q <= 65535,
        "attention decode: heads_q {} exceeds the CUDA grid limit 65535",
        s.heads_q
    );
    let window = match s.window {
        Some(w) => dim_i32("window", w)?,
        None => 0,
    };
    let (n_i, b_i, cap_i) = (
        dim_i32("rows", s.rows)?,
        dim_i32("batch", s.batch)?,
        dim_i32("capacity", s.capacity)?,
    );
    dim_i32("batch × capacity", s.batch * s.capacity)?;
    let (hq, hk, d) = (
        dim_i32("heads_q", s.heads_q)?,
        dim_i32("heads_kv", s.heads_kv)?,
        dim_i32("head_dim", s.head_dim)?,
    );
    if s.rows == 0 {
        return Ok(());
    }
    let f = dev.function("attention", &format!("attention_decode_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(q).arg(k_cache).arg(v_cache).arg(seq).arg(pos).arg(out);
    b.arg(&n_i)
        .arg(&b_i)
        .arg(&cap_i)
        .arg(&hq)
        .arg(&hk)
        .arg(&d)
        .arg(&s.scale)
        .arg(&window);
    let grid = (s.rows.div_ceil(DECODE_WARPS) as u32, s.heads_q as u32, 1);
    // SAFETY: argument order and types match `attention_decode_*` (q, k_cache, v_cache, seq, pos,
    // out, then N, B, cap, Hq, Hk, D as int, scale as float, window as int); every length was
    // checked above and the rows by the caller; the block is the kernel's 32·DEC_WARPS threads.
    unsafe { b.launch(cfg(grid, (32 * DECODE_WARPS as u32, 1, 1))) }?;
    Ok(())
}
