//! The CPU engine: explicit f32 forward and backward over packed rows (llm.c style, no autograd),
//! multi-threaded (GEMMs through the `gemm` crate, everything else through rayon).
//!
//! Two phases, because DPO and the f-divergence SFT losses need the per-token log-probs of the
//! whole batch before they can say how much each token matters:
//! 1. [`Model::forward`] keeps every activation the backward needs (in a [`Forward`]) and returns
//!    per-token `logp`/`lse`/`entropy` in the padded `[B, T]` layout.
//! 2. [`Model::backward`] takes per-token upstream gradients `dlogp[b, t]` and *adds* parameter
//!    gradients into a [`Grads`] store (so micro-batches accumulate; zero it with
//!    [`Tensors::zero`](crate::model::Tensors::zero) at the start of a window).

mod act;
mod attention;
mod block;
mod decode;
mod head;
mod matmul;
mod norm;
mod reduce;

use super::batch::{Batch, Packing};
use super::config::ModelConfig;
use super::params::Grads;
use super::rope::RopeTable;
use super::Model;
use anyhow::{ensure, Result};
use block::{BlockActs, BlockSpec, Ctx, Scratch};
use head::{Head, RowExtrema};
use rayon::prelude::*;

pub use decode::KvCache;

/// Saved state of one forward pass: packed-row activations plus the per-token outputs.
///
/// Buffers are planned from the batch (number of valid tokens) and reused by
/// [`Model::forward_into`] when the next micro-batch arrives.
#[derive(Clone, Debug, Default)]
pub struct Forward {
    batch: usize,
    seq: usize,
    packing: Packing,
    rope: Option<RopeTable>,
    /// Residual stream entering block `l` (`resid[L]` leaves the last block), `[N, C]` each.
    resid: Vec<Vec<f32>>,
    blocks: Vec<BlockActs>,
    /// Final norm output (the LM head input) and its statistics.
    hidden: Vec<f32>,
    final_mean: Vec<f32>,
    final_rstd: Vec<f32>,
    /// Per target row (in `packing.target_rows` order).
    row_lse: Vec<f32>,
    row_logp: Vec<f32>,
    row_entropy: Vec<f32>,
    row_extrema: Vec<RowExtrema>,
    /// Padded `[B, T]` views of the same values (0 where there is no target).
    logp: Vec<f32>,
    lse: Vec<f32>,
    entropy: Vec<f32>,
    argmax: Vec<u32>,
    logit_mean: Vec<f32>,
}

impl Forward {
    /// `log p(target)` per position, `[B, T]` row-major; 0 where the target is ignored.
    pub fn logp(&self) -> &[f32] {
        &self.logp
    }
    /// Log-sum-exp of the logits per position with a target, `[B, T]`; 0 elsewhere.
    pub fn lse(&self) -> &[f32] {
        &self.lse
    }
    /// Softmax entropy per position with a target, `[B, T]`; 0 elsewhere.
    pub fn entropy(&self) -> &[f32] {
        &self.entropy
    }
    /// Argmax of the logits per position with a target, `[B, T]`; 0 elsewhere (mask with the
    /// targets). `argmax == target` is TRL's `mean_token_accuracy`.
    pub fn argmax(&self) -> &[u32] {
        &self.argmax
    }
    /// Mean of the logits over the vocabulary per position with a target, `[B, T]`; 0 elsewhere.
    /// Averaged over completion tokens this is TRL's `logits/chosen` / `logits/rejected`.
    pub fn logit_mean(&self) -> &[f32] {
        &self.logit_mean
    }
    /// Batch rows `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Padded length `T`.
    pub fn seq(&self) -> usize {
        self.seq
    }
    /// Number of positions with a target.
    pub fn num_targets(&self) -> usize {
        self.packing.target_rows.len()
    }
    /// True where position `i` of the `[B, T]` layout has a target.
    pub fn target_mask(&self) -> Vec<bool> {
        let mut m = vec![false; self.batch * self.seq];
        self.packing.padded_index.iter().for_each(|&i| m[i] = true);
        m
    }
    /// Per-row sums of `logp` (accumulated in f64), length `B`.
    pub fn sequence_logps(&self) -> Vec<f64> {
        (0..self.batch)
            .map(|b| {
                self.logp[b * self.seq..(b + 1) * self.seq]
                    .iter()
                    .map(|&x| x as f64)
                    .sum()
            })
            .collect()
    }

