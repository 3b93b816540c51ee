//! One transformer block, forward and backward, for both block shapes.
//!
//! GPT-2 and Llama blocks differ in four places only (norm kind, how q/k/v are sliced out of the
//! weights, rotary or not, GELU or SwiGLU MLP), so one routine handles both, driven by a
//! [`BlockSpec`] resolved once from the [`Layout`](crate::model::Layout).

use super::act;
use super::attention::{self, Geometry};
use super::matmul::{gemm, View};
use super::norm;
use super::reduce::add_column_sums;
use crate::model::config::{Arch, ModelConfig};
use crate::model::params::{Block, LinearIdx, NormIdx, Tensors};
use crate::model::rope::RopeTable;
use rayon::prelude::*;

/// A linear map `y = x·W + b` where `W` is a [`View`] (logical `[in, out]`) into a weight tensor
/// and `b` a slice of a bias tensor: covers `nn.Linear` (transposed view), `Conv1D` (plain view)
/// and GPT-2's fused `c_attn` (a column block of each).
#[derive(Clone, Copy, Debug)]
pub struct Lin {
    weight: usize,
    view: View,
    bias: Option<(usize, usize)>,
}

impl Lin {
    /// `nn.Linear` with weight `[out, in]`.
    fn linear(idx: LinearIdx, inp: usize, out: usize) -> Self {
        Self {
            weight: idx.weight,
            view: View::row_major(out, inp).t(),
            bias: idx.bias.map(|b| (b, 0)),
        }
    }

    /// Columns `start..start+out` of a `Conv1D` with weight `[in, total]`.
    fn conv1d(idx: LinearIdx, inp: usize, total: usize, start: usize, out: usize) -> Self {
        Self {
            weight: idx.weight,
            view: View::row_major(inp, total).cols(start, out),
            bias: idx.bias.map(|b| (b, start)),
        }
    }

    fn dims(&self) -> (usize, usize) {
        (self.view.rows, self.view.cols)
    }

    /// `y = x·W + b` over `n` rows (y overwritten).
    fn forward(&self, p: &Tensors, x: &[f32], n: usize, y: &mut [f32]) {
        let (inp, out) = self.dims();
        gemm(
            y,
            View::row_major(n, out),
            x,
            View::row_major(n, inp),
            p.at(self.weight),
            self.view,
            false,
        );
        if let Some((b, off)) = self.bias {
            let bias = &p.at(b)[off..off + out];
            y.par_chunks_mut(out)
                .for_each(|row| row.iter_mut().zip(bias).for_each(|(a, &b)| *a += b));
        }
    }

    /// `dW += xᵀ·dy`, `db += Σ dy`, and `dx (+)= dy·Wᵀ` (added when `accumulate`).
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &Tensors,
        g: &mut Tensors,
        x: &[f32],
        dy: &[f32],
        n: usize,
        dx: &mut [f32],
        accumulate: bool,
    ) {
        let (inp, out) = self.dims();
        let (xv, dyv) = (View::row_major(n, inp), View::row_major(n, out));
        gemm(g.at_mut(self.weight), self.view, x, xv.t(), dy, dyv, true);
        if let Some((b, off)) = self.bias {
            add_column_sums(dy, &mut g.at_mut(b)[off..off + out]);
        }
        gemm(dx, xv, dy, dyv, p.at(self.weight), self.view.t(), accumulate);
    }
}

/// The MLP variants.
#[derive(Clone, Copy, Debug)]
enum Mlp {
    /// `proj(gelu_tanh(fc(m)))`.
    Gelu { fc: Lin, proj: Lin },
    /// `down(silu(gate(m)) ⊙ up(m))`.
    SwiGlu { gate: Lin, up: Lin, down: Lin },
}

/// Everything a block needs, resolved from the layout and config.
#[derive(Clone, Copy, Debug)]
pub struct BlockSpec {
    layer_norm: bool,
    norm1: NormIdx,
    norm2: NormIdx,
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    mlp: Mlp,
    rope: bool,
    scale: f32,
    window: Option<usize>,
}

