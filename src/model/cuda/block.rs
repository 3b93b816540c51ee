//! One transformer block on the GPU, forward and backward, for both block shapes — the same
//! sequence of steps as the CPU engine's `block.rs`, each step a cuBLAS product or one of the
//! layer kernels of [`crate::ops`].
//!
//! GPT-2 and Llama blocks differ in the norm (LayerNorm with bias, or RMSNorm), how q/k/v come
//! out of the weights (column blocks of the fused Conv1D `c_attn`, or three `nn.Linear`s), rotary
//! or not, and the MLP (GELU or SwiGLU); a [`BlockSpec`] resolved from the layout says which.
//!
//! Gradient conventions match the ops: activation gradients are overwritten, parameter gradients
//! accumulate into the fp32 buffers (so micro-batches add up).
//!
//! Decoding ([`forward_cached`]) runs the same forward with the attention step swapped for one
//! over a KV cache, exactly as the CPU engine's `forward_with` does: the steps both share live in
//! one routine, so the two paths cannot drift apart.

use super::acts::{LayerActs, NormActs};
use super::gemm::{Blas, MatLayout};
use super::precision::Act;
use super::weights::DeviceWeights;
use crate::device::CudaDevice;
use crate::model::config::ModelConfig;
use crate::model::params::{Block, LinearIdx, NormIdx};
use crate::ops::attention::{self, AttnGradsCuda, AttnShape, DecodeShape};
use crate::ops::{activation as act, norm, rotary, rows};
use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};

/// What every block step reads: the device, cuBLAS, the config, the weights, the rotary table.
pub struct Ctx<'a> {
    /// The GPU.
    pub dev: &'a CudaDevice,
    /// Its cuBLAS handle.
    pub blas: &'a Blas,
    /// The model configuration.
    pub cfg: &'a ModelConfig,
    /// The parameters.
    pub w: &'a DeviceWeights,
    /// Rotary inverse frequencies `[head_dim/2]` (Llama family).
    pub inv_freq: Option<&'a CudaSlice<f32>>,
}

/// Per-batch attention geometry on the device.
pub struct Geo<'a> {
    /// `[B, Tm, H, D]` problem size.
    pub shape: AttnShape,
    /// `[N]` positions.
    pub pos: CudaView<'a, u32>,
    /// `[B]` lengths.
    pub lengths: CudaView<'a, u32>,
}

/// A linear map `y = x·W (+ b)` with `W` logically `[in, out]`: an `nn.Linear` (weight
/// `[out, in]`, read transposed) or a column block of a GPT-2 `Conv1D` (weight `[in, total]`).
#[derive(Clone, Copy, Debug)]
pub enum Proj {
    /// `nn.Linear`.
    Linear {
        /// Weight index.
        w: usize,
        /// Bias index.
        b: Option<usize>,
        /// Input width.
        inp: usize,
        /// Output width.
        out: usize,
    },
    /// Columns `start..start + out` of a `Conv1D` (and of its bias).
    Conv1d {
        /// Weight index.
        w: usize,
        /// Bias index.
        b: Option<usize>,
        /// Input width (rows of the weight).
        inp: usize,
        /// Columns of the whole weight.
        total: usize,
        /// First column of the block.
        start: usize,
        /// Output width (columns of the block).
        out: usize,
    },
}

impl Proj {
    fn linear(idx: LinearIdx, inp: usize, out: usize) -> Self {
        Proj::Linear {
            w: idx.weight,
            b: idx.bias,
            inp,
            out,
        }
    }

    fn conv1d(idx: LinearIdx, inp: usize, total: usize, start: usize, out: usize) -> Self {
        Proj::Conv1d {
            w: idx.weight,
            b: idx.bias,
            inp,
            total,
            start,
            out,
        }
    }

    /// `(weight index, bias index, in, out)`.
    fn parts(&self) -> (usize, Option<usize>, usize, usize) {
        match *self {
            Proj::Linear { w, b, inp, out } => (w, b, inp, out),
            Proj::Conv1d { w, b, inp, out, .. } => (w, b, inp, out),
        }
    }

    /// Element offset of the block inside the weight (and bias), and the weight's layout as the
    /// logical `[in, out]` matrix.
    fn weight_layout(&self) -> (usize, MatLayout) {
        match *self {
            Proj::Linear { inp, out, .. } => (0, MatLayout::rm(out, inp).t()),
            Proj::Conv1d {
                inp, total, start, out, ..
            } => (start, MatLayout::block(inp, out, total)),
        }
    }

