//! The CUDA forward pass: embeddings, the blocks, the final norm and the chunked head, then the
//! per-target-row outputs copied back to the host in the caller's `[B, T]` layout.

use super::acts::Acts;
use super::block::{self, BlockSpec, Ctx, Geo};
use super::head::{self, HeadSpec};
use super::plan::{ActivationBytes, BatchPlan, DeviceBatch};
use super::precision::{Act, Precision};
use super::{CudaForward, CudaModel, Saved, State};
use crate::model::batch::Batch;
use crate::model::config::ModelConfig;
use crate::model::params::Layout;
use crate::ops::attention::AttnShape;
use crate::ops::embedding;
use anyhow::{ensure, Context, Result};
use half::bf16;

/// The attention geometry of a plan.
pub(super) fn attn_shape(cfg: &ModelConfig, p: &BatchPlan) -> AttnShape {
    AttnShape {
        batch: p.batch,
        seq: p.tm,
        heads_q: cfg.num_heads,
        heads_kv: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    }
}

/// Embeddings, every block and the final norm into `acts` (everything but the head).
fn trunk<T: Act>(ctx: &Ctx, layout: &Layout, p: &BatchPlan, db: &DeviceBatch, acts: &mut Acts<T>) -> Result<()> {
    let cfg = ctx.cfg;
    let c = cfg.hidden_size;
    let wte = ctx.w.master[layout.embed].as_view();
    let pos = layout.pos_embed.map(|i| ctx.w.master[i].as_view());
    let (ids, positions) = (db.ids.as_view(), db.pos.as_view());
    embedding::forward_cuda(
        ctx.dev,
        &ids,
        &wte,
        pos.as_ref().map(|wpe| (&positions, wpe)),
        c,
        &mut acts.resid[0].as_view_mut(),
    )
    .context("embedding")?;
    let geo = Geo {
        shape: attn_shape(cfg, p),
        pos: db.pos.as_view(),
        lengths: db.lengths.as_view(),
    };
    for (l, blk) in layout.blocks.iter().enumerate() {
        let spec = BlockSpec::new(cfg, blk, l);
        let (before, after) = acts.resid.split_at_mut(l + 1);
        block::forward(
            ctx,
            &spec,
            &geo,
            &before[l].as_view(),
            &mut acts.layers[l],
            &mut after[0].as_view_mut(),
        )?;
    }
    block::norm_forward(
        ctx,
        layout.final_norm,
        &acts.resid[cfg.num_layers].as_view(),
        p.rows(),
        &mut acts.fin,
    )
    .context("final norm")
}

/// Per-target-row head outputs on the host.
struct RowOutputs {
    lse: Vec<f32>,
    logp: Vec<f32>,
    entropy: Vec<f32>,
    argmax: Vec<u32>,
    mean: Vec<f32>,
}

fn download_rows<T: Act>(ctx: &Ctx, acts: &Acts<T>) -> Result<RowOutputs> {
    let s = ctx.dev.stream();
    Ok(RowOutputs {
        lse: s.clone_dtoh(&acts.lse)?,
        logp: s.clone_dtoh(&acts.logp)?,
        entropy: s.clone_dtoh(&acts.entropy)?,
        argmax: s.clone_dtoh(&acts.argmax)?,
        mean: s.clone_dtoh(&acts.mean)?,
    })
}

impl CudaModel {
    /// Checks `batch` against the model and against what the CUDA kernels implement.
    fn check_cuda_batch(&self, p: &BatchPlan) -> Result<()> {
        if let Some((l, w)) = self
            .config
            .sliding_window
            .iter()
            .enumerate()
            .find_map(|(l, w)| w.map(|w| (l, w)))
        {
            ensure!(
                p.tm <= w,
                "layer {l} has a sliding window of {w} tokens but a row has {} tokens; the CUDA \
                 attention kernels have no window mask (use --device cpu, or --max-length {w})",
                p.tm
            );
        }
        let bh = p.batch * self.config.num_heads;
        ensure!(
            bh <= 65535,
            "batch × attention heads = {bh} exceeds the CUDA attention grid limit 65535; use a smaller batch"
        );
        Ok(())
    }