impl BlockSpec {
    /// Resolves block `layer` of `cfg`.
    pub fn new(cfg: &ModelConfig, block: &Block, layer: usize) -> Self {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let mut scale = cfg.attn_scale;
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f32;
        }
        let window = cfg.sliding_window.get(layer).copied().flatten();
        match block {
            Block::Gpt2(b) => BlockSpec {
                layer_norm: true,
                norm1: b.ln_1,
                norm2: b.ln_2,
                q: Lin::conv1d(b.c_attn, c, 3 * c, 0, c),
                k: Lin::conv1d(b.c_attn, c, 3 * c, c, c),
                v: Lin::conv1d(b.c_attn, c, 3 * c, 2 * c, c),
                o: Lin::conv1d(b.attn_c_proj, c, c, 0, c),
                mlp: Mlp::Gelu {
                    fc: Lin::conv1d(b.c_fc, c, i, 0, i),
                    proj: Lin::conv1d(b.mlp_c_proj, i, c, 0, c),
                },
                rope: false,
                scale,
                window,
            },
            Block::Llama(b) => BlockSpec {
                layer_norm: false,
                norm1: b.input_norm,
                norm2: b.post_norm,
                q: Lin::linear(b.q, c, qd),
                k: Lin::linear(b.k, c, kvd),
                v: Lin::linear(b.v, c, kvd),
                o: Lin::linear(b.o, qd, c),
                mlp: Mlp::SwiGlu {
                    gate: Lin::linear(b.gate, c, i),
                    up: Lin::linear(b.up, c, i),
                    down: Lin::linear(b.down, i, c),
                },
                rope: true,
                scale,
                window,
            },
        }
    }
}

/// A norm's output `[N, C]` and per-row statistics (`mean` is empty for RMSNorm).
#[derive(Clone, Debug, Default)]
struct NormActs {
    out: Vec<f32>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
}

/// Saved activations of one block over `N` packed rows.
#[derive(Clone, Debug, Default)]
pub struct BlockActs {
    /// First norm.
    n1: NormActs,
    /// Queries / keys after rotary, values: `[N, H·d]`, `[N, KvH·d]`, `[N, KvH·d]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// Attention output before `o` `[N, H·d]` and its score log-sum-exp `[N, H]`.
    att: Vec<f32>,
    att_lse: Vec<f32>,
    /// Residual after the attention half `[N, C]`.
    x_mid: Vec<f32>,
    /// Second norm.
    n2: NormActs,
    /// MLP pre-activation (GELU input, or the gate) `[N, I]`.
    pre: Vec<f32>,
    /// SwiGLU `up` projection `[N, I]` (empty for GELU).
    up: Vec<f32>,
    /// MLP activation fed to the down/proj matrix `[N, I]`.
    act: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, n: usize) {
    v.clear();
    v.resize(n, 0.0);
}

impl BlockActs {
    /// Sizes every buffer for `n` rows (reusing capacity).
    pub fn plan(&mut self, cfg: &ModelConfig, n: usize) {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let ln = cfg.arch == Arch::Gpt2;
        for (v, len) in [
            (&mut self.n1.out, n * c),
            (&mut self.n1.mean, if ln { n } else { 0 }),
            (&mut self.n1.rstd, n),
            (&mut self.q, n * qd),
            (&mut self.k, n * kvd),
            (&mut self.v, n * kvd),
            (&mut self.att, n * qd),
            (&mut self.att_lse, n * cfg.num_heads),
            (&mut self.x_mid, n * c),
            (&mut self.n2.out, n * c),
            (&mut self.n2.mean, if ln { n } else { 0 }),
            (&mut self.n2.rstd, n),
            (&mut self.pre, n * i),
            (&mut self.up, if ln { 0 } else { n * i }),
            (&mut self.act, n * i),
        ] {
            resize(v, len);
        }
    }
}

/// Backward scratch shared by all blocks, sized for `N` rows.
pub struct Scratch {
    dnorm: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    datt: Vec<f32>,
    delta: Vec<f32>,
    dact: Vec<f32>,
    dpre: Vec<f32>,
    dup: Vec<f32>,
}

impl Scratch {
    /// Buffers for `n` rows.
    pub fn new(cfg: &ModelConfig, n: usize) -> Self {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let z = |len: usize| vec![0f32; len];
        let swiglu = cfg.arch == Arch::Llama;
        Self {
            dnorm: z(n * c),
            dq: z(n * qd),
            dk: z(n * kvd),
            dv: z(n * kvd),
            datt: z(n * qd),
            delta: z(n * cfg.num_heads),
            dact: z(n * i),
            dpre: z(if swiglu { n * i } else { 0 }),
            dup: z(if swiglu { n * i } else { 0 }),
        }
    }
}

