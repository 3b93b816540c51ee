//! Incremental (KV-cached) forward for generation on the CUDA engine: the GPU twin of the CPU
//! engine's `decode.rs`, behind the same [`Decoder`] seam, so [`crate::generate::generate`]
//! samples from either engine with the same code (sampling itself stays on the host: one row of
//! logits per sequence and step is small).
//!
//! [`CudaKvCache`] holds, per layer, the rotated keys and the values of every token seen so far
//! (`[B·cap, Hkv·D]` each, in the activation precision) and every buffer a call needs, all
//! allocated when the cache is made — sized from the batch, the capacity and the rows per pass,
//! after a check against the free GPU memory — so sampling allocates nothing per step.
//! [`CudaModel::extend`] appends tokens in three stages:
//!
//! 1. on the host, each new row's sequence, position (cache length + offset), cache slot and token
//!    id, all validated (capacity, vocabulary) before any device work, so an error leaves the
//!    cache as it was;
//! 2. per pass of at most `rows` rows: the embeddings, then every block through
//!    [`block::forward_cached`] (the training block's norm / q·k·v / rotary / o-proj / MLP steps,
//!    with the new keys and values scattered into their slots and the attention read from the
//!    cache), and the residual of each sequence's last new row gathered aside. Rows stay in
//!    sequence order and a pass runs every layer before the next starts, so every key a row needs
//!    was written by its own pass or an earlier one: a long prefill simply takes several passes;
//! 3. the final norm and the head GEMM for those last rows only, as f32 logits `[n, V]` (cuBLAS
//!    writes f32 from bf16 operands, so bf16 logits are not rounded), copied to the host.

use super::acts::{zeros, LayerActs, NormActs};
use super::block::{self, BlockSpec, CachedRows, LayerCache};
use super::head;
use super::plan::ActivationBytes;
use super::precision::{Act, Precision};
use super::CudaModel;
use crate::generate::Decoder;
use crate::model::config::{Arch, ModelConfig};
use crate::ops::attention::check_decode_rows;
use crate::ops::{embedding, rows};
use anyhow::{bail, ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use std::sync::Arc;

/// Default rows per decoding pass: a prefill of more new tokens than this runs in several passes,
/// which bounds the per-call working set (a Llama-1B-sized pass of 1024 rows is ~80 MB in bf16)
/// whatever the batch and prompt lengths, while keeping the block GEMMs large enough to be fast.
pub const DEFAULT_CUDA_DECODE_ROWS: usize = 1024;

/// Keys and values of every layer on the GPU for `batch` sequences of at most `capacity` tokens
/// each, plus the working buffers of [`CudaModel::extend`]. Made by [`CudaModel::new_kv_cache`]
/// and usable only with the model that made it.
pub struct CudaKvCache {
    model_id: usize,
    capacity: usize,
    rows: usize,
    lens: Vec<usize>,
    bufs: CacheBufs,
}

impl std::fmt::Debug for CudaKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache")
            .field("capacity", &self.capacity)
            .field("rows_per_pass", &self.rows)
            .field("lens", &self.lens)
            .finish()
    }
}

impl CudaKvCache {
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
    /// New rows one pass of [`CudaModel::extend`] processes at most.
    pub fn rows_per_pass(&self) -> usize {
        self.rows
    }
}

/// The device buffers in the model's activation precision.
enum CacheBufs {
    F32(DecodeBufs<f32>),
    Bf16(DecodeBufs<bf16>),
}

/// Everything one cache owns on the device. `rows` = rows per pass, `out` = `max(B, 1)` (one
/// logits row per sequence at most).
struct DecodeBufs<T> {
    /// Per layer: the cache itself.
    layers: Vec<LayerCache<T>>,
    /// Residual stream ping-pong `[rows, C]`.
    x: [CudaSlice<T>; 2],
    /// One block's working set `[rows, ·]`, shared by every layer (nothing is kept for a backward).
    scratch: LayerActs<T>,
    /// Per pass row: token id, position, sequence, cache slot `[rows]`.
    ids: CudaSlice<u32>,
    pos: CudaSlice<u32>,
    seq: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    /// Rows of a pass that are some sequence's last new row `[out]`.
    last: CudaSlice<u32>,
    /// Residual of each sequence's last new row `[out, C]`.
    hlast: CudaSlice<T>,
    /// Their final norm `[out, C]`.
    fin: NormActs<T>,
    /// Their logits `[out, V]`.
    logits: CudaSlice<f32>,
}

