//! `config.json` → [`ModelConfig`]: the handful of numbers the model math needs, normalised across
//! the Hugging Face families irbridge supports (GPT-2, Llama, Mistral, Qwen2).
//!
//! The raw JSON is kept so that saving can write the file back unchanged (transformers must load a
//! saved checkpoint without edits), and so that keys this crate ignores survive a round trip.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The two block shapes the CPU/GPU code implements. Mistral and Qwen2 are Llama-shaped blocks
/// with different defaults (biases, sliding windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Learned positions, pre-LayerNorm, Conv1D weights `[in, out]`, fused `c_attn`, `gelu_new`.
    Gpt2,
    /// RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, `nn.Linear` `[out, in]`.
    Llama,
}

/// Rotary embedding parameters (Llama family only).
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    /// Base θ of the inverse frequencies `θ^(−2i/head_dim)`.
    pub theta: f64,
    /// Frequency rescaling, if the checkpoint asks for one.
    pub scaling: RopeScaling,
}

/// The `rope_type`s whose inverse frequencies are a fixed function of the position (so the
/// forward is position-wise and needs no sequence-length dependent state).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain `rotate_half` RoPE.
    None,
    /// `inv_freq / factor`.
    Linear { factor: f64 },
    /// Llama 3.x wavelength-dependent smoothing.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The normalised model configuration. Every field is what the math uses, already defaulted the
/// way transformers defaults it.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    /// `model_type` as written in `config.json` (`gpt2`, `llama`, `mistral`, `qwen2`).
    pub model_type: String,
    /// Which block shape implements it.
    pub arch: Arch,
    /// Rows of the token embedding (and of the LM head).
    pub vocab_size: usize,
    /// Residual width `C`.
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: `num_heads` is a multiple of it; equal for GPT-2).
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Longest sequence the positions support (`n_positions` / `max_position_embeddings`).
    pub max_positions: usize,
    /// ε of LayerNorm / RMSNorm.
    pub norm_eps: f32,
    /// True when the LM head reuses the token embedding (no `lm_head.weight` tensor).
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2, or Llama `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (Llama `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Rotary parameters (Llama family); `None` for GPT-2.
    pub rope: Option<Rope>,
    /// Per-layer sliding attention window (keys with `q − k ≥ window` are masked), if any.
    pub sliding_window: Vec<Option<usize>>,
    /// Multiplier of `q·k` (1/√head_dim unless GPT-2's `scale_attn_weights` is false).
    pub attn_scale: f32,
    /// GPT-2 `scale_attn_by_inverse_layer_idx`: layer `l` additionally divides scores by `l + 1`.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// The original JSON, written back on save.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads and normalises `dir/config.json`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: no such model folder (expected config.json inside)", dir.display());
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        Self::from_json(raw).with_context(|| format!("in {}", path.display()))
    }

    /// Normalises an already parsed `config.json`.
    pub fn from_json(raw: Value) -> Result<Self> {
        let j = Json(&raw);
        let model_type = j.str("model_type")?;
        let cfg = match model_type.as_str() {
            "gpt2" => gpt2(&j, &raw)?,
            "llama" | "mistral" | "qwen2" => llama_family(&j, &raw, &model_type)?,
            other => {
                bail!("unsupported model_type {other:?} (supported: gpt2, llama, mistral, qwen2)")
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
        ] {
            anyhow::ensure!(v > 0, "{what} must be positive, got {v}");
        }
        anyhow::ensure!(
            self.num_heads.is_multiple_of(self.num_kv_heads),
            "num_attention_heads {} is not a multiple of num_key_value_heads {}",
            self.num_heads,
            self.num_kv_heads
        );
        if self.arch == Arch::Gpt2 {
            anyhow::ensure!(
                self.num_heads * self.head_dim == self.hidden_size,
                "n_embd {} is not divisible by n_head {}",
                self.hidden_size,
                self.num_heads
            );
        } else {
            anyhow::ensure!(
                self.head_dim.is_multiple_of(2),
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            );
        }
        Ok(())
    }
}

