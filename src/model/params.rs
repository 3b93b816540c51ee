//! The parameter set a config implies: every tensor's Hugging Face name and shape, in a fixed
//! order, plus a [`Layout`] of indices so backends address tensors without string lookups.
//!
//! This is the backend-independent model definition: the CPU engine and any GPU engine iterate the
//! same [`ParamSpec`] list, so gradients, optimizer states and checkpoints line up by index.

use super::config::{Arch, ModelConfig};
use anyhow::{Context, Result};
use std::collections::HashMap;

/// One named tensor of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    /// Hugging Face state-dict name (e.g. `model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Row-major shape exactly as stored in the checkpoint.
    pub shape: Vec<usize>,
}

impl ParamSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A normalisation layer's parameters (index into the parameter list).
#[derive(Clone, Copy, Debug)]
pub struct NormIdx {
    /// Scale γ, shape `[C]`.
    pub weight: usize,
    /// Shift β (LayerNorm only), shape `[C]`.
    pub bias: Option<usize>,
}

/// A linear map's parameters. GPT-2 `Conv1D` weights are `[in, out]`, `nn.Linear` ones
/// `[out, in]`; the layer code knows which.
#[derive(Clone, Copy, Debug)]
pub struct LinearIdx {
    /// The weight matrix.
    pub weight: usize,
    /// The bias `[out]`, when the layer has one.
    pub bias: Option<usize>,
}

/// One GPT-2 block: `x += c_proj(attn(ln_1(x)))`, `x += mlp_c_proj(gelu(c_fc(ln_2(x))))`.
#[derive(Clone, Copy, Debug)]
pub struct Gpt2Block {
    /// `ln_1` (LayerNorm).
    pub ln_1: NormIdx,
    /// Fused q/k/v projection `[C, 3C]`, columns `[q | k | v]`.
    pub c_attn: LinearIdx,
    /// Attention output projection `[C, C]`.
    pub attn_c_proj: LinearIdx,
    /// `ln_2` (LayerNorm).
    pub ln_2: NormIdx,
    /// MLP up projection `[C, I]`.
    pub c_fc: LinearIdx,
    /// MLP down projection `[I, C]`.
    pub mlp_c_proj: LinearIdx,
}

/// One Llama-family block: `x += o(attn(rope(q,k), v))` on `input_layernorm(x)`,
/// `x += down(silu(gate(m)) * up(m))` on `m = post_attention_layernorm(x)`.
#[derive(Clone, Copy, Debug)]
pub struct LlamaBlock {
    /// `input_layernorm` (RMSNorm).
    pub input_norm: NormIdx,
    /// `q_proj` `[H·d, C]`.
    pub q: LinearIdx,
    /// `k_proj` `[KvH·d, C]`.
    pub k: LinearIdx,
    /// `v_proj` `[KvH·d, C]`.
    pub v: LinearIdx,
    /// `o_proj` `[C, H·d]`.
    pub o: LinearIdx,
    /// `post_attention_layernorm` (RMSNorm).
    pub post_norm: NormIdx,
    /// `gate_proj` `[I, C]`.
    pub gate: LinearIdx,
    /// `up_proj` `[I, C]`.
    pub up: LinearIdx,
    /// `down_proj` `[C, I]`.
    pub down: LinearIdx,
}

/// The per-block parameters of either architecture.
#[derive(Clone, Copy, Debug)]
pub enum Block {
    /// A GPT-2 block.
    Gpt2(Gpt2Block),
    /// A Llama/Mistral/Qwen2 block.
    Llama(LlamaBlock),
}

/// Indices of every parameter, by role.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Token embedding `[V, C]`.
    pub embed: usize,
    /// Learned position embedding `[max_positions, C]` (GPT-2).
    pub pos_embed: Option<usize>,
    /// The blocks, in order.
    pub blocks: Vec<Block>,
    /// Final norm before the LM head.
    pub final_norm: NormIdx,
    /// LM head `[V, C]`; equal to `embed` when tied.
    pub lm_head: usize,
}

