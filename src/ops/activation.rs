//! Elementwise MLP pieces: `gelu_new` (GPT-2), SwiGLU (Llama/Qwen2), bias add with its gradient,
//! and the residual add. Math in f32, one rounding to the storage type `T` per output.
//!
//! - `gelu_new(x) = 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (HF `NewGELUActivation`).
//! - SwiGLU: `h = silu(gate)·up`, `silu(g) = g·σ(g)` (HF `act_fn(gate_proj(x)) * up_proj(x)`);
//!   `gate` and `up` are separate `[N, I]` buffers (slices of a fused projection work too).
//! - Bias add: `y[n, c] += b[c]` in place; its gradient `db[c] += Σ_n dy[n, c]` accumulates, and on
//!   CUDA is a fixed-order column sum (deterministic).
//! - Residual add: `x += r` in place.
//!
//! Activation gradients are overwritten; parameter gradients (`db`) accumulate.

use super::support::{cfg, cfg_elementwise, dim_i32, ensure_len, GpuElem};
use crate::device::CudaDevice;
use crate::dtype::Elem;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use rayon::prelude::*;

const GELU_K0: f32 = 0.797_884_6; // √(2/π)
const GELU_K1: f32 = 0.044715;

/// `gelu_new(x)`.
pub fn gelu_new(x: f32) -> f32 {
    0.5 * x * (1.0 + (GELU_K0 * (x + GELU_K1 * x * x * x)).tanh())
}

