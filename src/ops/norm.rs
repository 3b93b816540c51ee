//! LayerNorm (GPT-2) and RMSNorm (Llama/Qwen2) over the last dimension of `[N, C]` activations.
//!
//! Statistics and parameters are fp32; activations are stored as `T`.
//! - LayerNorm: `y = (x − μ)·rstd·w + b`, `rstd = 1/sqrt(var + eps)` with the biased variance
//!   (two passes: mean, then centred squares).
//! - RMSNorm (HF `LlamaRMSNorm`): `y = w · to_T((x·rstd))`, `rstd = 1/sqrt(mean(x²) + eps)`: the
//!   normalised value is rounded to the storage type *before* the weight multiply, as HF casts
//!   back to the input dtype first (a no-op for f32). The backward treats that rounding as the
//!   identity, but `dw` uses the rounded value, matching what the forward multiplied.
//!
//! The forward saves `mean` (LayerNorm) and `rstd` per row for the backward. The backward
//! overwrites `dx` and *accumulates* into `dw`/`db` (so micro-batches add up; zero them first).
//! On CUDA `dw`/`db` are reduced across rows by a fixed-order column sum (no atomics).

use super::support::{cfg, dim_i32, ensure_len, GpuElem};
use crate::device::CudaDevice;
use crate::dtype::Elem;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use rayon::prelude::*;

/// Checks `x` against `[rows, c]`, returns rows.
fn rows_of(name: &str, len: usize, c: usize) -> Result<usize> {
    ensure!(c > 0, "{name}: normalised width must be positive");
    ensure!(
        len.is_multiple_of(c),
        "{name}: {len} elements is not a whole number of rows of {c}"
    );
    Ok(len / c)
}

fn check_params(w: usize, b: Option<usize>, c: usize) -> Result<()> {
    ensure_len("weight", w, c)?;
    if let Some(b) = b {
        ensure_len("bias", b, c)?;
    }
    Ok(())
}

/// CPU LayerNorm forward: fills `y` `[N, C]`, `mean` and `rstd` `[N]`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_cpu<T: Elem>(
    x: &[T],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    c: usize,
    y: &mut [T],
    mean: &mut [f32],
    rstd: &mut [f32],
) -> Result<()> {
    let n = rows_of("x", x.len(), c)?;
    check_params(weight.len(), Some(bias.len()), c)?;
    ensure_len("y", y.len(), x.len())?;
    ensure_len("mean", mean.len(), n)?;
    ensure_len("rstd", rstd.len(), n)?;
    y.par_chunks_mut(c)
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .enumerate()
        .for_each(|(r, (yr, (mu, rs)))| {
            let xr = &x[r * c..][..c];
            let m = xr.iter().map(|v| v.to_f32()).sum::<f32>() / c as f32;
            let var = xr.iter().map(|v| (v.to_f32() - m).powi(2)).sum::<f32>() / c as f32;
            let s = 1.0 / (var + eps).sqrt();
            for (j, o) in yr.iter_mut().enumerate() {
                *o = T::from_f32((xr[j].to_f32() - m) * s * weight[j] + bias[j]);
            }
            *mu = m;
            *rs = s;
        });
    Ok(())
}

/// CPU RMSNorm forward: fills `y` `[N, C]` and `rstd` `[N]`.
pub fn rmsnorm_forward_cpu<T: Elem>(
    x: &[T],
    weight: &[f32],
    eps: f32,
    c: usize,
    y: &mut [T],
    rstd: &mut [f32],
) -> Result<()> {
    let n = rows_of("x", x.len(), c)?;
    check_params(weight.len(), None, c)?;
    ensure_len("y", y.len(), x.len())?;
    ensure_len("rstd", rstd.len(), n)?;
    y.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .enumerate()
        .for_each(|(r, (yr, rs))| {
            let xr = &x[r * c..][..c];
            let ms = xr.iter().map(|v| v.to_f32().powi(2)).sum::<f32>() / c as f32;
            let s = 1.0 / (ms + eps).sqrt();
            for (j, o) in yr.iter_mut().enumerate() {
                *o = T::from_f32(weight[j] * T::from_f32(xr[j].to_f32() * s).to_f32());
            }
            *rs = s;
        });
    Ok(())
}

