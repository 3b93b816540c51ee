//! The CUDA backward pass: head, final norm, the blocks in reverse, embeddings — adding every
//! parameter gradient into the fp32 buffers (allocated on the first backward).
//!
//! Its working set (the block scratch, the residual gradient, one head chunk) is allocated when
//! the backward starts and freed when it returns; its size is
//! [`ActivationBytes::backward`](super::plan::ActivationBytes), checked against free memory first.

use super::acts::{zeros, Acts};
use super::block::{self, BlockSpec, Ctx, Geo, Scratch};
use super::forward::attn_shape;
use super::head::{self, HeadSpec};
use super::plan::{ActivationBytes, BatchPlan, DeviceBatch};
use super::precision::Act;
use super::{CudaForward, CudaModel, Saved};
use crate::model::config::{Arch, ModelConfig};
use crate::model::params::Layout;
use crate::ops::embedding::{self, DeviceBuckets, TokenBuckets};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

impl<T: Act> Scratch<T> {
    /// The block scratch for a plan.
    fn alloc(s: &Arc<CudaStream>, cfg: &ModelConfig, p: &BatchPlan) -> Result<Self> {
        let (n, c, i) = (p.rows(), cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        Ok(Scratch {
            dnorm: zeros(s, n * c, "norm-output gradient")?,
            dtmp: zeros(s, n * c, "norm-input gradient")?,
            dq: zeros(s, n * qd, "dq")?,
            datt: zeros(s, n * qd, "attention-output gradient")?,
            dk: zeros(s, n * kvd, "dk")?,
            dv: zeros(s, n * kvd, "dv")?,
            dact: zeros(s, n * i, "MLP activation gradient")?,
            dpre: zeros(s, n * i, "MLP pre-activation gradient")?,
            dup: if cfg.arch == Arch::Llama {
                Some(zeros(s, n * i, "MLP up gradient")?)
            } else {
                None
            },
            delta: zeros(s, p.batch * cfg.num_heads * p.tm, "attention delta")?,
        })
    }
}

/// Everything below the head for one saved forward: final norm, blocks, embeddings.
fn trunk<T: Act>(
    ctx: &Ctx,
    layout: &Layout,
    p: &BatchPlan,
    db: &DeviceBatch,
    acts: &Acts<T>,
    grads: &mut [CudaSlice<f32>],
    dhidden: &CudaSlice<T>,
) -> Result<()> {
    let cfg = ctx.cfg;
    let (s, c) = (ctx.dev.stream(), cfg.hidden_size);
    let mut dx = zeros::<T>(s, p.rows() * c, "residual gradient")?;
    block::norm_backward(
        ctx,
        grads,
        layout.final_norm,
        &dhidden.as_view(),
        &acts.resid[cfg.num_layers].as_view(),
        &acts.fin,
        &mut dx.as_view_mut(),
    )
    .context("final norm backward")?;
    let mut scratch = Scratch::<T>::alloc(s, cfg, p)?;
    let geo = Geo {
        shape: attn_shape(cfg, p),
        pos: db.pos.as_view(),
        lengths: db.lengths.as_view(),
    };
    for (l, blk) in layout.blocks.iter().enumerate().rev() {
        let spec = BlockSpec::new(cfg, blk, l);
        block::backward(
            ctx,
            &spec,
            &geo,
            grads,
            &acts.resid[l].as_view(),
            &acts.layers[l],
            &mut scratch,
            &mut dx,
        )?;
    }
    drop(scratch);
    // Embeddings: deterministic scatter-add, one block per table row that occurs.
    let ids = TokenBuckets::new("input_ids", &p.ids, cfg.vocab_size)?;
    let ids = DeviceBuckets::upload(ctx.dev, &ids)?;
    embedding::backward_cuda(ctx.dev, &dx.as_view(), &ids, c, &mut grads[layout.embed].as_view_mut())
        .context("token embedding backward")?;
    if let Some(pe) = layout.pos_embed {
        let pos = TokenBuckets::new("positions", &p.pos, cfg.max_positions)?;
        let pos = DeviceBuckets::upload(ctx.dev, &pos)?;
        embedding::backward_cuda(ctx.dev, &dx.as_view(), &pos, c, &mut grads[pe].as_view_mut())
            .context("position embedding backward")?;
    }
    Ok(())
}

/// Head, then [`trunk`], for per-target-row upstream gradients `row_dlogp`.
#[allow(clippy::too_many_arguments)]
fn run<T: Act>(
    ctx: &Ctx,
    layout: &Layout,
    spec: &HeadSpec,
    p: &BatchPlan,
    db: &DeviceBatch,
    acts: &Acts<T>,
    row_dlogp: &[f32],
    grads: &mut [CudaSlice<f32>],
) -> Result<()> {
    let s = ctx.dev.stream();
    let dlogp = s.clone_htod(row_dlogp).context("uploading dlogp")?;
    let mut dhidden = zeros::<T>(s, p.rows() * ctx.cfg.hidden_size, "final-norm output gradient")?;
    head::backward(ctx, spec, db, acts, &dlogp.as_view(), grads, &mut dhidden).context("LM head backward")?;
    trunk(ctx, layout, p, db, acts, grads, &dhidden)
}

impl CudaModel {
    /// Allocates the (zeroed) fp32 gradient buffers if no backward has run yet.
    pub(super) fn ensure_grads(&mut self) -> Result<()> {
        if self.grads.is_some() {
            return Ok(());
        }
        let bytes: usize = self.plan.specs.iter().map(|s| 4 * s.numel()).sum();
        ActivationBytes::ensure_fits(&self.dev, bytes, "the fp32 gradient buffers")?;
        let s = self.dev.stream();
        let g = self
            .plan
            .specs
            .iter()
            .map(|spec| zeros::<f32>(s, spec.numel(), &format!("gradient of {}", spec.name)))
            .collect::<Result<Vec<_>>>()?;
        self.grads = Some(g);
        Ok(())
    }