fn gpt2(j: &Json, raw: &Value) -> Result<ModelConfig> {
    let hidden = j.usize("n_embd")?;
    let heads = j.usize("n_head")?;
    anyhow::ensure!(heads > 0, "n_head must be positive");
    let act = j.opt_str("activation_function")?.unwrap_or_else(|| "gelu_new".into());
    anyhow::ensure!(
        act == "gelu_new" || act == "gelu_pytorch_tanh",
        "activation_function {act:?} is not supported for gpt2 (only the tanh GELU: gelu_new)"
    );
    let layers = j.usize("n_layer")?;
    let head_dim = hidden / heads;
    let scale = if j.opt_bool("scale_attn_weights")?.unwrap_or(true) {
        1.0 / (head_dim as f32).sqrt()
    } else {
        1.0
    };
    Ok(ModelConfig {
        model_type: "gpt2".into(),
        arch: Arch::Gpt2,
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: heads,
        head_dim,
        intermediate_size: j.opt_usize("n_inner")?.unwrap_or(4 * hidden),
        max_positions: j.usize("n_positions")?,
        norm_eps: j.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5) as f32,
        // GPT2LMHeadModel always ties lm_head to wte.
        tie_word_embeddings: true,
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        rope: None,
        sliding_window: vec![None; layers],
        attn_scale: scale,
        scale_attn_by_inverse_layer_idx: j.opt_bool("scale_attn_by_inverse_layer_idx")?.unwrap_or(false),
        raw: raw.clone(),
    })
}

fn llama_family(j: &Json, raw: &Value, model_type: &str) -> Result<ModelConfig> {
    let hidden = j.usize("hidden_size")?;
    let heads = j.usize("num_attention_heads")?;
    anyhow::ensure!(heads > 0, "num_attention_heads must be positive");
    let layers = j.usize("num_hidden_layers")?;
    let act = j.opt_str("hidden_act")?.unwrap_or_else(|| "silu".into());
    anyhow::ensure!(
        act == "silu",
        "hidden_act {act:?} is not supported for {model_type} (only silu)"
    );
    let head_dim = j.opt_usize("head_dim")?.unwrap_or(hidden / heads);
    let is_qwen2 = model_type == "qwen2";
    let attention_bias = j.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(ModelConfig {
        model_type: model_type.into(),
        arch: Arch::Llama,
        vocab_size: j.usize("vocab_size")?,
        hidden_size: hidden,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: j.opt_usize("num_key_value_heads")?.unwrap_or(heads),
        head_dim,
        intermediate_size: j.usize("intermediate_size")?,
        max_positions: j.opt_usize("max_position_embeddings")?.unwrap_or(usize::MAX),
        norm_eps: j.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        // transformers defaults tie_word_embeddings to False for all three families.
        tie_word_embeddings: j.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias: is_qwen2 || attention_bias,
        o_bias: !is_qwen2 && attention_bias,
        mlp_bias: !is_qwen2 && j.opt_bool("mlp_bias")?.unwrap_or(false),
        rope: Some(rope(j)?),
        sliding_window: sliding_windows(j, model_type, layers)?,
        attn_scale: 1.0 / (head_dim as f32).sqrt(),
        scale_attn_by_inverse_layer_idx: false,
        raw: raw.clone(),
    })
}