/// d gelu_new / dx.
pub fn gelu_new_grad(x: f32) -> f32 {
    let th = (GELU_K0 * (x + GELU_K1 * x * x * x)).tanh();
    0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * GELU_K0 * (1.0 + 3.0 * GELU_K1 * x * x)
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// CPU `y = gelu_new(x)`.
pub fn gelu_forward_cpu<T: Elem>(x: &[T], y: &mut [T]) -> Result<()> {
    ensure_len("y", y.len(), x.len())?;
    y.par_iter_mut()
        .zip(x.par_iter())
        .for_each(|(y, x)| *y = T::from_f32(gelu_new(x.to_f32())));
    Ok(())
}

/// CPU `dx = dy·gelu_new'(x)`.
pub fn gelu_backward_cpu<T: Elem>(x: &[T], dy: &[T], dx: &mut [T]) -> Result<()> {
    ensure_len("dy", dy.len(), x.len())?;
    ensure_len("dx", dx.len(), x.len())?;
    dx.par_iter_mut()
        .zip(x.par_iter().zip(dy.par_iter()))
        .for_each(|(o, (x, g))| *o = T::from_f32(g.to_f32() * gelu_new_grad(x.to_f32())));
    Ok(())
}

/// CPU `h = silu(gate)·up`.
pub fn swiglu_forward_cpu<T: Elem>(gate: &[T], up: &[T], h: &mut [T]) -> Result<()> {
    ensure_len("up", up.len(), gate.len())?;
    ensure_len("h", h.len(), gate.len())?;
    h.par_iter_mut()
        .zip(gate.par_iter().zip(up.par_iter()))
        .for_each(|(o, (g, u))| {
            let g = g.to_f32();
            *o = T::from_f32(g * sigmoid(g) * u.to_f32());
        });
    Ok(())
}

/// CPU SwiGLU backward: `dgate = dh·up·σ(g)(1 + g(1 − σ(g)))`, `dup = dh·silu(g)`.
pub fn swiglu_backward_cpu<T: Elem>(gate: &[T], up: &[T], dh: &[T], dgate: &mut [T], dup: &mut [T]) -> Result<()> {
    let n = gate.len();
    ensure_len("up", up.len(), n)?;
    ensure_len("dh", dh.len(), n)?;
    ensure_len("dgate", dgate.len(), n)?;
    ensure_len("dup", dup.len(), n)?;
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .enumerate()
        .for_each(|(i, (dg, du))| {
            let (g, u, d) = (gate[i].to_f32(), up[i].to_f32(), dh[i].to_f32());
            let sg = sigmoid(g);
            *dg = T::from_f32(d * u * sg * (1.0 + g * (1.0 - sg)));
            *du = T::from_f32(d * g * sg);
        });
    Ok(())
}

fn check_bias(name: &str, len: usize, bias: usize) -> Result<usize> {
    ensure!(bias > 0, "bias: must have at least one column");
    ensure!(
        len.is_multiple_of(bias),
        "{name}: {len} elements is not a whole number of rows of {bias} (the bias length)"
    );
    Ok(len / bias)
}

/// CPU `y[n, :] += bias` for `y` `[N, C]`, C = `bias.len()`.
pub fn bias_add_cpu<T: Elem>(y: &mut [T], bias: &[f32]) -> Result<()> {
    check_bias("y", y.len(), bias.len())?;
    y.par_chunks_mut(bias.len()).for_each(|r| {
        for (o, b) in r.iter_mut().zip(bias) {
            *o = T::from_f32(o.to_f32() + b);
        }
    });
    Ok(())
}

/// CPU `dbias[c] += Σ_n dy[n, c]`.
pub fn bias_backward_cpu<T: Elem>(dy: &[T], dbias: &mut [f32]) -> Result<()> {
    let c = dbias.len();
    let n = check_bias("dy", dy.len(), c)?;
    dbias.par_iter_mut().enumerate().for_each(|(j, b)| {
        *b += (0..n).map(|r| dy[r * c + j].to_f32()).sum::<f32>();
    });
    Ok(())
}

/// CPU `x += r`.
pub fn residual_add_cpu<T: Elem>(x: &mut [T], r: &[T]) -> Result<()> {
    ensure_len("residual", r.len(), x.len())?;
    x.par_iter_mut()
        .zip(r.par_iter())
        .for_each(|(x, r)| *x = T::from_f32(x.to_f32() + r.to_f32()));
    Ok(())
}

fn n_i64(n: usize) -> i64 {
    n as i64
}

/// CUDA [`gelu_forward_cpu`].
pub fn gelu_forward_cuda<T: GpuElem>(dev: &CudaDevice, x: &CudaView<T>, y: &mut CudaViewMut<T>) -> Result<()> {
    ensure_len("y", y.len(), x.len())?;
    let n = n_i64(x.len());
    let f = dev.function("activation", &format!("gelu_forward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(y).arg(&n);
    unsafe { b.launch(cfg_elementwise(x.len())) }?;
    Ok(())
}

/// CUDA [`gelu_backward_cpu`].
pub fn gelu_backward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    dy: &CudaView<T>,
    dx: &mut CudaViewMut<T>,
) -> Result<()> {
    ensure_len("dy", dy.len(), x.len())?;
    ensure_len("dx", dx.len(), x.len())?;
    let n = n_i64(x.len());
    let f = dev.function("activation", &format!("gelu_backward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(dy).arg(dx).arg(&n);
    unsafe { b.launch(cfg_elementwise(x.len())) }?;
    Ok(())
}

/// CUDA [`swiglu_forward_cpu`].
pub fn swiglu_forward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    gate: &CudaView<T>,
    up: &CudaView<T>,
    h: &mut CudaViewMut<T>,
) -> Result<()> {
    ensure_len("up", up.len(), gate.len())?;
    ensure_len("h", h.len(), gate.len())?;
    let n = n_i64(gate.len());
    let f = dev.function("activation", &format!("swiglu_forward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(gate).arg(up).arg(h).arg(&n);
    unsafe { b.launch(cfg_elementwise(gate.len())) }?;
    Ok(())
}

/// CUDA [`swiglu_backward_cpu`].
pub fn swiglu_backward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    gate: &CudaView<T>,
    up: &CudaView<T>,
    dh: &CudaView<T>,
    dgate: &mut CudaViewMut<T>,
    dup: &mut CudaViewMut<T>,
) -> Result<()> {
    let len = gate.len();
    ensure_len("up", up.len(), len)?;
    ensure_len("dh", dh.len(), len)?;
    ensure_len("dgate", dgate.len(), len)?;
    ensure_len("dup", dup.len(), len)?;
    let n = n_i64(len);
    let f = dev.function("activation", &format!("swiglu_backward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(gate).arg(up).arg(dh).arg(dgate).arg(dup).arg(&n);
    unsafe { b.launch(cfg_elementwise(len)) }?;
    Ok(())
}

/// CUDA [`bias_add_cpu`].
pub fn bias_add_cuda<T: GpuElem>(dev: &CudaDevice, y: &mut CudaViewMut<T>, bias: &CudaView<f32>) -> Result<()> {
    let rows = check_bias("y", y.len(), bias.len())?;
    let (n_i, c_i) = (dim_i32("rows", rows)?, dim_i32("bias length", bias.len())?);
    let total = y.len();
    let f = dev.function("activation", &format!("bias_add_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(y).arg(bias).arg(&n_i).arg(&c_i);
    unsafe { b.launch(cfg_elementwise(total)) }?;
    Ok(())
}

/// CUDA [`bias_backward_cpu`] (deterministic column sum).
pub fn bias_backward_cuda<T: GpuElem>(dev: &CudaDevice, dy: &CudaView<T>, dbias: &mut CudaViewMut<f32>) -> Result<()> {
    let c = dbias.len();
    let rows = check_bias("dy", dy.len(), c)?;
    let (n_i, c_i) = (dim_i32("rows", rows)?, dim_i32("bias length", c)?);
    let f = dev.function("activation", &format!("bias_backward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(dy).arg(dbias).arg(&n_i).arg(&c_i);
    unsafe { b.launch(cfg((c.div_ceil(32) as u32, 1, 1), (32, 16, 1))) }?;
    Ok(())
}

/// CUDA [`residual_add_cpu`].
pub fn residual_add_cuda<T: GpuElem>(dev: &CudaDevice, x: &mut CudaViewMut<T>, r: &CudaView<T>) -> Result<()> {
    ensure_len("residual", r.len(), x.len())?;
    let len = x.len();
    let n = n_i64(len);
    let f = dev.function("activation", &format!("residual_add_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(r).arg(&n);
    unsafe { b.launch(cfg_elementwise(len)) }?;
    Ok(())
}