    /// `y = x·W + b` over `n` rows (`y` overwritten).
    pub fn forward<T: Act>(
        &self,
        ctx: &Ctx,
        what: &str,
        x: &CudaView<T>,
        n: usize,
        y: &mut CudaViewMut<T>,
    ) -> Result<()> {
        let (w, b, inp, out) = self.parts();
        let (off, wl) = self.weight_layout();
        let wv = T::matrix(ctx.w, w)?;
        let wv = wv.slice(off..);
        ctx.blas.matmul(
            &format!("{what} forward"),
            y,
            MatLayout::rm(n, out),
            x,
            MatLayout::rm(n, inp),
            &wv,
            wl,
            false,
        )?;
        if let Some(bi) = b {
            let bias = ctx.w.master[bi].slice(off..off + out);
            act::bias_add_cuda(ctx.dev, y, &bias)?;
        }
        Ok(())
    }

    /// `dW += xᵀ·dy`, `db += Σ_rows dy`, and `dx (+)= dy·Wᵀ` (added when `accumulate`).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Act>(
        &self,
        ctx: &Ctx,
        what: &str,
        grads: &mut [CudaSlice<f32>],
        x: &CudaView<T>,
        dy: &CudaView<T>,
        n: usize,
        dx: &mut CudaViewMut<T>,
        accumulate: bool,
    ) -> Result<()> {
        let (w, b, inp, out) = self.parts();
        let (off, wl) = self.weight_layout();
        let (xl, dyl) = (MatLayout::rm(n, inp), MatLayout::rm(n, out));
        match *self {
            Proj::Linear { .. } => ctx.blas.matmul(
                &format!("{what} weight gradient"),
                &mut grads[w].as_view_mut(),
                MatLayout::rm(out, inp),
                dy,
                dyl.t(),
                x,
                xl,
                true,
            )?,
            Proj::Conv1d { total, .. } => ctx.blas.matmul(
                &format!("{what} weight gradient"),
                &mut grads[w].slice_mut(off..),
                MatLayout::block(inp, out, total),
                x,
                xl.t(),
                dy,
                dyl,
                true,
            )?,
        }
        if let Some(bi) = b {
            act::bias_backward_cuda(ctx.dev, dy, &mut grads[bi].slice_mut(off..off + out))?;
        }
        let wv = T::matrix(ctx.w, w)?;
        let wv = wv.slice(off..);
        ctx.blas.matmul(
            &format!("{what} input gradient"),
            dx,
            xl,
            dy,
            dyl,
            &wv,
            wl.t(),
            accumulate,
        )
    }
}

/// The MLP variants.
#[derive(Clone, Copy, Debug)]
enum Mlp {
    /// `proj(gelu_new(fc(m)))`.
    Gelu { fc: Proj, proj: Proj },
    /// `down(silu(gate(m)) ⊙ up(m))`.
    SwiGlu { gate: Proj, up: Proj, down: Proj },
}

/// Everything one block needs, resolved from the layout and config.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    norm1: NormIdx,
    norm2: NormIdx,
    q: Proj,
    k: Proj,
    v: Proj,
    o: Proj,
    mlp: Mlp,
    rope: bool,
    window: Option<usize>,
    layer: usize,
}

impl BlockSpec {
    /// Resolves block `layer` of `cfg`.
    pub fn new(cfg: &ModelConfig, block: &Block, layer: usize) -> Self {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let window = cfg.sliding_window.get(layer).copied().flatten();
        match block {
            Block::Gpt2(b) => BlockSpec {
                norm1: b.ln_1,
                norm2: b.ln_2,
                q: Proj::conv1d(b.c_attn, c, 3 * c, 0, c),
                k: Proj::conv1d(b.c_attn, c, 3 * c, c, c),
                v: Proj::conv1d(b.c_attn, c, 3 * c, 2 * c, c),
                o: Proj::conv1d(b.attn_c_proj, c, c, 0, c),
                mlp: Mlp::Gelu {
                    fc: Proj::conv1d(b.c_fc, c, i, 0, i),
                    proj: Proj::conv1d(b.mlp_c_proj, i, c, 0, c),
                },
                rope: false,
                window,
                layer,
            },
            Block::Llama(b) => BlockSpec {
                norm1: b.input_norm,
                norm2: b.post_norm,
                q: Proj::linear(b.q, c, qd),
                k: Proj::linear(b.k, c, kvd),
                v: Proj::linear(b.v, c, kvd),
                o: Proj::linear(b.o, qd, c),
                mlp: Mlp::SwiGlu {
                    gate: Proj::linear(b.gate, c, i),
                    up: Proj::linear(b.up, c, i),
                    down: Proj::linear(b.down, i, c),
                },
                rope: true,
                window,
                layer,
            },
        }
    }