/// θ from `rope_parameters.rope_theta` (transformers 5) or top-level `rope_theta` (older files);
/// scaling from `rope_parameters` or the older `rope_scaling` block. A file may carry both (a
/// transformers-5 `rope_parameters` of type `default` next to a legacy `rope_scaling`):
/// transformers then applies the legacy scaling, and so does this; two different non-default
/// scalings are an error rather than a silent choice.
fn rope(j: &Json) -> Result<Rope> {
    let params = j.0.get("rope_parameters").filter(|v| !v.is_null());
    let theta = match params.and_then(|p| p.get("rope_theta")).and_then(Value::as_f64) {
        Some(t) => t,
        None => j.opt_f64("rope_theta")?.unwrap_or(10000.0),
    };
    let legacy = j.0.get("rope_scaling").filter(|v| !v.is_null());
    let from_params = params.map(|p| scaling(p, "rope_parameters")).transpose()?;
    let from_legacy = legacy.map(|p| scaling(p, "rope_scaling")).transpose()?;
    let scaling = match (from_params, from_legacy) {
        (Some(a), Some(b)) if a != RopeScaling::None && b != RopeScaling::None && a != b => {
            bail!("rope_parameters ({a:?}) and rope_scaling ({b:?}) disagree; keep one of them")
        }
        (Some(a), _) if a != RopeScaling::None => a,
        (_, Some(b)) => b,
        _ => RopeScaling::None,
    };
    anyhow::ensure!(theta > 0.0, "rope_theta must be positive, got {theta}");
    Ok(Rope { theta, scaling })
}

/// The scaling rule a `rope_parameters` / `rope_scaling` block names (`rope_type`, or the older
/// `type`; none means the default, unscaled rotary).
fn scaling(block: &Value, key: &str) -> Result<RopeScaling> {
    let b = Json(block);
    let kind = match b.opt_str("rope_type")? {
        Some(k) => k,
        None => b.opt_str("type")?.unwrap_or_else(|| "default".into()),
    };
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: b.f64("factor").with_context(|| format!("{key} (linear)"))?,
        },
        "llama3" => {
            let f = |k: &str| b.f64(k).with_context(|| format!("{key} (llama3)"));
            RopeScaling::Llama3 {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            }
        }
        other => bail!("{key}: rope_type {other:?} is not supported (supported: default, linear, llama3)"),
    })
}

/// Mistral applies `sliding_window` to every layer when set; Qwen2 only when
/// `use_sliding_window` is true, to the layers `layer_types` marks (or, in older files, those at
/// or above `max_window_layers`).
fn sliding_windows(j: &Json, model_type: &str, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = j.opt_usize("sliding_window")?;
    let Some(w) = window else {
        return Ok(vec![None; layers]);
    };
    let types: Option<Vec<String>> = match j.0.get("layer_types").filter(|v| !v.is_null()) {
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_str().map(str::to_owned).context("layer_types: expected strings"))
                .collect::<Result<_>>()?,
        ),
        Some(_) => bail!("layer_types: expected an array"),
        None => None,
    };
    if let Some(t) = &types {
        anyhow::ensure!(
            t.len() == layers,
            "layer_types: expected {layers} entries, got {}",
            t.len()
        );
    }
    let per_layer = |l: usize| -> bool {
        match &types {
            Some(t) => t[l] == "sliding_attention",
            None => match model_type {
                "mistral" => true,
                "qwen2" => l >= j.opt_usize("max_window_layers").ok().flatten().unwrap_or(0),
                _ => false,
            },
        }
    };
    let enabled = match model_type {
        "qwen2" => j.opt_bool("use_sliding_window")?.unwrap_or(false),
        "mistral" => true,
        _ => types.is_some(),
    };
    Ok((0..layers).map(|l| (enabled && per_layer(l)).then_some(w)).collect())
}

/// Typed accessors that name the key in their errors.
struct Json<'a>(&'a Value);

impl Json<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn str(&self, key: &str) -> Result<String> {
        self.opt_str(key)?.with_context(|| format!("missing key {key:?}"))
    }
    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .with_context(|| format!("{key}: expected a string, got {v}"))
            })
            .transpose()
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.with_context(|| format!("missing key {key:?}"))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .with_context(|| format!("{key}: expected a non-negative integer, got {v}"))
            })
            .transpose()
    }
    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.with_context(|| format!("missing key {key:?}"))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key)
            .map(|v| v.as_f64().with_context(|| format!("{key}: expected a number, got {v}")))
            .transpose()
    }
    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| {
                v.as_bool()
                    .with_context(|| format!("{key}: expected a boolean, got {v}"))
            })
            .transpose()
    }
}
