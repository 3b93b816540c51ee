//! The CUDA transformer engine: the same models, semantics and two-phase API as the CPU engine
//! ([`crate::model::cpu`]), with cuBLAS for every matrix product and the layer kernels of
//! [`crate::ops`] for everything else.
//!
//! - [`precision`]: f32 or bf16 activations; fp32 master weights, gradients and moments always.
//! - [`weights`]: parameters on the device (and their bf16 copies).
//! - [`gemm`]: the one cuBLAS entry point, in row-major terms.
//! - [`plan`]: a batch laid out for the kernels (right padding trimmed to the longest row) and
//!   its memory plan, computed before anything is allocated.
//! - [`acts`]: the activations a forward saves.
//! - [`block`]: one transformer block, forward and backward.
//! - [`head`]: the chunked LM head (logits never exist for the whole batch).
//! - `forward.rs`, `backward.rs`, `optim.rs`: the passes, and gradients/AdamW on the device.
//! - [`decode`]: the KV cache and incremental forward that sampling runs on
//!   ([`crate::generate::Decoder`]).
//!
//! Like the CPU engine, [`CudaModel::forward`] returns per-token outputs on the host (in the
//! caller's `[B, T]` layout) plus the saved device state, and [`CudaModel::backward`] takes
//! host `dlogp[B, T]` and *adds* parameter gradients into the fp32 gradient buffers.
//!
//! Restrictions (checked with plain errors, never a panic): `head_dim ≤ 128`; the attention
//! scale must be `1/√head_dim` (no GPT-2 `scale_attn_weights = false` or
//! `scale_attn_by_inverse_layer_idx`); a sliding window must not be shorter than the batch's
//! longest row (the training kernels have no window mask; decoding applies windows); `batch ×
//! heads ≤ 65535`.

pub mod acts;
mod backward;
pub mod block;
pub mod decode;
mod forward;
pub mod gemm;
pub mod head;
mod optim;
pub mod plan;
pub mod precision;
pub mod weights;

pub use decode::{CudaKvCache, DEFAULT_CUDA_DECODE_ROWS};
pub use optim::Moments;
pub use precision::Precision;

use super::config::ModelConfig;
use super::params::{ParamPlan, ParamSpec, Tensors};
use super::Model;
use crate::device::CudaDevice;
use crate::ops::attention::{AttnShape, CUDA_MAX_HEAD_DIM};
use acts::Acts;
use anyhow::{ensure, Context, Result};
use cudarc::driver::CudaSlice;
use gemm::Blas;
use half::bf16;
use plan::{BatchPlan, DeviceBatch};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use weights::DeviceWeights;

/// Default rows of logits per LM-head chunk on the GPU: large enough that the head GEMMs keep
/// the tensor cores busy, small enough that a 128k vocabulary costs 256 MB (bf16) per chunk.
pub const DEFAULT_CUDA_LM_HEAD_CHUNK: usize = 1024;

static NEXT_ID: AtomicUsize = AtomicUsize::new(1);

/// A model resident on one GPU: fp32 master weights (plus bf16 copies in bf16 mode), lazily
/// allocated fp32 gradients, cuBLAS, and the rotary table.
pub struct CudaModel {
    id: usize,
    config: ModelConfig,
    plan: ParamPlan,
    source_dir: Option<PathBuf>,
    dev: Arc<CudaDevice>,
    blas: Blas,
    precision: Precision,
    weights: DeviceWeights,
    grads: Option<Vec<CudaSlice<f32>>>,
    inv_freq: Option<CudaSlice<f32>>,
    lm_head_chunk: usize,
    decode_rows: usize,
}

impl std::fmt::Debug for CudaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaModel")
            .field("model_type", &self.config.model_type)
            .field("device", &self.dev)
            .field("precision", &self.precision)
            .field("lm_head_chunk", &self.lm_head_chunk)
            .finish()
    }
}

/// Fails unless the CUDA kernels implement this configuration exactly.
fn check_supported(cfg: &ModelConfig) -> Result<()> {
    ensure!(
        cfg.head_dim <= CUDA_MAX_HEAD_DIM,
        "head_dim {} exceeds the CUDA attention kernels' {CUDA_MAX_HEAD_DIM}",
        cfg.head_dim
    );
    let want = AttnShape {
        batch: 1,
        seq: 1,
        heads_q: 1,
        heads_kv: 1,
        head_dim: cfg.head_dim,
    }
    .scale();
    ensure!(
        (cfg.attn_scale - want).abs() <= 1e-6 * want,
        "the CUDA attention kernels scale scores by 1/sqrt(head_dim) = {want}; this config asks for {} \
         (gpt2 scale_attn_weights = false is not supported on CUDA)",
        cfg.attn_scale
    );
    ensure!(
        !cfg.scale_attn_by_inverse_layer_idx,
        "gpt2 scale_attn_by_inverse_layer_idx is not supported by the CUDA attention kernels"
    );
    Ok(())
}