    /// `layer L <what>`, the name of a step in errors.
    fn name(&self, what: &str) -> String {
        format!("layer {} {what}", self.layer)
    }
}

/// LayerNorm (with bias and a saved mean) or RMSNorm of the `n` rows of `x` into the first `n`
/// rows of `o` (whose buffers may hold more: the decode scratch is sized for its largest pass).
pub fn norm_forward<T: Act>(ctx: &Ctx, idx: NormIdx, x: &CudaView<T>, n: usize, o: &mut NormActs<T>) -> Result<()> {
    let (c, eps) = (ctx.cfg.hidden_size, ctx.cfg.norm_eps);
    let w = ctx.w.master[idx.weight].as_view();
    let out = &mut o.out.slice_mut(0..n * c);
    let rstd = &mut o.rstd.slice_mut(0..n);
    match (idx.bias, o.mean.as_mut()) {
        (Some(b), Some(mean)) => norm::layernorm_forward_cuda(
            ctx.dev,
            x,
            &w,
            &ctx.w.master[b].as_view(),
            eps,
            c,
            out,
            &mut mean.slice_mut(0..n),
            rstd,
        ),
        (None, None) => norm::rmsnorm_forward_cuda(ctx.dev, x, &w, eps, c, out, rstd),
        _ => bail!("norm: a LayerNorm needs a bias and a saved mean, an RMSNorm neither"),
    }
}

/// Two distinct elements of a slice mutably (a norm's weight and bias gradients).
fn pair_mut<T>(v: &mut [T], i: usize, j: usize) -> Result<(&mut T, &mut T)> {
    ensure!(i != j, "pair_mut: the same tensor {i} twice");
    if i < j {
        let (lo, hi) = v.split_at_mut(j);
        Ok((&mut lo[i], &mut hi[0]))
    } else {
        let (lo, hi) = v.split_at_mut(i);
        Ok((&mut hi[0], &mut lo[j]))
    }
}

/// Backward of [`norm_forward`]: `dx` = ∂L/∂x (overwritten), norm weight (and bias) gradients
/// accumulated.
#[allow(clippy::too_many_arguments)]
pub fn norm_backward<T: Act>(
    ctx: &Ctx,
    grads: &mut [CudaSlice<f32>],
    idx: NormIdx,
    dout: &CudaView<T>,
    x: &CudaView<T>,
    saved: &NormActs<T>,
    dx: &mut CudaViewMut<T>,
) -> Result<()> {
    let c = ctx.cfg.hidden_size;
    let w = ctx.w.master[idx.weight].as_view();
    match (idx.bias, &saved.mean) {
        (Some(b), Some(mean)) => {
            let (dw, db) = pair_mut(grads, idx.weight, b)?;
            norm::layernorm_backward_cuda(
                ctx.dev,
                dout,
                x,
                &w,
                &mean.as_view(),
                &saved.rstd.as_view(),
                c,
                dx,
                &mut dw.as_view_mut(),
                &mut db.as_view_mut(),
            )
        }
        (None, None) => norm::rmsnorm_backward_cuda(
            ctx.dev,
            dout,
            x,
            &w,
            &saved.rstd.as_view(),
            c,
            dx,
            &mut grads[idx.weight].as_view_mut(),
        ),
        _ => bail!("norm: a LayerNorm needs a bias and a saved mean, an RMSNorm neither"),
    }
}