    fn run_forward<T: Act>(&self, p: &BatchPlan, db: &DeviceBatch) -> Result<Acts<T>> {
        let ctx = self.ctx();
        let cfg = &self.config;
        let lse_len = p.batch * cfg.num_heads * p.tm;
        let mut acts = Acts::<T>::alloc(self.dev.stream(), cfg, p.rows(), p.num_targets(), lse_len)?;
        trunk(&ctx, &self.plan.layout, p, db, &mut acts)?;
        head::forward(&ctx, &self.head_spec(), db, &mut acts).context("LM head")?;
        Ok(acts)
    }

    /// Forward pass over a batch, keeping the activations for [`CudaModel::backward`] on the
    /// device and returning the per-token outputs on the host.
    pub fn forward(&self, batch: &Batch) -> Result<CudaForward> {
        super::super::check_batch(&self.config, batch)?;
        let p = BatchPlan::new(batch)?;
        self.check_cuda_batch(&p)?;
        let cells = p.batch * p.seq;
        let mut out = CudaForward {
            model_id: self.id,
            logp: vec![0.0; cells],
            lse: vec![0.0; cells],
            entropy: vec![0.0; cells],
            argmax: vec![0; cells],
            logit_mean: vec![0.0; cells],
            state: None,
            plan: p,
        };
        if out.plan.num_targets() == 0 {
            // Nothing reaches a loss: every output is 0 and the backward has nothing to do.
            return Ok(out);
        }
        let bytes = ActivationBytes::of(&self.config, &out.plan, self.precision, self.lm_head_chunk);
        ActivationBytes::ensure_fits(&self.dev, bytes.saved, "the forward pass (saved activations)")?;
        let db = DeviceBatch::upload(&self.dev, &out.plan)?;
        let ctx = self.ctx();
        let (acts, rows) = match self.precision {
            Precision::F32 => {
                let a = self.run_forward::<f32>(&out.plan, &db)?;
                let r = download_rows(&ctx, &a)?;
                (Saved::F32(a), r)
            }
            Precision::Bf16 => {
                let a = self.run_forward::<bf16>(&out.plan, &db)?;
                let r = download_rows(&ctx, &a)?;
                (Saved::Bf16(a), r)
            }
        };
        for (i, &pi) in out.plan.padded_index.iter().enumerate() {
            out.logp[pi] = rows.logp[i];
            out.lse[pi] = rows.lse[i];
            out.entropy[pi] = rows.entropy[i];
            out.argmax[pi] = rows.argmax[i];
            out.logit_mean[pi] = rows.mean[i];
        }
        out.state = Some(State { db, acts });
        Ok(out)
    }

    /// Full logits `[B, T, V]` as f32 on the host (zeros at padded positions), through the
    /// unchunked head: B·T·V floats, meant for tests and comparisons, not training.
    pub fn forward_logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        super::super::check_batch(&self.config, batch)?;
        let p = BatchPlan::new(batch)?;
        self.check_cuda_batch(&p)?;
        let v = self.config.vocab_size;
        let mut out = vec![0f32; p.batch * p.seq * v];
        if p.rows() == 0 {
            return Ok(out);
        }
        let db = DeviceBatch::upload(&self.dev, &p)?;
        let packed: Vec<f32> = match self.precision {
            Precision::F32 => self.logits_all::<f32>(&p, &db)?,
            Precision::Bf16 => self.logits_all::<bf16>(&p, &db)?.iter().map(|x| x.to_f32()).collect(),
        };
        for (b, &len) in p.lengths.iter().enumerate() {
            let (len, src, dst) = (len as usize, b * p.tm * v, b * p.seq * v);
            out[dst..dst + len * v].copy_from_slice(&packed[src..src + len * v]);
        }
        Ok(out)
    }

    fn logits_all<T: Act>(&self, p: &BatchPlan, db: &DeviceBatch) -> Result<Vec<T>> {
        let ctx = self.ctx();
        let cfg = &self.config;
        let lse_len = p.batch * cfg.num_heads * p.tm;
        // One target row suffices for the allocation; the head forward is not run.
        let mut acts = Acts::<T>::alloc(self.dev.stream(), cfg, p.rows(), 1, lse_len)?;
        trunk(&ctx, &self.plan.layout, p, db, &mut acts)?;
        let spec: HeadSpec = self.head_spec();
        let logits = head::full_logits(&ctx, &spec, &acts.fin.out, p.rows())?;
        Ok(self.dev.stream().clone_dtoh(&logits)?)
    }
}
