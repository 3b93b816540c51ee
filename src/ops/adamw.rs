//! Fused AdamW over flat fp32 parameter buffers, the global gradient norm, and a scale in place.
//!
//! The step follows PyTorch `torch.optim.AdamW` (single-tensor path), per element:
//! `p ← p·(1 − lr·wd)`; `m ← m + (1−β1)(g − m)`; `v ← β2·v + (1−β2)·g²`;
//! `p ← p − (lr/(1−β1^t)) · m / (sqrt(v)/sqrt(1−β2^t) + eps)`, with the step scalars computed in
//! f64 on the host as PyTorch does in Python. Weight decay is per call ([`AdamWStep::weight_decay`]),
//! so the caller can skip it on norms and biases. Parameters, gradients and moments are fp32; the
//! CUDA step can also write a bf16 copy of the updated weights (for bf16 matmuls).
//!
//! Gradient clipping: [`sum_squares_cpu`]/[`sum_squares_cuda`] give Σ g² over several buffers in
//! f64 (deterministic: fixed partition, host sums the partials in order) and
//! [`scale_cpu`]/[`scale_cuda`] multiply in place by `max_norm / norm`.

use super::support::{cfg, cfg_elementwise, ensure_len};
use crate::device::CudaDevice;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use half::bf16;
use rayon::prelude::*;

/// Hyper-parameters of one AdamW step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// β1 (PyTorch default 0.9).
    pub beta1: f64,
    /// β2 (PyTorch default 0.999).
    pub beta2: f64,
    /// ε (PyTorch default 1e-8).
    pub eps: f64,
    /// Decoupled weight decay for this buffer (0 for norms/biases).
    pub weight_decay: f64,
    /// Step number t ≥ 1 (after incrementing, as PyTorch).
    pub step: u64,
}

/// The f32 scalars both twins use, each formed in f64 first (as PyTorch does in Python).
struct Scalars {
    decay: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
}

impl AdamWStep {
    fn scalars(&self) -> Result<Scalars> {
        ensure!(self.step >= 1, "adamw: step must be >= 1 (got {})", self.step);
        ensure!(
            (0.0..1.0).contains(&self.beta1),
            "adamw: beta1 {} outside [0, 1)",
            self.beta1
        );
        ensure!(
            (0.0..1.0).contains(&self.beta2),
            "adamw: beta2 {} outside [0, 1)",
            self.beta2
        );
        let t = self.step.min(i32::MAX as u64) as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        Ok(Scalars {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            one_minus_beta1: (1.0 - self.beta1) as f32,
            beta2: self.beta2 as f32,
            one_minus_beta2: (1.0 - self.beta2) as f32,
            step_size: (self.lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
        })
    }
}

/// CPU step in place on `params`, `m`, `v` (all the same length as `grads`).
pub fn step_cpu(params: &mut [f32], grads: &[f32], m: &mut [f32], v: &mut [f32], hp: &AdamWStep) -> Result<()> {
    let n = params.len();
    ensure_len("grads", grads.len(), n)?;
    ensure_len("exp_avg", m.len(), n)?;
    ensure_len("exp_avg_sq", v.len(), n)?;
    let s = hp.scalars()?;
    params
        .par_iter_mut()
        .zip(grads.par_iter())
        .zip(m.par_iter_mut().zip(v.par_iter_mut()))
        .for_each(|((p, &g), (m, v))| {
            let pi = *p * s.decay;
            let mi = *m + s.one_minus_beta1 * (g - *m);
            let vi = *v * s.beta2 + s.one_minus_beta2 * g * g;
            let denom = vi.sqrt() / s.bc2_sqrt + s.eps;
            *p = pi - s.step_size * (mi / denom);
            *m = mi;
            *v = vi;
        });
    Ok(())
}

/// CUDA step in place; with `bf16_copy` the updated weights are also written there as bf16.
pub fn step_cuda(
    dev: &CudaDevice,
    params: &mut CudaViewMut<f32>,
    grads: &CudaView<f32>,
    m: &mut CudaViewMut<f32>,
    v: &mut CudaViewMut<f32>,
    bf16_copy: Option<&mut CudaViewMut<bf16>>,
    hp: &AdamWStep,
) -> Result<()> {
    let len = params.len();
    ensure_len("grads", grads.len(), len)?;
    ensure_len("exp_avg", m.len(), len)?;
    ensure_len("exp_avg_sq", v.len(), len)?;
    let s = hp.scalars()?;
    let n = len as i64;
    let name = if bf16_copy.is_some() {
        "adamw_step_bf16copy"
    } else {
        "adamw_step"
    };
    let f = dev.function("adamw", name)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(params).arg(grads).arg(m).arg(v);
    if let Some(c) = bf16_copy {
        ensure_len("bf16_copy", c.len(), len)?;
        b.arg(c);
    }
    b.arg(&n)
        .arg(&s.decay)
        .arg(&s.one_minus_beta1)
        .arg(&s.beta2)
        .arg(&s.one_minus_beta2)
        .arg(&s.step_size)
        .arg(&s.bc2_sqrt)
        .arg(&s.eps);
    unsafe { b.launch(cfg_elementwise(len)) }?;
    Ok(())
}

/// CPU Σ x² over all `buffers`, accumulated in f64.
pub fn sum_squares_cpu(buffers: &[&[f32]]) -> f64 {
    buffers
        .iter()
        .map(|b| b.par_iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .sum()
}

/// Blocks of the CUDA sum-of-squares: a fixed count, so the partition (and the result) does
/// not depend on the GPU.
const NORM_BLOCKS: usize = 256;

/// CUDA Σ x² over all `buffers`: per-block f32 partials, summed in f64 on the host in a fixed
/// order. Synchronises the stream (the norm is a logged metric anyway).
pub fn sum_squares_cuda(dev: &CudaDevice, buffers: &[&CudaView<f32>]) -> Result<f64> {
    if buffers.is_empty() {
        return Ok(0.0);
    }
    let s = dev.stream();
    let mut partials = s.alloc_zeros::<f32>(NORM_BLOCKS * buffers.len())?;
    let f = dev.function("adamw", "sum_squares_partial")?;
    for (i, x) in buffers.iter().enumerate() {
        let n = x.len() as i64;
        let mut out = partials.slice_mut(i * NORM_BLOCKS..(i + 1) * NORM_BLOCKS);
        let mut b = s.launch_builder(&f);
        b.arg(*x).arg(&n).arg(&mut out);
        unsafe { b.launch(cfg((NORM_BLOCKS as u32, 1, 1), (256, 1, 1))) }?;
    }
    let host = s.clone_dtoh(&partials)?;
    Ok(host.iter().map(|&p| p as f64).sum())
}

/// CPU `x *= s`.
pub fn scale_cpu(x: &mut [f32], s: f32) {
    x.par_iter_mut().for_each(|v| *v *= s);
}

/// CUDA `x *= s`.
pub fn scale_cuda(dev: &CudaDevice, x: &mut CudaViewMut<f32>, s: f32) -> Result<()> {
    let len = x.len();
    let n = len as i64;
    let f = dev.function("adamw", "scale_inplace")?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(&n).arg(&s);
    unsafe { b.launch(cfg_elementwise(len)) }?;
    Ok(())
}
