//! Gradients and AdamW on the device: zeroing, the deterministic global norm, clipping's scale,
//! and the fused AdamW step over fp32 masters (refreshing the bf16 copies in the same kernel).
//!
//! The AdamW moments ([`Moments`]) belong to the optimizer, not the model, so a frozen reference
//! model never allocates them; they cross to the host only for checkpoints (bit-exact: fp32
//! copies both ways).

use super::acts::zeros;
use super::plan::ActivationBytes;
use super::weights::download_all;
use super::CudaModel;
use crate::model::params::{ParamSpec, Tensors};
use crate::ops::adamw::{self, AdamWStep};
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaSlice, CudaView};

/// AdamW first and second moments of every parameter, fp32, on the device.
pub struct Moments {
    m: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
}

impl Moments {
    /// Zeroed moments for `model`'s parameters (the state before the first step).
    pub fn zeros(model: &CudaModel) -> Result<Moments> {
        let bytes: usize = model.plan.specs.iter().map(|s| 8 * s.numel()).sum();
        ActivationBytes::ensure_fits(&model.dev, bytes, "the AdamW moments")?;
        let s = model.dev.stream();
        let mut out = Moments {
            m: Vec::with_capacity(model.plan.specs.len()),
            v: Vec::with_capacity(model.plan.specs.len()),
        };
        for spec in &model.plan.specs {
            out.m
                .push(zeros(s, spec.numel(), &format!("exp_avg of {}", spec.name))?);
            out.v
                .push(zeros(s, spec.numel(), &format!("exp_avg_sq of {}", spec.name))?);
        }
        Ok(out)
    }

    /// Uploads host moments (keyed like `model`'s parameters).
    pub fn from_host(model: &CudaModel, m: &Tensors, v: &Tensors) -> Result<Moments> {
        ensure!(
            m.specs() == model.param_specs() && v.specs() == model.param_specs(),
            "optimizer state: not keyed like this model's parameters"
        );
        let s = model.dev.stream();
        let up = |t: &Tensors, what: &str| -> Result<Vec<CudaSlice<f32>>> {
            t.iter()
                .map(|(spec, d)| {
                    s.clone_htod(d)
                        .with_context(|| format!("uploading {what} of {}", spec.name))
                })
                .collect()
        };
        Ok(Moments {
            m: up(m, "exp_avg")?,
            v: up(v, "exp_avg_sq")?,
        })
    }

    /// Both moments copied to the host, named and shaped by `specs`.
    pub fn to_host(&self, model: &CudaModel) -> Result<(Tensors, Tensors)> {
        let specs = model.param_specs();
        Ok((
            download_all(&model.dev, &self.m, specs)?,
            download_all(&model.dev, &self.v, specs)?,
        ))
    }
}

impl CudaModel {
    /// Sets every gradient to 0 (start of an accumulation window); nothing to do before the
    /// first backward.
    pub fn zero_grads(&mut self) -> Result<()> {
        if let Some(g) = self.grads.as_mut() {
            let s = self.dev.stream();
            for b in g.iter_mut() {
                s.memset_zeros(b)?;
            }
        }
        Ok(())
    }

    /// `Σ g²` over every gradient, in f64 from fixed-partition f32 partials (deterministic).
    pub fn grad_sq_norm(&self) -> Result<f64> {
        let Some(g) = self.grads.as_ref() else {
            return Ok(0.0);
        };
        let views: Vec<CudaView<f32>> = g.iter().map(|b| b.as_view()).collect();
        let refs: Vec<&CudaView<f32>> = views.iter().collect();
        adamw::sum_squares_cuda(&self.dev, &refs)
    }

    /// `g *= s` for every gradient (gradient clipping).
    pub fn scale_grads(&mut self, s: f32) -> Result<()> {
        if let Some(g) = self.grads.as_mut() {
            for b in g.iter_mut() {
                adamw::scale_cuda(&self.dev, &mut b.as_view_mut(), s)?;
            }
        }
        Ok(())
    }

    /// The gradients copied to the host (zeros before the first backward).
    pub fn grads_to_host(&self) -> Result<Tensors> {
        match &self.grads {
            Some(g) => download_all(&self.dev, g, &self.plan.specs),
            None => Ok(Tensors::zeros(&self.plan.specs)),
        }
    }

    /// One AdamW step on every parameter (PyTorch semantics, see [`crate::ops::adamw`]);
    /// `hp.weight_decay` applies only where `decays(spec)` says. In bf16 mode the kernel also
    /// rewrites each GEMM weight's bf16 copy from the updated master.
    pub fn adamw_step(
        &mut self,
        moments: &mut Moments,
        hp: &AdamWStep,
        decays: &dyn Fn(&ParamSpec) -> bool,
    ) -> Result<()> {
        self.ensure_grads()?;
        let Some(grads) = self.grads.as_ref() else {
            anyhow::bail!("gradient buffers missing after allocation");
        };
        ensure!(
            moments.m.len() == grads.len() && moments.v.len() == grads.len(),
            "optimizer state: {} moments for {} parameters",
            moments.m.len(),
            grads.len()
        );
        for (i, spec) in self.plan.specs.iter().enumerate() {
            let step = AdamWStep {
                weight_decay: if decays(spec) { hp.weight_decay } else { 0.0 },
                ..*hp
            };
            let mut half = self.weights.half[i].as_mut().map(|h| h.as_view_mut());
            adamw::step_cuda(
                &self.dev,
                &mut self.weights.master[i].as_view_mut(),
                &grads[i].as_view(),
                &mut moments.m[i].as_view_mut(),
                &mut moments.v[i].as_view_mut(),
                half.as_mut(),
                &step,
            )
            .with_context(|| format!("AdamW step on {}", spec.name))?;
        }
        Ok(())
    }
}
