//! The seam between the trainers and a device: [`Engine`], and its CPU implementation
//! [`CpuEngine`] over [`Model`] + [`Grads`] + AdamW moments.
//!
//! The trainers only ever see host-side per-token outputs ([`TokenOutputs`]) and hand back host
//! `dlogp` arrays, so the same SFT/DPO code drives the CPU engine and a CUDA engine. Activations
//! stay wherever the engine keeps them, inside its associated [`Engine::Forward`] value.
//!
//! Optimizer semantics are PyTorch `AdamW` (see [`crate::ops::adamw`]) with the transformers
//! default grouping: no weight decay on 1-D tensors (norm weights and biases), see
//! [`decays`].

use crate::model::{self, Grads, Model, ParamSpec, Tensors};
use crate::ops::adamw::{self, AdamWStep};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// Host-side per-token outputs of a forward pass, every slice `[B, T]` row-major and meaningful
/// only where the batch has a target (0 elsewhere).
pub trait TokenOutputs {
    /// Rows `B`.
    fn batch(&self) -> usize;
    /// Padded length `T`.
    fn seq(&self) -> usize;
    /// `log p(target)` (fp32 log-softmax).
    fn logp(&self) -> &[f32];
    /// Softmax entropy of the predicted distribution.
    fn entropy(&self) -> &[f32];
    /// Index of the largest logit (first on ties).
    fn argmax(&self) -> &[u32];
    /// Mean logit over the vocabulary.
    fn logit_mean(&self) -> &[f32];
}

impl TokenOutputs for model::Forward {
    fn batch(&self) -> usize {
        model::Forward::batch(self)
    }
    fn seq(&self) -> usize {
        model::Forward::seq(self)
    }
    fn logp(&self) -> &[f32] {
        model::Forward::logp(self)
    }
    fn entropy(&self) -> &[f32] {
        model::Forward::entropy(self)
    }
    fn argmax(&self) -> &[u32] {
        model::Forward::argmax(self)
    }
    fn logit_mean(&self) -> &[f32] {
        model::Forward::logit_mean(self)
    }
}

/// What a trainer needs from a device: forward with saved activations, accumulating backward,
/// gradient-norm clipping, an AdamW step, and checkpoint I/O.
pub trait Engine {
    /// A forward pass's saved state plus its host-side per-token outputs.
    type Forward: TokenOutputs;

    /// Forward over one micro-batch, keeping what [`Engine::backward`] needs.
    fn forward(&mut self, batch: &model::Batch) -> Result<Self::Forward>;
    /// Adds `∂L/∂θ` for upstream per-token gradients `dlogp` (`[B, T]`, host) into the
    /// gradient buffers (accumulation across micro-batches).
    fn backward(&mut self, fwd: &Self::Forward, dlogp: &[f32]) -> Result<()>;
    /// Zeroes the gradient buffers (start of an accumulation window).
    fn zero_grads(&mut self) -> Result<()>;
    /// `Σ g²` over every gradient, in f64, deterministic (fixed partition and order).
    fn grad_sq_norm(&mut self) -> Result<f64>;
    /// `g *= s` for every gradient (clipping).
    fn scale_grads(&mut self, s: f32) -> Result<()>;
    /// One AdamW step on every parameter; `hp.weight_decay` applies only where [`decays`] says.
    fn optimizer_step(&mut self, hp: &AdamWStep) -> Result<()>;
    /// The parameter list (names and shapes, HF order).
    fn param_specs(&self) -> &[ParamSpec];
    /// Writes the current weights in the Hugging Face layout (atomically) to `dir`.
    fn save_model(&self, dir: &Path) -> Result<()>;
    /// Writes the AdamW moments to `path` (safetensors, fp32, `exp_avg.<name>` /
    /// `exp_avg_sq.<name>`), bit-exact.
    fn save_optimizer(&self, path: &Path) -> Result<()>;
    /// Restores the moments written by [`Engine::save_optimizer`].
    fn load_optimizer(&mut self, path: &Path) -> Result<()>;
}

/// Whether weight decay applies to a parameter: every tensor of rank ≥ 2. Norm weights and
/// biases (rank 1) are excluded, as transformers' `get_decay_parameter_names` does by name.
pub fn decays(spec: &ParamSpec) -> bool {
    spec.shape.len() >= 2
}

/// The CPU engine: a [`Model`] with lazily allocated gradients and AdamW moments (a frozen
/// reference model that only runs forwards never allocates them).
pub struct CpuEngine {
    model: Model,
    grads: Option<Grads>,
    moments: Option<(Tensors, Tensors)>,
}

impl CpuEngine {
    /// Wraps a loaded model.
    pub fn new(model: Model) -> Self {
        CpuEngine {
            model,
            grads: None,
            moments: None,
        }
    }

    /// Loads `dir` as a model (see [`Model::load`]).
    pub fn load(dir: &Path) -> Result<Self> {
        Ok(Self::new(Model::load(dir)?))
    }

    /// The model (weights as of the last step).
    pub fn model(&self) -> &Model {
        &self.model
    }

    /// The gradient buffers, if any backward ran.
    pub fn grads(&self) -> Option<&Grads> {
        self.grads.as_ref()
    }

    fn grads_mut(&mut self) -> &mut Grads {
        let model = &self.model;
        self.grads.get_or_insert_with(|| model.new_grads())
    }
}