/// The full parameter list of a config and its layout.
#[derive(Clone, Debug)]
pub struct ParamPlan {
    /// Every stored tensor, in checkpoint order.
    pub specs: Vec<ParamSpec>,
    /// Role → index.
    pub layout: Layout,
}

impl ParamPlan {
    /// Builds the list for a config.
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut b = Builder::default();
        match cfg.arch {
            Arch::Gpt2 => gpt2(cfg, &mut b),
            Arch::Llama => llama(cfg, &mut b),
        }
    }
}

#[derive(Default)]
struct Builder {
    specs: Vec<ParamSpec>,
}

impl Builder {
    fn add(&mut self, name: String, shape: &[usize]) -> usize {
        self.specs.push(ParamSpec {
            name,
            shape: shape.to_vec(),
        });
        self.specs.len() - 1
    }
    fn linear(&mut self, prefix: &str, shape: [usize; 2], bias_len: Option<usize>) -> LinearIdx {
        let weight = self.add(format!("{prefix}.weight"), &shape);
        let bias = bias_len.map(|n| self.add(format!("{prefix}.bias"), &[n]));
        LinearIdx { weight, bias }
    }
    fn norm(&mut self, prefix: &str, c: usize, with_bias: bool) -> NormIdx {
        let weight = self.add(format!("{prefix}.weight"), &[c]);
        let bias = with_bias.then(|| self.add(format!("{prefix}.bias"), &[c]));
        NormIdx { weight, bias }
    }
}

fn gpt2(cfg: &ModelConfig, b: &mut Builder) -> ParamPlan {
    let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
    let embed = b.add("transformer.wte.weight".into(), &[cfg.vocab_size, c]);
    let pos = b.add("transformer.wpe.weight".into(), &[cfg.max_positions, c]);
    let blocks = (0..cfg.num_layers)
        .map(|l| {
            let p = format!("transformer.h.{l}");
            Block::Gpt2(Gpt2Block {
                ln_1: b.norm(&format!("{p}.ln_1"), c, true),
                c_attn: b.linear(&format!("{p}.attn.c_attn"), [c, 3 * c], Some(3 * c)),
                attn_c_proj: b.linear(&format!("{p}.attn.c_proj"), [c, c], Some(c)),
                ln_2: b.norm(&format!("{p}.ln_2"), c, true),
                c_fc: b.linear(&format!("{p}.mlp.c_fc"), [c, i], Some(i)),
                mlp_c_proj: b.linear(&format!("{p}.mlp.c_proj"), [i, c], Some(c)),
            })
        })
        .collect();
    let final_norm = b.norm("transformer.ln_f", c, true);
    let specs = std::mem::take(&mut b.specs);
    ParamPlan {
        specs,
        layout: Layout {
            embed,
            pos_embed: Some(pos),
            blocks,
            final_norm,
            lm_head: embed,
        },
    }
}

fn llama(cfg: &ModelConfig, b: &mut Builder) -> ParamPlan {
    let (c, i, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
    let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
    let bias = |on: bool, n: usize| on.then_some(n);
    let embed = b.add("model.embed_tokens.weight".into(), &[cfg.vocab_size, c]);
    let blocks = (0..cfg.num_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            Block::Llama(LlamaBlock {
                input_norm: b.norm(&format!("{p}.input_layernorm"), c, false),
                q: b.linear(&format!("{p}.self_attn.q_proj"), [qd, c], bias(cfg.qkv_bias, qd)),
                k: b.linear(&format!("{p}.self_attn.k_proj"), [kvd, c], bias(cfg.qkv_bias, kvd)),
                v: b.linear(&format!("{p}.self_attn.v_proj"), [kvd, c], bias(cfg.qkv_bias, kvd)),
                o: b.linear(&format!("{p}.self_attn.o_proj"), [c, qd], bias(cfg.o_bias, c)),
                post_norm: b.norm(&format!("{p}.post_attention_layernorm"), c, false),
                gate: b.linear(&format!("{p}.mlp.gate_proj"), [i, c], bias(cfg.mlp_bias, i)),
                up: b.linear(&format!("{p}.mlp.up_proj"), [i, c], bias(cfg.mlp_bias, i)),
                down: b.linear(&format!("{p}.mlp.down_proj"), [c, i], bias(cfg.mlp_bias, c)),
            })
        })
        .collect();
    let final_norm = b.norm("model.norm", c, false);
    let lm_head = if cfg.tie_word_embeddings {
        embed
    } else {
        b.add("lm_head.weight".into(), &[cfg.vocab_size, c])
    };
    let specs = std::mem::take(&mut b.specs);
    ParamPlan {
        specs,
        layout: Layout {
            embed,
            pos_embed: None,
            blocks,
            final_norm,
            lm_head,
        },
    }
}

