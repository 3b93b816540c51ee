//! Hugging Face causal language models (GPT-2, Llama, Mistral, Qwen2): the backend-independent
//! definition and the CPU engine.
//!
//! - [`config`]: `config.json` → [`ModelConfig`].
//! - [`params`]: parameter names/shapes ([`ParamPlan`]) and f32 tensor stores ([`Tensors`],
//!   [`Grads`]).
//! - [`init`]: random initialisation from a config alone ([`Model::init_random`]).
//! - [`weights`] / [`save`]: safetensors in and out, in the HF layout.
//! - [`batch`]: right-padded batches and their packed (padding-free) layout.
//! - [`rope`]: rotary tables.
//! - [`cpu`]: explicit forward/backward in f32 (no autograd), with the chunked LM head, and the
//!   KV-cached incremental forward used for generation ([`KvCache`], [`Model::extend`]).
//! - [`cuda`]: the same on a GPU (cuBLAS + the layer kernels), f32 or bf16 activations.
//!
//! The per-layer math (REFERENCE.md §7), per packed token row `x` of width `C`:
//! - GPT-2 block: `a = LN₁(x)`; `q|k|v = a·W_attn + b`; `x += causal_attn(q,k,v)·W_proj + b`;
//!   `m = LN₂(x)`; `x += gelu_tanh(m·W_fc + b)·W_fc_proj + b`. Embedding `wte[id] + wpe[pos]`,
//!   final `ln_f`, head `wteᵀ`.
//! - Llama block: `a = RMS₁(x)`; `q = a·W_qᵀ (+b)`, `k`, `v` likewise (GQA); rotate `q`, `k`
//!   (`rotate_half`); `x += attn·W_oᵀ`; `m = RMS₂(x)`; `x += (silu(m·W_gᵀ) ⊙ m·W_uᵀ)·W_dᵀ`.
//!   Embedding `embed_tokens[id]`, final `norm`, head `lm_head` (or `embed_tokens` when tied).

pub mod batch;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod init;
pub mod params;
pub mod rope;
pub mod save;
pub mod weights;

pub use batch::{Batch, Packing};
pub use config::{Arch, ModelConfig};
pub use cpu::{Forward, KvCache};
pub use params::{Grads, Layout, ParamPlan, ParamSpec, Tensors};

use anyhow::{ensure, Result};
use std::path::{Path, PathBuf};

/// Default number of LM-head rows whose logits exist at once.
pub const DEFAULT_LM_HEAD_CHUNK: usize = 256;

/// A model: its configuration, its f32 parameters (on the host), and where it came from.
#[derive(Clone, Debug)]
pub struct Model {
    config: ModelConfig,
    plan: ParamPlan,
    params: Tensors,
    source_dir: Option<PathBuf>,
    lm_head_chunk: usize,
}

impl Model {
    /// Loads `dir/config.json` and the weights (`model.safetensors` or the sharded index), all
    /// converted to f32.
    pub fn load(dir: &Path) -> Result<Model> {
        let config = ModelConfig::load(dir)?;
        let plan = ParamPlan::new(&config);
        let params = weights::load_tensors(dir, &plan)?;
        Ok(Model {
            config,
            plan,
            params,
            source_dir: Some(dir.to_path_buf()),
            lm_head_chunk: DEFAULT_LM_HEAD_CHUNK,
        })
    }

    /// Builds a model from a config and parameters (names, shapes and order must be those of
    /// [`ParamPlan::new`]).
    pub fn from_parts(config: ModelConfig, params: Tensors) -> Result<Model> {
        let plan = ParamPlan::new(&config);
        ensure!(
            params.specs() == plan.specs.as_slice(),
            "parameters do not match the configuration's parameter list ({} tensors given, {} expected)",
            params.len(),
            plan.specs.len()
        );
        Ok(Model {
            config,
            plan,
            params,
            source_dir: None,
            lm_head_chunk: DEFAULT_LM_HEAD_CHUNK,
        })
    }

    /// The normalised configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Parameter indices by role.
    pub fn layout(&self) -> &Layout {
        &self.plan.layout
    }

    /// The parameters, addressable by HF name ([`Tensors::get`]) or index.
    pub fn params(&self) -> &Tensors {
        &self.params
    }

    /// Mutable parameters (optimizer updates).
    pub fn params_mut(&mut self) -> &mut Tensors {
        &mut self.params
    }

    /// A zeroed gradient store keyed like the parameters.
    pub fn new_grads(&self) -> Grads {
        Tensors::zeros_like(&self.params)
    }

    /// The directory the model was loaded from (tokenizer files are copied from it on save).
    pub fn source_dir(&self) -> Option<&Path> {
        self.source_dir.as_deref()
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

    /// Saves in the Hugging Face layout (see [`save::save_pretrained`]), copying tokenizer files
    /// from the source directory.
    pub fn save(&self, out: &Path) -> Result<()> {
        save::save_pretrained(&self.config, &self.params, self.source_dir.as_deref(), out)
    }

    /// Checks a batch against the model: ids inside the vocabulary, lengths within the learned
    /// positions (GPT-2), targets inside the vocabulary.
    pub fn check_batch(&self, batch: &Batch) -> Result<()> {
        check_batch(&self.config, batch)
    }
}

/// [`Model::check_batch`] for any engine holding `cfg` (the CUDA engine keeps no host model).
pub(crate) fn check_batch(cfg: &ModelConfig, batch: &Batch) -> Result<()> {
    let v = cfg.vocab_size;
    for (b, &len) in batch.lengths().iter().enumerate() {
        for t in 0..len {
            let id = batch.ids()[b * batch.seq() + t];
            ensure!(
                (id as usize) < v,
                "input_ids[{b},{t}] = {id} is outside the vocabulary [0, {v})"
            );
        }
    }
    if let Some((i, &t)) = batch.targets().iter().enumerate().find(|(_, &t)| t >= v as i64) {
        anyhow::bail!(
            "targets[{},{}] = {t} is outside the vocabulary [0, {v})",
            i / batch.seq(),
            i % batch.seq()
        );
    }
    if cfg.arch == Arch::Gpt2 {
        ensure!(
            batch.max_len() <= cfg.max_positions,
            "a row has {} tokens but the model has {} learned positions (n_positions)",
            batch.max_len(),
            cfg.max_positions
        );
    }
    Ok(())
}
