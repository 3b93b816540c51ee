//! [`CudaEngine`]: the [`Engine`] the trainers drive on a GPU — a [`CudaModel`] plus AdamW
//! moments on the device. Same semantics as [`CpuEngine`](super::CpuEngine): host `[B, T]`
//! outputs in, host `dlogp` back, gradients accumulating across micro-batches, AdamW with no
//! decay on 1-D tensors, checkpoints in the same files (the HF layout for the weights, the same
//! `optimizer.safetensors` layout for the moments, so a run can resume on either device).

use super::engine::{decays, read_moments, write_moments, Engine, TokenOutputs};
use crate::model::cuda::{CudaForward, CudaModel, Moments, Precision};
use crate::model::{self, ParamSpec, Tensors};
use crate::ops::adamw::AdamWStep;
use anyhow::Result;
use std::path::Path;

impl TokenOutputs for CudaForward {
    fn batch(&self) -> usize {
        CudaForward::batch(self)
    }
    fn seq(&self) -> usize {
        CudaForward::seq(self)
    }
    fn logp(&self) -> &[f32] {
        CudaForward::logp(self)
    }
    fn entropy(&self) -> &[f32] {
        CudaForward::entropy(self)
    }
    fn argmax(&self) -> &[u32] {
        CudaForward::argmax(self)
    }
    fn logit_mean(&self) -> &[f32] {
        CudaForward::logit_mean(self)
    }
}

/// A model on one GPU with lazily allocated gradients and AdamW moments (a frozen reference
/// model that only runs forwards never allocates either).
pub struct CudaEngine {
    model: CudaModel,
    moments: Option<Moments>,
}

impl CudaEngine {
    /// Wraps a model already on the GPU.
    pub fn new(model: CudaModel) -> Self {
        CudaEngine { model, moments: None }
    }

    /// Loads `dir` onto CUDA device `ordinal` in `precision` (see [`CudaModel::load`]).
    pub fn load(dir: &Path, ordinal: usize, precision: Precision) -> Result<Self> {
        Ok(Self::new(CudaModel::load(dir, ordinal, precision)?))
    }

    /// The model (weights as of the last step).
    pub fn model(&self) -> &CudaModel {
        &self.model
    }

    /// The model, mutably (e.g. to change the LM-head chunk).
    pub fn model_mut(&mut self) -> &mut CudaModel {
        &mut self.model
    }

    /// The AdamW moments copied to the host (zeros before the first step).
    pub fn moments_to_host(&self) -> Result<(Tensors, Tensors)> {
        match &self.moments {
            Some(m) => m.to_host(&self.model),
            None => {
                let specs = self.model.param_specs();
                Ok((Tensors::zeros(specs), Tensors::zeros(specs)))
            }
        }
    }
}

impl Engine for CudaEngine {
    type Forward = CudaForward;

    fn forward(&mut self, batch: &model::Batch) -> Result<CudaForward> {
        self.model.forward(batch)
    }

    fn backward(&mut self, fwd: &CudaForward, dlogp: &[f32]) -> Result<()> {
        self.model.backward(fwd, dlogp)
    }

    fn zero_grads(&mut self) -> Result<()> {
        self.model.zero_grads()
    }

    fn grad_sq_norm(&mut self) -> Result<f64> {
        self.model.grad_sq_norm()
    }

    fn scale_grads(&mut self, s: f32) -> Result<()> {
        self.model.scale_grads(s)
    }

    fn optimizer_step(&mut self, hp: &AdamWStep) -> Result<()> {
        if self.moments.is_none() {
            self.moments = Some(Moments::zeros(&self.model)?);
        }
        let Some(m) = self.moments.as_mut() else {
            anyhow::bail!("AdamW moments missing after allocation");
        };
        self.model.adamw_step(m, hp, &decays)
    }

    fn param_specs(&self) -> &[ParamSpec] {
        self.model.param_specs()
    }

    fn save_model(&self, dir: &Path) -> Result<()> {
        self.model.save(dir)
    }

    fn save_optimizer(&self, path: &Path) -> Result<()> {
        let (m, v) = self.moments_to_host()?;
        write_moments(path, &m, &v)
    }

    fn load_optimizer(&mut self, path: &Path) -> Result<()> {
        let (m, v) = read_moments(path, self.model.param_specs())?;
        self.moments = Some(Moments::from_host(&self.model, &m, &v)?);
        Ok(())
    }
}
