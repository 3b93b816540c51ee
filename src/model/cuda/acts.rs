//! The activations one forward pass saves for its backward, allocated together from the
//! [`BatchPlan`](super::plan::BatchPlan) before the first kernel runs (their total is what
//! [`ActivationBytes::saved`](super::plan::ActivationBytes) counts).
//!
//! Like the CPU engine (and llm.c), the forward stores each layer's inputs to its matrix products
//! and the per-row norm statistics; the attention saves only its output and score log-sum-exp
//! (the backward recomputes the probabilities); the LM head saves the hidden states of the target
//! rows and per-row `lse`, never logits.

use crate::model::config::{Arch, ModelConfig};
use crate::ops::support::GpuElem;
use anyhow::{Context, Result};
use cudarc::driver::{CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use std::sync::Arc;

/// Zeroed device buffer of `len` elements (`len ≥ 1`), naming it if the allocation fails.
pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(s: &Arc<CudaStream>, len: usize, what: &str) -> Result<CudaSlice<T>> {
    s.alloc_zeros::<T>(len).with_context(|| {
        format!(
            "allocating {what} ({len} elements of {} bytes)",
            std::mem::size_of::<T>()
        )
    })
}

/// A norm's output and per-row statistics (`mean` only for LayerNorm).
pub struct NormActs<T> {
    /// Normalised rows `[N, C]`.
    pub out: CudaSlice<T>,
    /// Row means `[N]` (LayerNorm).
    pub mean: Option<CudaSlice<f32>>,
    /// Row `1/σ` `[N]`.
    pub rstd: CudaSlice<f32>,
}

impl<T: GpuElem> NormActs<T> {
    /// Buffers for `n` rows of width `c` (`mean` only for a LayerNorm); `what` names them in
    /// allocation errors.
    pub fn new(s: &Arc<CudaStream>, n: usize, c: usize, layer_norm: bool, what: &str) -> Result<Self> {
        Ok(NormActs {
            out: zeros(s, n * c, what)?,
            mean: if layer_norm { Some(zeros(s, n, what)?) } else { None },
            rstd: zeros(s, n, what)?,
        })
    }
}

/// What one block saves.
pub struct LayerActs<T> {
    /// First norm (`ln_1` / `input_layernorm`).
    pub n1: NormActs<T>,
    /// Queries after rotary `[N, Hq·D]`.
    pub q: CudaSlice<T>,
    /// Keys after rotary `[N, Hkv·D]`.
    pub k: CudaSlice<T>,
    /// Values `[N, Hkv·D]`.
    pub v: CudaSlice<T>,
    /// Attention output before the output projection `[N, Hq·D]`.
    pub att: CudaSlice<T>,
    /// Score log-sum-exp `[B, Hq, Tm]`.
    pub lse: CudaSlice<f32>,
    /// Residual after the attention half `[N, C]`.
    pub x_mid: CudaSlice<T>,
    /// Second norm (`ln_2` / `post_attention_layernorm`).
    pub n2: NormActs<T>,
    /// MLP pre-activation: GELU input, or the SwiGLU gate `[N, I]`.
    pub pre: CudaSlice<T>,
    /// SwiGLU up projection `[N, I]`.
    pub up: Option<CudaSlice<T>>,
    /// MLP activation fed to the down projection `[N, I]`.
    pub act: CudaSlice<T>,
}

impl<T: GpuElem> LayerActs<T> {
    /// One block's buffers for `n` rows and `lse_len` attention statistics (`B·Hq·Tm`; the
    /// decode path, which saves none, passes 1); `name` (`layer 3`) prefixes allocation errors.
    pub fn new(s: &Arc<CudaStream>, cfg: &ModelConfig, n: usize, lse_len: usize, name: &str) -> Result<Self> {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let ln = cfg.arch == Arch::Gpt2;
        let w = |what: &str| format!("{name} {what}");
        Ok(LayerActs {
            n1: NormActs::new(s, n, c, ln, &w("norm 1"))?,
            q: zeros(s, n * qd, &w("q"))?,
            k: zeros(s, n * kvd, &w("k"))?,
            v: zeros(s, n * kvd, &w("v"))?,
            att: zeros(s, n * qd, &w("attention output"))?,
            lse: zeros(s, lse_len, &w("attention lse"))?,
            x_mid: zeros(s, n * c, &w("mid residual"))?,
            n2: NormActs::new(s, n, c, ln, &w("norm 2"))?,
            pre: zeros(s, n * i, &w("MLP pre-activation"))?,
            up: if ln { None } else { Some(zeros(s, n * i, &w("MLP up"))?) },
            act: zeros(s, n * i, &w("MLP activation"))?,
        })
    }
}

/// Everything a forward saves.
pub struct Acts<T> {
    /// Residual stream entering block `l` (`resid[L]` leaves the last block), `[N, C]` each.
    pub resid: Vec<CudaSlice<T>>,
    /// Per block.
    pub layers: Vec<LayerActs<T>>,
    /// Final norm (its output is the LM head input).
    pub fin: NormActs<T>,
    /// Hidden states of the target rows `[R, C]` (the head's input, gathered once).
    pub htgt: CudaSlice<T>,
    /// Per target row: log-sum-exp of the logits.
    pub lse: CudaSlice<f32>,
    /// Per target row: log-prob of the target.
    pub logp: CudaSlice<f32>,
    /// Per target row: softmax entropy.
    pub entropy: CudaSlice<f32>,
    /// Per target row: argmax of the logits.
    pub argmax: CudaSlice<u32>,
    /// Per target row: mean logit.
    pub mean: CudaSlice<f32>,
}

impl<T: GpuElem> Acts<T> {
    /// Allocates every saved buffer for `n` rows (`B·Tm`), `r ≥ 1` target rows and `lse_len`
    /// (`B·Hq·Tm`) attention statistics per layer.
    pub fn alloc(s: &Arc<CudaStream>, cfg: &ModelConfig, n: usize, r: usize, lse_len: usize) -> Result<Self> {
        let c = cfg.hidden_size;
        let ln = cfg.arch == Arch::Gpt2;
        let resid = (0..=cfg.num_layers)
            .map(|l| zeros(s, n * c, &format!("residual stream {l}")))
            .collect::<Result<_>>()?;
        let layers = (0..cfg.num_layers)
            .map(|l| LayerActs::new(s, cfg, n, lse_len, &format!("layer {l}")))
            .collect::<Result<_>>()?;
        Ok(Acts {
            resid,
            layers,
            fin: NormActs::new(s, n, c, ln, "final norm")?,
            htgt: zeros(s, r * c, "target hidden states")?,
            lse: zeros(s, r, "head lse")?,
            logp: zeros(s, r, "head logp")?,
            entropy: zeros(s, r, "head entropy")?,
            argmax: zeros(s, r, "head argmax")?,
            mean: zeros(s, r, "head mean logit")?,
        })
    }
}