/// Shared CPU backward: `mean` is `None` for RMSNorm, `db` is `None` for RMSNorm.
#[allow(clippy::too_many_arguments)]
fn backward_cpu<T: Elem>(
    dy: &[T],
    x: &[T],
    weight: &[f32],
    mean: Option<&[f32]>,
    rstd: &[f32],
    c: usize,
    dx: &mut [T],
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) -> Result<()> {
    let n = rows_of("x", x.len(), c)?;
    ensure_len("dy", dy.len(), x.len())?;
    ensure_len("dx", dx.len(), x.len())?;
    check_params(weight.len(), None, c)?;
    ensure_len("dweight", dw.len(), c)?;
    if let Some(m) = mean {
        ensure_len("mean", m.len(), n)?;
    }
    ensure_len("rstd", rstd.len(), n)?;
    let rms = mean.is_none();
    let xhat = |r: usize, j: usize| {
        let v = (x[r * c + j].to_f32() - mean.map_or(0.0, |m| m[r])) * rstd[r];
        if rms {
            T::from_f32(v).to_f32()
        } else {
            v
        }
    };
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dxr)| {
        let (mu, rs) = (mean.map_or(0.0, |m| m[r]), rstd[r]);
        let (mut s1, mut s2) = (0f32, 0f32);
        for j in 0..c {
            let g = dy[r * c + j].to_f32() * weight[j];
            s1 += g;
            s2 += g * (x[r * c + j].to_f32() - mu) * rs;
        }
        let m1 = if rms { 0.0 } else { s1 / c as f32 };
        let m2 = s2 / c as f32;
        for (j, o) in dxr.iter_mut().enumerate() {
            let g = dy[r * c + j].to_f32() * weight[j];
            let xh = (x[r * c + j].to_f32() - mu) * rs;
            *o = T::from_f32(rs * (g - m1 - xh * m2));
        }
    });
    dw.par_iter_mut().enumerate().for_each(|(j, w)| {
        *w += (0..n).map(|r| dy[r * c + j].to_f32() * xhat(r, j)).sum::<f32>();
    });
    if let Some(db) = db {
        ensure_len("dbias", db.len(), c)?;
        db.par_iter_mut().enumerate().for_each(|(j, b)| {
            *b += (0..n).map(|r| dy[r * c + j].to_f32()).sum::<f32>();
        });
    }
    Ok(())
}

/// CPU LayerNorm backward: writes `dx`, accumulates `dweight`, `dbias`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_cpu<T: Elem>(
    dy: &[T],
    x: &[T],
    weight: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
    dx: &mut [T],
    dweight: &mut [f32],
    dbias: &mut [f32],
) -> Result<()> {
    backward_cpu(dy, x, weight, Some(mean), rstd, c, dx, dweight, Some(dbias))
}

/// CPU RMSNorm backward: writes `dx`, accumulates `dweight`.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_cpu<T: Elem>(
    dy: &[T],
    x: &[T],
    weight: &[f32],
    rstd: &[f32],
    c: usize,
    dx: &mut [T],
    dweight: &mut [f32],
) -> Result<()> {
    backward_cpu(dy, x, weight, None, rstd, c, dx, dweight, None)
}

fn row_cfg(n: usize, c: usize) -> cudarc::driver::LaunchConfig {
    cfg((n as u32, 1, 1), (256.min(c.next_multiple_of(32)) as u32, 1, 1))
}

fn col_cfg(c: usize) -> cudarc::driver::LaunchConfig {
    cfg((c.div_ceil(32) as u32, 1, 1), (32, 16, 1))
}