    fn plan(&mut self, cfg: &ModelConfig, batch: &Batch) {
        self.batch = batch.batch();
        self.seq = batch.seq();
        self.packing = Packing::new(batch);
        let n = self.packing.rows();
        let c = cfg.hidden_size;
        self.rope = cfg
            .rope
            .as_ref()
            .map(|r| RopeTable::new(r, cfg.head_dim, batch.max_len()));
        self.resid.resize_with(cfg.num_layers + 1, Vec::new);
        self.resid.iter_mut().for_each(|r| {
            r.clear();
            r.resize(n * c, 0.0)
        });
        self.blocks.resize_with(cfg.num_layers, BlockActs::default);
        self.blocks.iter_mut().for_each(|b| b.plan(cfg, n));
        let ln = cfg.arch == super::Arch::Gpt2;
        let t = self.packing.target_rows.len();
        for (v, len) in [
            (&mut self.hidden, n * c),
            (&mut self.final_mean, if ln { n } else { 0 }),
            (&mut self.final_rstd, n),
            (&mut self.row_lse, t),
            (&mut self.row_logp, t),
            (&mut self.row_entropy, t),
            (&mut self.logp, self.batch * self.seq),
            (&mut self.lse, self.batch * self.seq),
            (&mut self.entropy, self.batch * self.seq),
            (&mut self.logit_mean, self.batch * self.seq),
        ] {
            v.clear();
            v.resize(len, 0.0);
        }
        self.row_extrema.clear();
        self.row_extrema.resize(t, RowExtrema::default());
        self.argmax.clear();
        self.argmax.resize(self.batch * self.seq, 0);
    }

    fn ctx<'a>(&'a self, cfg: &'a ModelConfig) -> Ctx<'a> {
        Ctx {
            cfg,
            pos: &self.packing.pos,
            seq_start: &self.packing.seq_start,
            seq_end: &self.packing.seq_end,
            rope: self.rope.as_ref(),
        }
    }
}

impl Model {
    /// Forward pass over a batch, keeping the activations for [`Model::backward`].
    pub fn forward(&self, batch: &Batch) -> Result<Forward> {
        let mut f = Forward::default();
        self.forward_into(batch, &mut f)?;
        Ok(f)
    }

    /// [`Model::forward`] into an existing [`Forward`], reusing its buffers.
    pub fn forward_into(&self, batch: &Batch, f: &mut Forward) -> Result<()> {
        self.trunk_forward(batch, f)?;
        let head = self.head(&f.hidden);
        let p = &f.packing;
        head.forward(
            &p.target_rows,
            &p.targets,
            &mut f.row_lse,
            &mut f.row_logp,
            &mut f.row_entropy,
            &mut f.row_extrema,
        )?;
        for (i, &pi) in p.padded_index.iter().enumerate() {
            f.logp[pi] = f.row_logp[i];
            f.lse[pi] = f.row_lse[i];
            f.entropy[pi] = f.row_entropy[i];
            f.argmax[pi] = f.row_extrema[i].argmax;
            f.logit_mean[pi] = f.row_extrema[i].mean;
        }
        Ok(())
    }

    /// Adds `∂L/∂θ` into `grads` for upstream gradients `dlogp` (`[B, T]`, read only where the
    /// forward had a target) through the activations saved by `f`.
    pub fn backward(&self, f: &Forward, dlogp: &[f32], grads: &mut Grads) -> Result<()> {
        ensure!(
            dlogp.len() == f.batch * f.seq,
            "dlogp: expected {}×{} = {} entries, got {}",
            f.batch,
            f.seq,
            f.batch * f.seq,
            dlogp.len()
        );
        ensure!(
            grads.specs() == self.params.specs(),
            "grads: not keyed like this model's parameters"
        );
        ensure!(
            f.blocks.len() == self.config.num_layers,
            "forward state: not produced by this model"
        );
        if let Some(i) = f.packing.padded_index.iter().position(|&i| !dlogp[i].is_finite()) {
            let at = f.packing.padded_index[i];
            anyhow::bail!("dlogp[{},{}] = {} is not finite", at / f.seq, at % f.seq, dlogp[at]);
        }
        let cfg = &self.config;
        let (n, c) = (f.packing.rows(), cfg.hidden_size);
        let lay = &self.plan.layout;
        let p = &f.packing;
        // LM head: d(hidden) and d(head weight).
        let row_dlogp: Vec<f32> = p.padded_index.iter().map(|&i| dlogp[i]).collect();
        let mut dhidden = vec![0f32; n * c];
        self.head(&f.hidden).backward(
            &p.target_rows,
            &p.targets,
            &f.row_lse,
            &row_dlogp,
            grads.at_mut(lay.lm_head),
            &mut dhidden,
        )?;
        // Final norm: d(residual stream leaving the last block).
        let mut dx = vec![0f32; n * c];
        let x_last = &f.resid[cfg.num_layers];
        let fnorm = lay.final_norm;
        match fnorm.bias {
            Some(b) => {
                let [dw, db] = grads.many_mut([fnorm.weight, b]);
                let w = self.params.at(fnorm.weight);
                norm::layernorm_backward(&dhidden, x_last, w, &f.final_mean, &f.final_rstd, &mut dx, dw, db);
            }
            None => norm::rmsnorm_backward(
                &dhidden,
                x_last,
                self.params.at(fnorm.weight),
                &f.final_rstd,
                &mut dx,
                grads.at_mut(fnorm.weight),
            ),
        }
        drop(dhidden);
        let ctx = f.ctx(cfg);
        let mut scratch = Scratch::new(cfg, n);
        for (l, blk) in lay.blocks.iter().enumerate().rev() {
            let spec = BlockSpec::new(cfg, blk, l);
            block::backward(
                &ctx,
                &spec,
                &self.params,
                grads,
                &f.resid[l],
                &f.blocks[l],
                &mut scratch,
                &mut dx,
            );
        }
        // Embeddings: scatter-add, sequential so repeated ids sum in a fixed order.
        let de = grads.at_mut(lay.embed);
        for (r, &id) in p.ids.iter().enumerate() {
            let dst = &mut de[id as usize * c..(id as usize + 1) * c];
            dst.iter_mut().zip(&dx[r * c..(r + 1) * c]).for_each(|(a, &b)| *a += b);
        }
        if let Some(pe) = lay.pos_embed {
            let dp = grads.at_mut(pe);
            for (r, &t) in p.pos.iter().enumerate() {
                dp[t * c..(t + 1) * c]
                    .iter_mut()
                    .zip(&dx[r * c..(r + 1) * c])
                    .for_each(|(a, &b)| *a += b);
            }
        }
        Ok(())
    }