/// Per-batch context shared by every block: packed-row geometry and rotary tables.
pub struct Ctx<'a> {
    /// Model configuration.
    pub cfg: &'a ModelConfig,
    /// Per packed row: position in its sequence.
    pub pos: &'a [usize],
    /// Per packed row: first row of its sequence.
    pub seq_start: &'a [usize],
    /// Per packed row: one past its sequence's last row.
    pub seq_end: &'a [usize],
    /// Rotary tables (Llama family).
    pub rope: Option<&'a RopeTable>,
}

impl Ctx<'_> {
    fn geometry(&self, spec: &BlockSpec) -> Geometry<'_> {
        Geometry {
            seq_start: self.seq_start,
            seq_end: self.seq_end,
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            scale: spec.scale,
            window: spec.window,
        }
    }

    /// Rotates every head of every row of `x` (`[N, heads·d]`) to its position (or back).
    fn rotate(&self, x: &mut [f32], heads: usize, inverse: bool) {
        let (Some(rope), d) = (self.rope, self.cfg.head_dim) else {
            return;
        };
        x.par_chunks_mut(heads * d).enumerate().for_each(|(n, row)| {
            for h in row.chunks_mut(d) {
                rope.rotate(h, self.pos[n], inverse);
            }
        });
    }

    fn norm_forward(&self, spec: &BlockSpec, p: &Tensors, idx: NormIdx, x: &[f32], o: &mut NormActs) {
        let eps = self.cfg.norm_eps;
        match (spec.layer_norm, idx.bias) {
            (true, Some(b)) => {
                norm::layernorm_forward(x, p.at(idx.weight), p.at(b), eps, &mut o.out, &mut o.mean, &mut o.rstd)
            }
            _ => norm::rmsnorm_forward(x, p.at(idx.weight), eps, &mut o.out, &mut o.rstd),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn norm_backward(
        &self,
        spec: &BlockSpec,
        p: &Tensors,
        g: &mut Tensors,
        idx: NormIdx,
        dout: &[f32],
        x: &[f32],
        saved: &NormActs,
        dx: &mut [f32],
    ) {
        let (w, mean, rstd) = (p.at(idx.weight), &saved.mean, &saved.rstd);
        match (spec.layer_norm, idx.bias) {
            (true, Some(b)) => {
                let [dw, db] = g.many_mut([idx.weight, b]);
                norm::layernorm_backward(dout, x, w, mean, rstd, dx, dw, db)
            }
            _ => norm::rmsnorm_backward(dout, x, w, rstd, dx, g.at_mut(idx.weight)),
        }
    }
}

/// `x_out = block(x_in)` over `n` packed rows, saving what the backward needs in `a`.
pub fn forward(ctx: &Ctx, spec: &BlockSpec, p: &Tensors, x_in: &[f32], a: &mut BlockActs, x_out: &mut [f32]) {
    forward_with(ctx, spec, p, x_in, a, x_out, |a| {
        attention::forward(&a.q, &a.k, &a.v, &ctx.geometry(spec), &mut a.att, &mut a.att_lse)
    });
}

/// One layer's key/value cache for incremental decoding: `[B, cap, KvH·d]` each, slot
/// `b·cap + t` holding the rotated key and the value of token `t` of sequence `b`.
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    /// Keys (after rotary).
    pub k: Vec<f32>,
    /// Values.
    pub v: Vec<f32>,
}

/// `x_out = block(x_in)` for new rows of already-started sequences: the rows' keys and values are
/// written into `cache` at their slots, then each row attends over its sequence's cache. `ctx.pos`
/// holds the rows' positions (for rotary); `a` is scratch sized by [`BlockActs::plan`].
#[allow(clippy::too_many_arguments)]
pub fn forward_cached(
    ctx: &Ctx,
    spec: &BlockSpec,
    p: &Tensors,
    x_in: &[f32],
    rows: &attention::CachedRows,
    cache: &mut LayerCache,
    a: &mut BlockActs,
    x_out: &mut [f32],
) {
    let kvd = ctx.cfg.num_kv_heads * ctx.cfg.head_dim;
    forward_with(ctx, spec, p, x_in, a, x_out, |a| {
        for (r, (&b, &t)) in rows.seq.iter().zip(rows.pos).enumerate() {
            let slot = (b * rows.cap + t) * kvd;
            cache.k[slot..slot + kvd].copy_from_slice(&a.k[r * kvd..(r + 1) * kvd]);
            cache.v[slot..slot + kvd].copy_from_slice(&a.v[r * kvd..(r + 1) * kvd]);
        }
        attention::forward_cached(&a.q, &cache.k, &cache.v, rows, &ctx.geometry(spec), &mut a.att)
    });
}