/// CUDA LayerNorm forward (same contract as [`layernorm_forward_cpu`]).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    weight: &CudaView<f32>,
    bias: &CudaView<f32>,
    eps: f32,
    c: usize,
    y: &mut CudaViewMut<T>,
    mean: &mut CudaViewMut<f32>,
    rstd: &mut CudaViewMut<f32>,
) -> Result<()> {
    let n = rows_of("x", x.len(), c)?;
    check_params(weight.len(), Some(bias.len()), c)?;
    ensure_len("y", y.len(), x.len())?;
    ensure_len("mean", mean.len(), n)?;
    ensure_len("rstd", rstd.len(), n)?;
    let (n_i, c_i) = (dim_i32("rows", n)?, dim_i32("C", c)?);
    if n == 0 {
        return Ok(());
    }
    let f = dev.function("norm", &format!("layernorm_forward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x)
        .arg(weight)
        .arg(bias)
        .arg(y)
        .arg(mean)
        .arg(rstd)
        .arg(&n_i)
        .arg(&c_i)
        .arg(&eps);
    unsafe { b.launch(row_cfg(n, c)) }?;
    Ok(())
}

/// CUDA RMSNorm forward (same contract as [`rmsnorm_forward_cpu`]).
pub fn rmsnorm_forward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    x: &CudaView<T>,
    weight: &CudaView<f32>,
    eps: f32,
    c: usize,
    y: &mut CudaViewMut<T>,
    rstd: &mut CudaViewMut<f32>,
) -> Result<()> {
    let n = rows_of("x", x.len(), c)?;
    check_params(weight.len(), None, c)?;
    ensure_len("y", y.len(), x.len())?;
    ensure_len("rstd", rstd.len(), n)?;
    let (n_i, c_i) = (dim_i32("rows", n)?, dim_i32("C", c)?);
    if n == 0 {
        return Ok(());
    }
    let f = dev.function("norm", &format!("rmsnorm_forward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x).arg(weight).arg(y).arg(rstd).arg(&n_i).arg(&c_i).arg(&eps);
    unsafe { b.launch(row_cfg(n, c)) }?;
    Ok(())
}

/// CUDA LayerNorm backward (same contract as [`layernorm_backward_cpu`]).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    weight: &CudaView<f32>,
    mean: &CudaView<f32>,
    rstd: &CudaView<f32>,
    c: usize,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
    dbias: &mut CudaViewMut<f32>,
) -> Result<()> {
    let n = rows_of("x", x.len(), c)?;
    ensure_len("dy", dy.len(), x.len())?;
    ensure_len("dx", dx.len(), x.len())?;
    check_params(weight.len(), None, c)?;
    ensure_len("mean", mean.len(), n)?;
    ensure_len("rstd", rstd.len(), n)?;
    ensure_len("dweight", dweight.len(), c)?;
    ensure_len("dbias", dbias.len(), c)?;
    let (n_i, c_i) = (dim_i32("rows", n)?, dim_i32("C", c)?);
    if n == 0 {
        return Ok(());
    }
    let f = dev.function("norm", &format!("layernorm_backward_dx_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(dy)
        .arg(x)
        .arg(weight)
        .arg(mean)
        .arg(rstd)
        .arg(dx)
        .arg(&n_i)
        .arg(&c_i);
    unsafe { b.launch(row_cfg(n, c)) }?;
    let f = dev.function("norm", &format!("layernorm_backward_params_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(dy)
        .arg(x)
        .arg(mean)
        .arg(rstd)
        .arg(dweight)
        .arg(dbias)
        .arg(&n_i)
        .arg(&c_i);
    unsafe { b.launch(col_cfg(c)) }?;
    Ok(())
}

/// CUDA RMSNorm backward (same contract as [`rmsnorm_backward_cpu`]).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    dy: &CudaView<T>,
    x: &CudaView<T>,
    weight: &CudaView<f32>,
    rstd: &CudaView<f32>,
    c: usize,
    dx: &mut CudaViewMut<T>,
    dweight: &mut CudaViewMut<f32>,
) -> Result<()> {
    let n = rows_of("x", x.len(), c)?;
    ensure_len("dy", dy.len(), x.len())?;
    ensure_len("dx", dx.len(), x.len())?;
    check_params(weight.len(), None, c)?;
    ensure_len("rstd", rstd.len(), n)?;
    ensure_len("dweight", dweight.len(), c)?;
    let (n_i, c_i) = (dim_i32("rows", n)?, dim_i32("C", c)?);
    if n == 0 {
        return Ok(());
    }
    let f = dev.function("norm", &format!("rmsnorm_backward_dx_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(dy).arg(x).arg(weight).arg(rstd).arg(dx).arg(&n_i).arg(&c_i);
    unsafe { b.launch(row_cfg(n, c)) }?;
    let f = dev.function("norm", &format!("rmsnorm_backward_params_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(dy).arg(x).arg(rstd).arg(dweight).arg(&n_i).arg(&c_i);
    unsafe { b.launch(col_cfg(c)) }?;
    Ok(())
}