/// Elements per partial sum of the deterministic norm.
const NORM_CHUNK: usize = 1 << 16;

impl Engine for CpuEngine {
    type Forward = model::Forward;

    fn forward(&mut self, batch: &model::Batch) -> Result<model::Forward> {
        self.model.forward(batch)
    }

    fn backward(&mut self, fwd: &model::Forward, dlogp: &[f32]) -> Result<()> {
        let mut grads = self.grads.take().unwrap_or_else(|| self.model.new_grads());
        let r = self.model.backward(fwd, dlogp, &mut grads);
        self.grads = Some(grads);
        r
    }

    fn zero_grads(&mut self) -> Result<()> {
        if let Some(g) = self.grads.as_mut() {
            g.zero();
        }
        Ok(())
    }

    fn grad_sq_norm(&mut self) -> Result<f64> {
        let Some(g) = self.grads.as_ref() else {
            return Ok(0.0);
        };
        // Fixed chunks summed in order: the result does not depend on rayon's work splitting,
        // which exact resume relies on.
        let mut total = 0f64;
        for (_, d) in g.iter() {
            let partials: Vec<f64> = d
                .par_chunks(NORM_CHUNK)
                .map(|c| c.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
                .collect();
            total += partials.iter().sum::<f64>();
        }
        Ok(total)
    }

    fn scale_grads(&mut self, s: f32) -> Result<()> {
        for d in self.grads_mut().data_mut() {
            adamw::scale_cpu(d, s);
        }
        Ok(())
    }

    fn optimizer_step(&mut self, hp: &AdamWStep) -> Result<()> {
        let grads = self.grads.take().unwrap_or_else(|| self.model.new_grads());
        let params = self.model.params();
        let (m, v) = self
            .moments
            .get_or_insert_with(|| (Tensors::zeros_like(params), Tensors::zeros_like(params)));
        let specs: Vec<ParamSpec> = params.specs().to_vec();
        let p = self.model.params_mut();
        let result = (|| {
            for (i, spec) in specs.iter().enumerate() {
                let step = AdamWStep {
                    weight_decay: if decays(spec) { hp.weight_decay } else { 0.0 },
                    ..*hp
                };
                adamw::step_cpu(&mut p.data_mut()[i], grads.at(i), m.at_mut(i), v.at_mut(i), &step)
                    .with_context(|| format!("AdamW step on {}", spec.name))?;
            }
            Ok(())
        })();
        self.grads = Some(grads);
        result
    }

    fn param_specs(&self) -> &[ParamSpec] {
        self.model.params().specs()
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save(dir)
    }

    fn save_optimizer(&self, path: &Path) -> Result<()> {
        let params = self.model.params();
        let zeros;
        let (m, v) = match &self.moments {
            Some((m, v)) => (m, v),
            None => {
                zeros = (Tensors::zeros_like(params), Tensors::zeros_like(params));
                (&zeros.0, &zeros.1)
            }
        };
        write_moments(path, m, v)
    }

    fn load_optimizer(&mut self, path: &Path) -> Result<()> {
        self.moments = Some(read_moments(path, self.model.params().specs())?);
        Ok(())
    }
}

/// Reads the AdamW moments written by [`write_moments`] for parameters `specs`, checking every
/// name, dtype and shape.
pub(crate) fn read_moments(path: &Path, specs: &[ParamSpec]) -> Result<(Tensors, Tensors)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut m = Tensors::zeros(specs);
    let mut v = Tensors::zeros(specs);
    for (prefix, dst) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
        for (i, spec) in specs.iter().enumerate() {
            let key = format!("{prefix}.{}", spec.name);
            let t = st
                .tensor(&key)
                .with_context(|| format!("{}: no tensor {key:?}", path.display()))?;
            ensure!(
                t.dtype() == Dtype::F32 && t.shape() == spec.shape.as_slice(),
                "{}: {key} is {:?} {:?}, expected F32 {:?}",
                path.display(),
                t.dtype(),
                t.shape(),
                spec.shape
            );
            for (x, c) in dst.at_mut(i).iter_mut().zip(t.data().chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
    if st.len() != 2 * specs.len() {
        bail!(
            "{}: {} tensors, expected {} (two moments per parameter)",
            path.display(),
            st.len(),
            2 * specs.len()
        );
    }
    Ok((m, v))
}

/// Writes AdamW moments as safetensors (`exp_avg.<name>`, `exp_avg_sq.<name>`, fp32), atomically.
pub(crate) fn write_moments(path: &Path, m: &Tensors, v: &Tensors) -> Result<()> {
    let bytes = serialize_moments(m, v)?;
    crate::fsutil::write_atomic(path, &bytes)
}

fn serialize_moments(m: &Tensors, v: &Tensors) -> Result<Vec<u8>> {
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
        for (spec, d) in t.iter() {
            let bytes = d.iter().flat_map(|x| x.to_le_bytes()).collect();
            named.push((format!("{prefix}.{}", spec.name), spec.shape.clone(), bytes));
        }
    }
    let mut views = Vec::with_capacity(named.len());
    for (name, shape, b) in &named {
        views.push((name.clone(), TensorView::new(Dtype::F32, shape.clone(), b)?));
    }
    let meta = HashMap::from([("format".to_string(), "irbridge-adamw".to_string())]);
    safetensors::serialize(views, Some(meta)).context("serializing the optimizer state")
}