/// Bytes [`DecodeBufs::alloc`] allocates for `slots` cache slots (`B·cap`, at least 1), `rows`
/// rows per pass and `out` logits rows — the same buffers, counted before any is allocated.
fn decode_bytes(cfg: &ModelConfig, precision: Precision, slots: usize, rows: usize, out: usize) -> usize {
    let a = precision.act_bytes();
    let (c, i, v, l) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers);
    let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
    let ln = usize::from(cfg.arch == Arch::Gpt2);
    let swiglu = usize::from(cfg.arch == Arch::Llama);
    let norm = |n: usize| a * n * c + 4 * n * (1 + ln); // output, rstd (+ mean)
    let cache = l * 2 * a * slots * kvd;
    let scratch = 2 * norm(rows) + a * rows * (qd + 2 * kvd + qd + c + i + swiglu * i + i) + 4;
    let resid = 2 * a * rows * c;
    let index = 4 * (4 * rows + out);
    let head = a * out * c + norm(out) + 4 * out * v;
    cache + scratch + resid + index + head
}

impl<T: Act> DecodeBufs<T> {
    fn alloc(s: &Arc<CudaStream>, cfg: &ModelConfig, slots: usize, rows: usize, out: usize) -> Result<Self> {
        let (c, kvd) = (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim);
        let ln = cfg.arch == Arch::Gpt2;
        let layers = (0..cfg.num_layers)
            .map(|l| {
                Ok(LayerCache {
                    k: zeros(s, slots * kvd, &format!("layer {l} key cache"))?,
                    v: zeros(s, slots * kvd, &format!("layer {l} value cache"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(DecodeBufs {
            layers,
            x: [
                zeros(s, rows * c, "decode residual stream")?,
                zeros(s, rows * c, "decode residual stream")?,
            ],
            scratch: LayerActs::new(s, cfg, rows, 1, "decode block")?,
            ids: zeros(s, rows, "decode token ids")?,
            pos: zeros(s, rows, "decode positions")?,
            seq: zeros(s, rows, "decode sequence ids")?,
            slots: zeros(s, rows, "decode cache slots")?,
            last: zeros(s, out, "decode last-row indices")?,
            hlast: zeros(s, out * c, "decode last-row hidden states")?,
            fin: NormActs::new(s, out, c, ln, "decode final norm")?,
            logits: zeros(s, out * cfg.vocab_size, "decode logits")?,
        })
    }
}

/// The new rows of one [`CudaModel::extend`] call, laid out on the host in sequence order.
#[derive(Default)]
struct StepRows {
    ids: Vec<u32>,
    pos: Vec<u32>,
    seq: Vec<u32>,
    slots: Vec<u32>,
    /// Row of the last new token of each sequence that received tokens, ascending.
    last: Vec<usize>,
}

impl CudaModel {
    /// Rows one decoding pass processes at most (see [`DEFAULT_CUDA_DECODE_ROWS`]); caches made
    /// from now on use it.
    pub fn decode_rows(&self) -> usize {
        self.decode_rows
    }

    /// Sets the rows per decoding pass for caches made from now on; 0 is rejected.
    pub fn set_decode_rows(&mut self, rows: usize) -> Result<()> {
        ensure!(rows > 0, "decode rows per pass must be at least 1");
        self.decode_rows = rows;
        Ok(())
    }

    /// An empty cache for `batch` sequences of up to `capacity` tokens (prompt + generated), with
    /// every buffer sampling needs, after checking the total against the free GPU memory. GPT-2
    /// models cannot go past their learned positions, so a larger capacity is an error.
    pub fn new_kv_cache(&self, batch: usize, capacity: usize) -> Result<CudaKvCache> {
        let cfg = &self.config;
        ensure!(capacity > 0, "KV cache: capacity must be at least 1 token");
        if cfg.arch == Arch::Gpt2 {
            ensure!(
                capacity <= cfg.max_positions,
                "KV cache: {capacity} tokens exceed the model's {} learned positions (n_positions)",
                cfg.max_positions
            );
        }
        let slots = batch
            .checked_mul(capacity)
            .filter(|&s| s <= i32::MAX as usize)
            .with_context(|| {
                format!("KV cache: {batch} sequences × {capacity} tokens exceed the kernels' i32 slot index range")
            })?;
        // Zero sequences still get one-element buffers (CUDA has no empty allocations); no call
        // ever reaches them.
        let (slots, out) = (slots.max(1), batch.max(1));
        let rows = slots.min(self.decode_rows);
        let bytes = decode_bytes(cfg, self.precision, slots, rows, out);
        ActivationBytes::ensure_fits(
            &self.dev,
            bytes,
            &format!("the KV cache for {batch} sequences × {capacity} tokens"),
        )?;
        let s = self.dev.stream();
        let bufs = match self.precision {
            Precision::F32 => CacheBufs::F32(DecodeBufs::alloc(s, cfg, slots, rows, out)?),
            Precision::Bf16 => CacheBufs::Bf16(DecodeBufs::alloc(s, cfg, slots, rows, out)?),
        };
        Ok(CudaKvCache {
            model_id: self.id,
            capacity,
            rows,
            lens: vec![0; batch],
            bufs,
        })
    }

    /// Appends `tokens[b]` to sequence `b` of the cache (an empty slice leaves it as it is) and
    /// returns, for each sequence that received tokens, in order, the logits `[V]` that predict
    /// the token after its last new one — `[n, V]` row-major f32 for `n` non-empty slices, the
    /// contract of the CPU engine's `Model::extend`.
    pub fn extend(&self, cache: &mut CudaKvCache, tokens: &[&[u32]]) -> Result<Vec<f32>> {
        let cfg = &self.config;
        ensure!(
            cache.model_id == self.id,
            "KV cache: made by another CudaModel (a cache holds one model's keys and values)"
        );
        ensure!(
            tokens.len() == cache.batch(),
            "tokens: {} sequences given, the cache holds {}",
            tokens.len(),
            cache.batch()
        );
        let cap = cache.capacity;
        let mut st = StepRows::default();
        for (b, new) in tokens.iter().enumerate() {
            let start = cache.lens[b];
            if start + new.len() > cap {
                bail!(
                    "sequence {b}: {} tokens would exceed the KV cache capacity of {cap}",
                    start + new.len()
                );
            }
            for (i, &id) in new.iter().enumerate() {
                ensure!(
                    (id as usize) < cfg.vocab_size,
                    "token {id} of sequence {b} is outside the vocabulary [0, {})",
                    cfg.vocab_size
                );
                let t = start + i;
                st.ids.push(id);
                st.pos.push(t as u32);
                st.seq.push(b as u32);
                // In range and distinct (what the scatter requires): t < cap, and each sequence
                // contributes one run of distinct positions.
                st.slots.push((b * cap + t) as u32);
            }
            if !new.is_empty() {
                st.last.push(st.ids.len() - 1);
            }
        }
        // The decode kernel's contract (true by construction here, and cheap to state).
        check_decode_rows(cache.batch(), cap, &st.seq, &st.pos)?;
        if st.last.is_empty() {
            return Ok(Vec::new());
        }
        let (batch, rows) = (cache.batch(), cache.rows);
        let logits = match &mut cache.bufs {
            CacheBufs::F32(b) => self.extend_on(b, batch, cap, rows, &st),
            CacheBufs::Bf16(b) => self.extend_on(b, batch, cap, rows, &st),
        }?;
        for (len, new) in cache.lens.iter_mut().zip(tokens) {
            *len += new.len();
        }
        Ok(logits)
    }

    /// Stages 2 and 3 of [`CudaModel::extend`] on the buffers of one precision.
    fn extend_on<T: Act>(
        &self,
        b: &mut DecodeBufs<T>,
        batch: usize,
        capacity: usize,
        rows_per_pass: usize,
        st: &StepRows,
    ) -> Result<Vec<f32>> {
        let ctx = self.ctx();
        let cfg = &self.config;
        let lay = &self.plan.layout;
        let s = self.dev.stream();
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let n = st.ids.len();
        let wte = self.weights.master[lay.embed].as_view();
        let wpe = lay.pos_embed.map(|i| self.weights.master[i].as_view());
        let mut gathered = 0;
        for r0 in (0..n).step_by(rows_per_pass) {
            let r1 = (r0 + rows_per_pass).min(n);
            let m = r1 - r0;
            for (host, dev, what) in [
                (&st.ids, &mut b.ids, "token ids"),
                (&st.pos, &mut b.pos, "positions"),
                (&st.seq, &mut b.seq, "sequence ids"),
                (&st.slots, &mut b.slots, "cache slots"),
            ] {
                s.memcpy_htod(&host[r0..r1], &mut dev.slice_mut(0..m))
                    .with_context(|| format!("uploading the decode {what}"))?;
            }
            let [xa, xb] = &mut b.x;
            let pos = b.pos.slice(0..m);
            embedding::forward_cuda(
                &self.dev,
                &b.ids.slice(0..m),
                &wte,
                wpe.as_ref().map(|w| (&pos, w)),
                c,
                &mut xa.slice_mut(0..m * c),
            )
            .context("decode embedding")?;
            let at = CachedRows {
                seq: b.seq.slice(0..m),
                pos: b.pos.slice(0..m),
                slots: b.slots.slice(0..m),
                batch,
                capacity,
            };
            let (mut cur, mut nxt) = (xa, xb);
            for (l, blk) in lay.blocks.iter().enumerate() {
                let spec = BlockSpec::new(cfg, blk, l);
                block::forward_cached(
                    &ctx,
                    &spec,
                    &at,
                    &mut b.layers[l],
                    &cur.slice(0..m * c),
                    &mut b.scratch,
                    &mut nxt.slice_mut(0..m * c),
                )
                .with_context(|| format!("decode layer {l}"))?;
                std::mem::swap(&mut cur, &mut nxt);
            }
            // `cur` now leaves the last block; keep the rows some sequence's logits need.
            let first = gathered;
            while gathered < st.last.len() && st.last[gathered] < r1 {
                gathered += 1;
            }
            if gathered > first {
                let local: Vec<u32> = st.last[first..gathered].iter().map(|&r| (r - r0) as u32).collect();
                let k = local.len();
                s.memcpy_htod(&local, &mut b.last.slice_mut(0..k))
                    .context("uploading the decode last-row indices")?;
                rows::gather_cuda(
                    &self.dev,
                    &cur.slice(0..m * c),
                    &b.last.slice(0..k),
                    c,
                    &mut b.hlast.slice_mut(first * c..gathered * c),
                )?;
            }
        }
        let k = st.last.len();
        block::norm_forward(&ctx, lay.final_norm, &b.hlast.slice(0..k * c), k, &mut b.fin).context("final norm")?;
        head::logits_into(
            &ctx,
            &self.head_spec(),
            "LM head (decode)",
            &b.fin.out.slice(0..k * c),
            k,
            &mut b.logits.slice_mut(0..k * v),
        )?;
        s.clone_dtoh(&b.logits.slice(0..k * v))
            .context("copying the decode logits to the host")
    }
}

impl Decoder for CudaModel {
    type Cache = CudaKvCache;
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn new_cache(&self, batch: usize, capacity: usize) -> Result<CudaKvCache> {
        self.new_kv_cache(batch, capacity)
    }
    fn extend(&self, cache: &mut CudaKvCache, tokens: &[&[u32]]) -> Result<Vec<f32>> {
        CudaModel::extend(self, cache, tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use std::path::PathBuf;

    fn tiny(name: &str) -> ModelConfig {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/fixtures/models")
            .join(name);
        Model::load(&dir).unwrap().config().clone()
    }

    /// The memory plan of a tiny GPT-2 (C 64, 2 layers, MHA 4×16, I 256, V 50257) and a tiny
    /// Llama (GQA 4/2×16, I 176), counted by hand from the buffers `DecodeBufs::alloc` makes.
    #[test]
    fn decode_memory_plan_counts_every_buffer() {
        let g = tiny("tiny-gpt2");
        assert_eq!((g.hidden_size, g.intermediate_size, g.num_layers), (64, 256, 2));
        let (slots, rows, out) = (2 * 16, 32, 2);
        let cache = 2 * 2 * 4 * slots * 64;
        let norm = |n: usize, ln: usize| 4 * n * 64 + 4 * n * (1 + ln);
        let scratch = 2 * norm(rows, 1) + 4 * rows * (64 + 128 + 64 + 64 + 256 + 256) + 4;
        let rest = 2 * 4 * rows * 64 + 4 * (4 * rows + out) + 4 * out * 64 + norm(out, 1) + 4 * out * 50257;
        assert_eq!(
            decode_bytes(&g, Precision::F32, slots, rows, out),
            cache + scratch + rest
        );
        let l = tiny("tiny-llama");
        assert_eq!((l.intermediate_size, l.num_kv_heads * l.head_dim), (176, 32));
        let norm = |n: usize| 2 * n * 64 + 4 * n;
        let cache = 2 * 2 * 2 * slots * 32;
        let scratch = 2 * norm(rows) + 2 * rows * (64 + 64 + 64 + 64 + 3 * 176) + 4;
        let rest = 2 * 2 * rows * 64 + 4 * (4 * rows + out) + 2 * out * 64 + norm(out) + 4 * out * 50257;
        assert_eq!(
            decode_bytes(&l, Precision::Bf16, slots, rows, out),
            cache + scratch + rest
        );
    }
}