/// Rotates the `[n, Hq·D]` queries and `[n, Hkv·D]` keys to the rows' positions `pos` (or back).
fn rotate<T: Act>(
    ctx: &Ctx,
    pos: &CudaView<u32>,
    q: &mut CudaViewMut<T>,
    k: &mut CudaViewMut<T>,
    inverse: bool,
) -> Result<()> {
    let cfg = ctx.cfg;
    let Some(inv) = ctx.inv_freq else {
        bail!("rotary: this model has no rotary table");
    };
    let (hq, hk, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    if inverse {
        rotary::backward_cuda(ctx.dev, q, k, pos, &inv.as_view(), hq, hk, d)
    } else {
        rotary::forward_cuda(ctx.dev, q, k, pos, &inv.as_view(), hq, hk, d)
    }
}

/// `x_out = block(x_in)` over the batch's `N` rows, saving what the backward needs in `a`.
pub fn forward<T: Act>(
    ctx: &Ctx,
    spec: &BlockSpec,
    geo: &Geo,
    x_in: &CudaView<T>,
    a: &mut LayerActs<T>,
    x_out: &mut CudaViewMut<T>,
) -> Result<()> {
    // The training buffers hold exactly the batch's N rows, so whole views are the N rows.
    forward_with(ctx, spec, &geo.pos, x_in, a, x_out, |a| {
        attention::forward_cuda(
            ctx.dev,
            geo.shape,
            &a.q.as_view(),
            &a.k.as_view(),
            &a.v.as_view(),
            &geo.lengths,
            &mut a.att.as_view_mut(),
            &mut a.lse.as_view_mut(),
        )
    })
}

/// One layer's key/value cache for incremental decoding: `[B·cap, Hkv·D]` each in the activation
/// type, slot `b·cap + t` holding the rotated key and the value of token `t` of sequence `b`.
pub struct LayerCache<T> {
    /// Keys (after rotary).
    pub k: CudaSlice<T>,
    /// Values.
    pub v: CudaSlice<T>,
}

/// Where the `m` new rows of one decoding pass sit in the KV cache, on the device. The host
/// built and checked them (`seq < B`, `pos < cap`, distinct slots), as the row kernels require.
pub struct CachedRows<'a> {
    /// `[m]` sequence of each row.
    pub seq: CudaView<'a, u32>,
    /// `[m]` position of each row in its sequence (its rotary angle and its last key).
    pub pos: CudaView<'a, u32>,
    /// `[m]` cache slot `seq·cap + pos` of each row, distinct.
    pub slots: CudaView<'a, u32>,
    /// Sequences `B` in the cache.
    pub batch: usize,
    /// Slots per sequence `cap`.
    pub capacity: usize,
}

/// `x_out = block(x_in)` for `m` new rows of already-started sequences: their keys and values are
/// written into `cache` at their slots, then each row attends over its own sequence's cache (GQA,
/// the layer's sliding window). `a` is scratch holding at least `m` rows; the first `m` are used.
#[allow(clippy::too_many_arguments)]
pub fn forward_cached<T: Act>(
    ctx: &Ctx,
    spec: &BlockSpec,
    at: &CachedRows,
    cache: &mut LayerCache<T>,
    x_in: &CudaView<T>,
    a: &mut LayerActs<T>,
    x_out: &mut CudaViewMut<T>,
) -> Result<()> {
    let cfg = ctx.cfg;
    let m = at.pos.len();
    let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let shape = DecodeShape {
        rows: m,
        batch: at.batch,
        capacity: at.capacity,
        heads_q: cfg.num_heads,
        heads_kv: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        scale: cfg.attn_scale,
        window: spec.window,
    };
    forward_with(ctx, spec, &at.pos, x_in, a, x_out, |a| {
        let (k_new, v_new) = (a.k.slice(0..m * kvd), a.v.slice(0..m * kvd));
        rows::scatter_cuda(ctx.dev, &k_new, &at.slots, kvd, &mut cache.k.as_view_mut())?;
        rows::scatter_cuda(ctx.dev, &v_new, &at.slots, kvd, &mut cache.v.as_view_mut())?;
        attention::decode_cuda(
            ctx.dev,
            shape,
            &a.q.slice(0..m * qd),
            &cache.k.as_view(),
            &cache.v.as_view(),
            &at.seq,
            &at.pos,
            &mut a.att.slice_mut(0..m * qd),
        )
    })
}