/// A set of f32 tensors keyed like the parameters: the weights themselves, or their gradients.
#[derive(Clone, Debug)]
pub struct Tensors {
    specs: Vec<ParamSpec>,
    data: Vec<Vec<f32>>,
    index: HashMap<String, usize>,
}

/// Gradients have exactly the parameters' names, shapes and order.
pub type Grads = Tensors;

impl Tensors {
    /// Zero-filled tensors for the given specs.
    pub fn zeros(specs: &[ParamSpec]) -> Self {
        let data = specs.iter().map(|s| vec![0.0; s.numel()]).collect();
        Self::from_parts(specs.to_vec(), data)
    }

    /// Zero-filled tensors with the same names and shapes as `other` (e.g. gradients for params).
    pub fn zeros_like(other: &Tensors) -> Self {
        Self::zeros(&other.specs)
    }

    /// Wraps already loaded data; `data[i]` must have `specs[i].numel()` elements.
    pub(crate) fn from_parts(specs: Vec<ParamSpec>, data: Vec<Vec<f32>>) -> Self {
        debug_assert!(specs.iter().zip(&data).all(|(s, d)| s.numel() == d.len()));
        let index = specs.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { specs, data, index }
    }

    /// Sets every element to 0 (start of a gradient-accumulation window).
    pub fn zero(&mut self) {
        self.data.iter_mut().for_each(|d| d.fill(0.0));
    }

    /// Names and shapes, in order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// True when there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Index of a tensor by its Hugging Face name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// Tensor data by index.
    pub fn at(&self, i: usize) -> &[f32] {
        &self.data[i]
    }

    /// Mutable tensor data by index.
    pub fn at_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.data[i]
    }

    /// Tensor data by name.
    pub fn get(&self, name: &str) -> Result<&[f32]> {
        let i = self
            .index_of(name)
            .with_context(|| format!("no tensor named {name:?}"))?;
        Ok(&self.data[i])
    }

    /// Mutable tensor data by name.
    pub fn get_mut(&mut self, name: &str) -> Result<&mut [f32]> {
        let i = self
            .index_of(name)
            .with_context(|| format!("no tensor named {name:?}"))?;
        Ok(&mut self.data[i])
    }

    /// `(spec, data)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&ParamSpec, &[f32])> {
        self.specs.iter().zip(self.data.iter().map(Vec::as_slice))
    }

    /// All tensors mutably, in order (for optimizers that update every parameter).
    pub fn data_mut(&mut self) -> &mut [Vec<f32>] {
        &mut self.data
    }

    /// Several distinct tensors mutably at once (indices must differ), e.g. the weight and bias
    /// gradients of one layer.
    pub(crate) fn many_mut<const N: usize>(&mut self, idx: [usize; N]) -> [&mut [f32]; N] {
        let mut slots: Vec<Option<&mut Vec<f32>>> = self.data.iter_mut().map(Some).collect();
        idx.map(|i| slots[i].take().expect("many_mut: repeated tensor index").as_mut_slice())
    }
}