/// The block with the attention step supplied by the caller: it reads `a.q`/`a.k`/`a.v`
/// (rotated) and writes `a.att`. Everything else is shared by the training and decoding paths.
fn forward_with(
    ctx: &Ctx,
    spec: &BlockSpec,
    p: &Tensors,
    x_in: &[f32],
    a: &mut BlockActs,
    x_out: &mut [f32],
    attend: impl FnOnce(&mut BlockActs),
) {
    let n = ctx.pos.len();
    let (hq, hkv) = (ctx.cfg.num_heads, ctx.cfg.num_kv_heads);
    ctx.norm_forward(spec, p, spec.norm1, x_in, &mut a.n1);
    spec.q.forward(p, &a.n1.out, n, &mut a.q);
    spec.k.forward(p, &a.n1.out, n, &mut a.k);
    spec.v.forward(p, &a.n1.out, n, &mut a.v);
    if spec.rope {
        ctx.rotate(&mut a.q, hq, false);
        ctx.rotate(&mut a.k, hkv, false);
    }
    attend(a);
    spec.o.forward(p, &a.att, n, &mut a.x_mid);
    add_into(&mut a.x_mid, x_in);
    ctx.norm_forward(spec, p, spec.norm2, &a.x_mid, &mut a.n2);
    match spec.mlp {
        Mlp::Gelu { fc, proj } => {
            fc.forward(p, &a.n2.out, n, &mut a.pre);
            act::gelu_forward(&a.pre, &mut a.act);
            proj.forward(p, &a.act, n, x_out);
        }
        Mlp::SwiGlu { gate, up, down } => {
            gate.forward(p, &a.n2.out, n, &mut a.pre);
            up.forward(p, &a.n2.out, n, &mut a.up);
            act::swiglu_forward(&a.pre, &a.up, &mut a.act);
            down.forward(p, &a.act, n, x_out);
        }
    }
    add_into(x_out, &a.x_mid);
}

/// Backward of [`forward`]: `dx` holds ∂L/∂x_out on entry and ∂L/∂x_in on return; parameter
/// gradients are added into `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    ctx: &Ctx,
    spec: &BlockSpec,
    p: &Tensors,
    g: &mut Tensors,
    x_in: &[f32],
    a: &BlockActs,
    s: &mut Scratch,
    dx: &mut [f32],
) {
    let n = ctx.pos.len();
    let (hq, hkv) = (ctx.cfg.num_heads, ctx.cfg.num_kv_heads);
    match spec.mlp {
        Mlp::Gelu { fc, proj } => {
            proj.backward(p, g, &a.act, dx, n, &mut s.dact, false);
            act::gelu_backward(&a.pre, &mut s.dact);
            fc.backward(p, g, &a.n2.out, &s.dact, n, &mut s.dnorm, false);
        }
        Mlp::SwiGlu { gate, up, down } => {
            down.backward(p, g, &a.act, dx, n, &mut s.dact, false);
            act::swiglu_backward(&a.pre, &a.up, &s.dact, &mut s.dpre, &mut s.dup);
            gate.backward(p, g, &a.n2.out, &s.dpre, n, &mut s.dnorm, false);
            up.backward(p, g, &a.n2.out, &s.dup, n, &mut s.dnorm, true);
        }
    }
    ctx.norm_backward(spec, p, g, spec.norm2, &s.dnorm, &a.x_mid, &a.n2, dx);
    spec.o.backward(p, g, &a.att, dx, n, &mut s.datt, false);
    attention::backward(
        &s.datt,
        &a.q,
        &a.k,
        &a.v,
        &a.att,
        &a.att_lse,
        &ctx.geometry(spec),
        &mut s.dq,
        &mut s.dk,
        &mut s.dv,
        &mut s.delta,
    );
    if spec.rope {
        ctx.rotate(&mut s.dq, hq, true);
        ctx.rotate(&mut s.dk, hkv, true);
    }
    spec.q.backward(p, g, &a.n1.out, &s.dq, n, &mut s.dnorm, false);
    spec.k.backward(p, g, &a.n1.out, &s.dk, n, &mut s.dnorm, true);
    spec.v.backward(p, g, &a.n1.out, &s.dv, n, &mut s.dnorm, true);
    ctx.norm_backward(spec, p, g, spec.norm1, &s.dnorm, x_in, &a.n1, dx);
}

/// `y += x` elementwise.
pub fn add_into(y: &mut [f32], x: &[f32]) {
    y.par_iter_mut().zip(x.par_iter()).for_each(|(a, &b)| *a += b);
}