/// The block with the attention step supplied by the caller, over the `n = pos.len()` rows of
/// `x_in`: `attend` reads the first `n` rows of `a.q`/`a.k`/`a.v` (rotated) and writes the first
/// `n` of `a.att`. Everything else is shared by the training and decoding paths; buffers of `a`
/// may hold more than `n` rows (only the first `n` are touched).
fn forward_with<T: Act>(
    ctx: &Ctx,
    spec: &BlockSpec,
    pos: &CudaView<u32>,
    x_in: &CudaView<T>,
    a: &mut LayerActs<T>,
    x_out: &mut CudaViewMut<T>,
    attend: impl FnOnce(&mut LayerActs<T>) -> Result<()>,
) -> Result<()> {
    let cfg = ctx.cfg;
    let n = pos.len();
    let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    norm_forward(ctx, spec.norm1, x_in, n, &mut a.n1)?;
    let h = a.n1.out.slice(0..n * c);
    spec.q
        .forward(ctx, &spec.name("q"), &h, n, &mut a.q.slice_mut(0..n * qd))?;
    spec.k
        .forward(ctx, &spec.name("k"), &h, n, &mut a.k.slice_mut(0..n * kvd))?;
    spec.v
        .forward(ctx, &spec.name("v"), &h, n, &mut a.v.slice_mut(0..n * kvd))?;
    if spec.rope {
        let (mut q, mut k) = (a.q.slice_mut(0..n * qd), a.k.slice_mut(0..n * kvd));
        rotate(ctx, pos, &mut q, &mut k, false)?;
    }
    attend(a)?;
    let mut x_mid = a.x_mid.slice_mut(0..n * c);
    spec.o
        .forward(ctx, &spec.name("o"), &a.att.slice(0..n * qd), n, &mut x_mid)?;
    act::residual_add_cuda(ctx.dev, &mut x_mid, x_in)?;
    let x_mid = a.x_mid.slice(0..n * c);
    norm_forward(ctx, spec.norm2, &x_mid, n, &mut a.n2)?;
    let mo = a.n2.out.slice(0..n * c);
    let (mut pre, mut hid) = (a.pre.slice_mut(0..n * i), a.act.slice_mut(0..n * i));
    match spec.mlp {
        Mlp::Gelu { fc, proj } => {
            fc.forward(ctx, &spec.name("mlp fc"), &mo, n, &mut pre)?;
            act::gelu_forward_cuda(ctx.dev, &pre.as_view(), &mut hid)?;
            proj.forward(ctx, &spec.name("mlp proj"), &hid.as_view(), n, x_out)?;
        }
        Mlp::SwiGlu { gate, up, down } => {
            let Some(upb) = a.up.as_mut() else {
                bail!("SwiGLU block without an up-projection buffer");
            };
            let mut upv = upb.slice_mut(0..n * i);
            gate.forward(ctx, &spec.name("mlp gate"), &mo, n, &mut pre)?;
            up.forward(ctx, &spec.name("mlp up"), &mo, n, &mut upv)?;
            act::swiglu_forward_cuda(ctx.dev, &pre.as_view(), &upv.as_view(), &mut hid)?;
            down.forward(ctx, &spec.name("mlp down"), &hid.as_view(), n, x_out)?;
        }
    }
    act::residual_add_cuda(ctx.dev, x_out, &x_mid)
}

/// Backward working set shared by every block, `N` rows.
pub struct Scratch<T> {
    /// ∂L/∂(norm output) `[N, C]`.
    pub dnorm: CudaSlice<T>,
    /// A norm's ∂L/∂x before it is added to the residual gradient `[N, C]`.
    pub dtmp: CudaSlice<T>,
    /// `[N, Hq·D]`.
    pub dq: CudaSlice<T>,
    /// `[N, Hq·D]`.
    pub datt: CudaSlice<T>,
    /// `[N, Hkv·D]`.
    pub dk: CudaSlice<T>,
    /// `[N, Hkv·D]`.
    pub dv: CudaSlice<T>,
    /// ∂L/∂(MLP activation) `[N, I]`.
    pub dact: CudaSlice<T>,
    /// ∂L/∂(pre-activation or gate) `[N, I]`.
    pub dpre: CudaSlice<T>,
    /// ∂L/∂up (SwiGLU) `[N, I]`.
    pub dup: Option<CudaSlice<T>>,
    /// Attention row constants `[B, Hq, Tm]`.
    pub delta: CudaSlice<f32>,
}