    /// Full logits `[B, T, V]` (zeros at padded positions), through the unchunked head. Memory is
    /// B·T·V floats: meant for tests and comparisons, not training.
    pub fn forward_logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let mut f = Forward::default();
        self.trunk_forward(batch, &mut f)?;
        let v = self.config.vocab_size;
        let rows: Vec<usize> = (0..f.packing.rows()).collect();
        let packed = self.head(&f.hidden).full_logits(&rows);
        let mut out = vec![0f32; batch.batch() * batch.seq() * v];
        for (b, &start) in f.packing.offsets[..batch.batch()].iter().enumerate() {
            let len = batch.lengths()[b];
            let dst = b * batch.seq() * v;
            out[dst..dst + len * v].copy_from_slice(&packed[start * v..(start + len) * v]);
        }
        Ok(out)
    }

    fn head<'a>(&'a self, states: &'a [f32]) -> Head<'a> {
        Head {
            weight: self.params.at(self.plan.layout.lm_head),
            vocab: self.config.vocab_size,
            hidden: self.config.hidden_size,
            states,
            chunk: self.lm_head_chunk,
        }
    }

    /// Embeddings, blocks and the final norm: fills everything in `f` but the head outputs.
    fn trunk_forward(&self, batch: &Batch, f: &mut Forward) -> Result<()> {
        self.check_batch(batch)?;
        let cfg = &self.config;
        f.plan(cfg, batch);
        let c = cfg.hidden_size;
        let lay = &self.plan.layout;
        let emb = self.params.at(lay.embed);
        let pos_emb = lay.pos_embed.map(|i| self.params.at(i));
        let p = &f.packing;
        f.resid[0].par_chunks_mut(c).enumerate().for_each(|(r, x)| {
            let id = p.ids[r] as usize;
            x.copy_from_slice(&emb[id * c..(id + 1) * c]);
            if let Some(pe) = pos_emb {
                let t = p.pos[r];
                x.iter_mut().zip(&pe[t * c..(t + 1) * c]).for_each(|(a, &b)| *a += b);
            }
        });
        let ctx = Ctx {
            cfg,
            pos: &f.packing.pos,
            seq_start: &f.packing.seq_start,
            seq_end: &f.packing.seq_end,
            rope: f.rope.as_ref(),
        };
        for (l, blk) in lay.blocks.iter().enumerate() {
            let spec = BlockSpec::new(cfg, blk, l);
            let (before, after) = f.resid.split_at_mut(l + 1);
            block::forward(&ctx, &spec, &self.params, &before[l], &mut f.blocks[l], &mut after[0]);
        }
        let x_last = &f.resid[cfg.num_layers];
        let fnorm = lay.final_norm;
        match fnorm.bias {
            Some(b) => norm::layernorm_forward(
                x_last,
                self.params.at(fnorm.weight),
                self.params.at(b),
                cfg.norm_eps,
                &mut f.hidden,
                &mut f.final_mean,
                &mut f.final_rstd,
            ),
            None => norm::rmsnorm_forward(
                x_last,
                self.params.at(fnorm.weight),
                cfg.norm_eps,
                &mut f.hidden,
                &mut f.final_rstd,
            ),
        }
        Ok(())
    }
}
