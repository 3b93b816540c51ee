//! Incremental (KV-cached) forward for generation on the CPU engine.
//!
//! Training runs whole sequences through [`Model::forward`]; sampling instead appends a few tokens
//! at a time to many sequences, so each layer keeps the rotated keys and values of every token
//! seen so far ([`KvCache`]) and only the new rows go through the block (the same block code as
//! training, with the attention step reading the cache). The logits it returns equal those of a
//! full forward over the same prefix (tested against [`Model::forward_logits`]).

use super::attention::CachedRows;
use super::block::{self, BlockActs, BlockSpec, Ctx, LayerCache};
use super::norm;
use crate::model::config::{Arch, ModelConfig};
use crate::model::rope::RopeTable;
use crate::model::Model;
use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

/// Keys and values of every layer for `batch` sequences of at most `capacity` tokens each.
#[derive(Clone, Debug)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    capacity: usize,
    lens: Vec<usize>,
    rope: Option<RopeTable>,
    scratch: BlockActs,
}

impl KvCache {
    /// Sequences in the cache.
    pub fn batch(&self) -> usize {
        self.lens.len()
    }
    /// Tokens each sequence may hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
    /// Tokens cached so far per sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }
}

impl Model {
    /// An empty cache for `batch` sequences of up to `capacity` tokens (prompt + generated).
    /// GPT-2 models cannot go past their learned positions, so a larger capacity is an error.
    pub fn new_kv_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        let cfg = self.config();
        ensure!(capacity > 0, "KV cache: capacity must be at least 1 token");
        if cfg.arch == Arch::Gpt2 {
            ensure!(
                capacity <= cfg.max_positions,
                "KV cache: {capacity} tokens exceed the model's {} learned positions (n_positions)",
                cfg.max_positions
            );
        }
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let layer = LayerCache {
            k: vec![0.0; batch * capacity * kvd],
            v: vec![0.0; batch * capacity * kvd],
        };
        Ok(KvCache {
            layers: vec![layer; cfg.num_layers],
            capacity,
            lens: vec![0; batch],
            rope: cfg.rope.as_ref().map(|r| RopeTable::new(r, cfg.head_dim, capacity)),
            scratch: BlockActs::default(),
        })
    }

    /// Appends `tokens[b]` to sequence `b` of the cache (an empty slice leaves it as it is) and
    /// returns, for each sequence that received tokens, in order, the logits `[V]` that predict
    /// the token after its last new one — `[n, V]` row-major for `n` non-empty slices.
    pub fn extend(&self, cache: &mut KvCache, tokens: &[&[u32]]) -> Result<Vec<f32>> {
        let cfg = self.config();
        ensure!(
            tokens.len() == cache.batch(),
            "tokens: {} sequences given, the cache holds {}",
            tokens.len(),
            cache.batch()
        );
        ensure!(
            cache.layers.len() == cfg.num_layers,
            "KV cache: not made by this model ({} layers, the model has {})",
            cache.layers.len(),
            cfg.num_layers
        );
        let (mut seq, mut pos, mut ids, mut last) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (b, new) in tokens.iter().enumerate() {
            let start = cache.lens[b];
            if start + new.len() > cache.capacity {
                bail!(
                    "sequence {b}: {} tokens would exceed the KV cache capacity of {}",
                    start + new.len(),
                    cache.capacity
                );
            }
            for (i, &id) in new.iter().enumerate() {
                ensure!(
                    (id as usize) < cfg.vocab_size,
                    "token {id} of sequence {b} is outside the vocabulary [0, {})",
                    cfg.vocab_size
                );
                seq.push(b);
                pos.push(start + i);
                ids.push(id);
            }
            if !new.is_empty() {
                last.push(ids.len() - 1);
            }
        }
        let x = self.cached_trunk(cache, &seq, &pos, &ids);
        for (b, new) in tokens.iter().enumerate() {
            cache.lens[b] += new.len();
        }
        let hidden = self.final_norm_rows(&x, &last);
        let rows: Vec<usize> = (0..last.len()).collect();
        Ok(self.head(&hidden).full_logits(&rows))
    }

    /// Embeddings and every block for the new rows, writing their keys/values into the cache;
    /// returns the residual stream leaving the last block `[rows, C]`.
    fn cached_trunk(&self, cache: &mut KvCache, seq: &[usize], pos: &[usize], ids: &[u32]) -> Vec<f32> {
        let cfg: &ModelConfig = self.config();
        let (n, c) = (ids.len(), cfg.hidden_size);
        let lay = self.layout();
        let emb = self.params().at(lay.embed);
        let pos_emb = lay.pos_embed.map(|i| self.params().at(i));
        let mut x = vec![0f32; n * c];
        x.par_chunks_mut(c).enumerate().for_each(|(r, row)| {
            let id = ids[r] as usize;
            row.copy_from_slice(&emb[id * c..(id + 1) * c]);
            if let Some(pe) = pos_emb {
                row.iter_mut()
                    .zip(&pe[pos[r] * c..(pos[r] + 1) * c])
                    .for_each(|(a, &b)| *a += b);
            }
        });
        let ctx = Ctx {
            cfg,
            pos,
            seq_start: &[],
            seq_end: &[],
            rope: cache.rope.as_ref(),
        };
        let rows = CachedRows {
            seq,
            pos,
            cap: cache.capacity,
        };
        let mut y = vec![0f32; n * c];
        cache.scratch.plan(cfg, n);
        for (l, blk) in lay.blocks.iter().enumerate() {
            let spec = BlockSpec::new(cfg, blk, l);
            let (layers, scratch) = (&mut cache.layers, &mut cache.scratch);
            block::forward_cached(&ctx, &spec, self.params(), &x, &rows, &mut layers[l], scratch, &mut y);
            std::mem::swap(&mut x, &mut y);
        }
        x
    }

    /// The final norm applied to the listed rows of `x` only (the rows whose logits are needed).
    fn final_norm_rows(&self, x: &[f32], rows: &[usize]) -> Vec<f32> {
        let c = self.config().hidden_size;
        let picked: Vec<f32> = rows
            .iter()
            .flat_map(|&r| x[r * c..(r + 1) * c].iter().copied())
            .collect();
        let m = rows.len();
        let mut out = vec![0f32; m * c];
        let mut rstd = vec![0f32; m];
        let fnorm = self.layout().final_norm;
        let (w, eps) = (self.params().at(fnorm.weight), self.config().norm_eps);
        match fnorm.bias {
            Some(b) => {
                let mut mean = vec![0f32; m];
                norm::layernorm_forward(&picked, w, self.params().at(b), eps, &mut out, &mut mean, &mut rstd)
            }
            None => norm::rmsnorm_forward(&picked, w, eps, &mut out, &mut rstd),
        }
        out
    }
}