/// Backward of [`forward`]: `dx` holds ∂L/∂x_out on entry and ∂L/∂x_in on return; parameter
/// gradients are added into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Act>(
    ctx: &Ctx,
    spec: &BlockSpec,
    geo: &Geo,
    grads: &mut [CudaSlice<f32>],
    x_in: &CudaView<T>,
    a: &LayerActs<T>,
    s: &mut Scratch<T>,
    dx: &mut CudaSlice<T>,
) -> Result<()> {
    let n = geo.pos.len();
    let m = a.n2.out.as_view();
    match spec.mlp {
        Mlp::Gelu { fc, proj } => {
            proj.backward(
                ctx,
                &spec.name("mlp proj"),
                grads,
                &a.act.as_view(),
                &dx.as_view(),
                n,
                &mut s.dact.as_view_mut(),
                false,
            )?;
            act::gelu_backward_cuda(ctx.dev, &a.pre.as_view(), &s.dact.as_view(), &mut s.dpre.as_view_mut())?;
            fc.backward(
                ctx,
                &spec.name("mlp fc"),
                grads,
                &m,
                &s.dpre.as_view(),
                n,
                &mut s.dnorm.as_view_mut(),
                false,
            )?;
        }
        Mlp::SwiGlu { gate, up, down } => {
            let (Some(upb), Some(dup)) = (a.up.as_ref(), s.dup.as_mut()) else {
                bail!("SwiGLU block without its up-projection buffers");
            };
            down.backward(
                ctx,
                &spec.name("mlp down"),
                grads,
                &a.act.as_view(),
                &dx.as_view(),
                n,
                &mut s.dact.as_view_mut(),
                false,
            )?;
            act::swiglu_backward_cuda(
                ctx.dev,
                &a.pre.as_view(),
                &upb.as_view(),
                &s.dact.as_view(),
                &mut s.dpre.as_view_mut(),
                &mut dup.as_view_mut(),
            )?;
            gate.backward(
                ctx,
                &spec.name("mlp gate"),
                grads,
                &m,
                &s.dpre.as_view(),
                n,
                &mut s.dnorm.as_view_mut(),
                false,
            )?;
            up.backward(
                ctx,
                &spec.name("mlp up"),
                grads,
                &m,
                &dup.as_view(),
                n,
                &mut s.dnorm.as_view_mut(),
                true,
            )?;
        }
    }
    norm_backward(
        ctx,
        grads,
        spec.norm2,
        &s.dnorm.as_view(),
        &a.x_mid.as_view(),
        &a.n2,
        &mut s.dtmp.as_view_mut(),
    )?;
    act::residual_add_cuda(ctx.dev, &mut dx.as_view_mut(), &s.dtmp.as_view())?;
    spec.o.backward(
        ctx,
        &spec.name("o"),
        grads,
        &a.att.as_view(),
        &dx.as_view(),
        n,
        &mut s.datt.as_view_mut(),
        false,
    )?;
    {
        let (mut dq, mut dk, mut dv, mut delta) = (
            s.dq.as_view_mut(),
            s.dk.as_view_mut(),
            s.dv.as_view_mut(),
            s.delta.as_view_mut(),
        );
        attention::backward_cuda(
            ctx.dev,
            geo.shape,
            &a.q.as_view(),
            &a.k.as_view(),
            &a.v.as_view(),
            &a.att.as_view(),
            &s.datt.as_view(),
            &a.lse.as_view(),
            &geo.lengths,
            AttnGradsCuda {
                dq: &mut dq,
                dk: &mut dk,
                dv: &mut dv,
                delta: &mut delta,
            },
        )?;
    }
    if spec.rope {
        rotate(ctx, &geo.pos, &mut s.dq.as_view_mut(), &mut s.dk.as_view_mut(), true)?;
    }
    let h = a.n1.out.as_view();
    spec.q.backward(
        ctx,
        &spec.name("q"),
        grads,
        &h,
        &s.dq.as_view(),
        n,
        &mut s.dnorm.as_view_mut(),
        false,
    )?;
    spec.k.backward(
        ctx,
        &spec.name("k"),
        grads,
        &h,
        &s.dk.as_view(),
        n,
        &mut s.dnorm.as_view_mut(),
        true,
    )?;
    spec.v.backward(
        ctx,
        &spec.name("v"),
        grads,
        &h,
        &s.dv.as_view(),
        n,
        &mut s.dnorm.as_view_mut(),
        true,
    )?;
    norm_backward(
        ctx,
        grads,
        spec.norm1,
        &s.dnorm.as_view(),
        x_in,
        &a.n1,
        &mut s.dtmp.as_view_mut(),
    )?;
    act::residual_add_cuda(ctx.dev, &mut dx.as_view_mut(), &s.dtmp.as_view())
}