impl CudaModel {
    /// Uploads `model` to CUDA device `ordinal` in `precision`. Fails plainly (no panic) when
    /// the device, its driver, the embedded kernels or cuBLAS are unavailable, or when the
    /// configuration needs something the kernels do not implement.
    pub fn new(model: &Model, ordinal: usize, precision: Precision) -> Result<CudaModel> {
        let cfg = model.config().clone();
        check_supported(&cfg).with_context(|| format!("{} on CUDA", cfg.model_type))?;
        let dev = CudaDevice::get(ordinal)?;
        let blas = Blas::new(dev.clone())?;
        let plan = ParamPlan::new(&cfg);
        let weights = DeviceWeights::upload(&dev, model.params(), &plan.layout, precision)
            .with_context(|| format!("uploading the model to cuda:{ordinal}"))?;
        let inv_freq = match &cfg.rope {
            Some(r) => Some(
                dev.stream()
                    .clone_htod(&super::rope::inv_freq(r, cfg.head_dim))
                    .context("uploading the rotary table")?,
            ),
            None => None,
        };
        Ok(CudaModel {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            config: cfg,
            plan,
            source_dir: model.source_dir().map(Path::to_path_buf),
            dev,
            blas,
            precision,
            weights,
            grads: None,
            inv_freq,
            lm_head_chunk: DEFAULT_CUDA_LM_HEAD_CHUNK,
            decode_rows: DEFAULT_CUDA_DECODE_ROWS,
        })
    }

    /// Loads `dir` (see [`Model::load`]) and uploads it; the host copy is dropped.
    pub fn load(dir: &Path, ordinal: usize, precision: Precision) -> Result<CudaModel> {
        let model = Model::load(dir)?;
        CudaModel::new(&model, ordinal, precision)
    }

    /// The normalised configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The activation precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The GPU the model lives on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The parameter list (names and shapes, HF order).
    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.plan.specs
    }

    /// Rows of logits materialised at once by the chunked LM head.
    pub fn lm_head_chunk(&self) -> usize {
        self.lm_head_chunk
    }

    /// Sets the LM-head chunk (rows); 0 is rejected.
    pub fn set_lm_head_chunk(&mut self, rows: usize) -> Result<()> {
        ensure!(rows > 0, "lm_head chunk must be at least 1 row");
        self.lm_head_chunk = rows;
        Ok(())
    }

    /// The fp32 master weights, copied to the host.
    pub fn params_to_host(&self) -> Result<Tensors> {
        self.weights.download(&self.dev, &self.plan.specs)
    }

    /// Saves the current weights in the Hugging Face layout (see
    /// [`save_pretrained`](super::save::save_pretrained)), copying tokenizer files from the
    /// directory the model was loaded from.
    pub fn save(&self, out: &Path) -> Result<()> {
        let params = self.params_to_host()?;
        super::save::save_pretrained(&self.config, &params, self.source_dir.as_deref(), out)
    }

    fn ctx(&self) -> block::Ctx<'_> {
        block::Ctx {
            dev: &self.dev,
            blas: &self.blas,
            cfg: &self.config,
            w: &self.weights,
            inv_freq: self.inv_freq.as_ref(),
        }
    }

    fn head_spec(&self) -> head::HeadSpec {
        head::HeadSpec {
            vocab: self.config.vocab_size,
            hidden: self.config.hidden_size,
            weight: self.plan.layout.lm_head,
            chunk: self.lm_head_chunk,
        }
    }
}

/// The saved activations in the model's precision.
enum Saved {
    F32(Acts<f32>),
    Bf16(Acts<bf16>),
}

/// Device state a forward keeps for its backward.
struct State {
    db: DeviceBatch,
    acts: Saved,
}

/// One CUDA forward pass: per-token outputs on the host (`[B, T]`, 0 where there is no target)
/// and the saved device state its backward needs (none when the batch has no target).
pub struct CudaForward {
    model_id: usize,
    plan: BatchPlan,
    logp: Vec<f32>,
    lse: Vec<f32>,
    entropy: Vec<f32>,
    argmax: Vec<u32>,
    logit_mean: Vec<f32>,
    state: Option<State>,
}

impl CudaForward {
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
    /// Argmax of the logits per position with a target, `[B, T]`; 0 elsewhere.
    pub fn argmax(&self) -> &[u32] {
        &self.argmax
    }
    /// Mean logit over the vocabulary per position with a target, `[B, T]`; 0 elsewhere.
    pub fn logit_mean(&self) -> &[f32] {
        &self.logit_mean
    }
    /// Batch rows `B`.
    pub fn batch(&self) -> usize {
        self.plan.batch
    }
    /// Padded length `T`.
    pub fn seq(&self) -> usize {
        self.plan.seq
    }
    /// Number of positions with a target.
    pub fn num_targets(&self) -> usize {
        self.plan.num_targets()
    }
    /// Per-row sums of `logp` (accumulated in f64), length `B`.
    pub fn sequence_logps(&self) -> Vec<f64> {
        let t = self.plan.seq;
        (0..self.plan.batch)
            .map(|b| self.logp[b * t..(b + 1) * t].iter().map(|&x| x as f64).sum())
            .collect()
    }
}