    /// Adds `∂L/∂θ` into the gradient buffers for upstream gradients `dlogp` (`[B, T]`, read only
    /// where the forward had a target) through the activations saved by `f`.
    pub fn backward(&mut self, f: &CudaForward, dlogp: &[f32]) -> Result<()> {
        let p = &f.plan;
        ensure!(
            dlogp.len() == p.batch * p.seq,
            "dlogp: expected {}×{} = {} entries, got {}",
            p.batch,
            p.seq,
            p.batch * p.seq,
            dlogp.len()
        );
        ensure!(f.model_id == self.id, "forward state: not produced by this model");
        if let Some(&at) = p.padded_index.iter().find(|&&i| !dlogp[i].is_finite()) {
            bail!("dlogp[{},{}] = {} is not finite", at / p.seq, at % p.seq, dlogp[at]);
        }
        let Some(state) = &f.state else {
            // No target in the batch: the gradient is exactly zero.
            return Ok(());
        };
        let need = ActivationBytes::of(&self.config, p, self.precision, self.lm_head_chunk).backward;
        ActivationBytes::ensure_fits(&self.dev, need, "the backward pass (working set)")?;
        self.ensure_grads()?;
        let row_dlogp: Vec<f32> = p.padded_index.iter().map(|&i| dlogp[i]).collect();
        let spec = self.head_spec();
        let ctx = block::Ctx {
            dev: &self.dev,
            blas: &self.blas,
            cfg: &self.config,
            w: &self.weights,
            inv_freq: self.inv_freq.as_ref(),
        };
        let Some(grads) = self.grads.as_mut() else {
            bail!("gradient buffers missing after allocation");
        };
        let layout = &self.plan.layout;
        match &state.acts {
            Saved::F32(a) => run(&ctx, layout, &spec, p, &state.db, a, &row_dlogp, grads),
            Saved::Bf16(a) => run(&ctx, layout, &spec, p, &state.db, a, &row_dlogp, grads),
        }
    }
}
