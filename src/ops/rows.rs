//! Row gathers and scatters by an index list, and the per-row argmax and mean of logits: the glue
//! of a chunked LM head that projects only the rows with a target.
//!
//! - Gather: `dst[i, :] = src[idx[i], :]` (the hidden states of the target rows, once per forward).
//! - Scatter: `dst[idx[i], :] = src[i, :]` with distinct indices (their gradients back into the
//!   full `[N, C]` layout; rows not listed are left as they are, so the caller zeroes first).
//! - Argmax/mean: per row of `[R, V]` logits, the first index of the maximum (`torch.argmax`;
//!   NaN never wins, a row with nothing above −∞ gives 0) and `Σ_v x_v / V` accumulated in f64 —
//!   TRL's `mean_token_accuracy` and `logits/chosen|rejected` need exactly these two numbers.
//!
//! Indices are checked on the host (range, and distinctness for the scatter) before any launch,
//! so the kernels never address memory outside the buffers.

use super::support::{cfg, dim_i32, ensure_len, GpuElem};
use crate::device::CudaDevice;
use crate::dtype::Elem;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use rayon::prelude::*;

/// Threads per block of the argmax/mean kernel (fixed by `kernels/rows.cu`).
const ARGMAX_THREADS: u32 = 256;

/// Fails unless every index is below `rows` (and, for a scatter, distinct), naming the list.
pub fn check_indices(name: &str, idx: &[u32], rows: usize, distinct: bool) -> Result<()> {
    if let Some((i, &r)) = idx.iter().enumerate().find(|(_, &r)| r as usize >= rows) {
        anyhow::bail!("{name}[{i}] = {r} is outside the {rows} rows");
    }
    if distinct {
        let mut seen = vec![false; rows];
        for (i, &r) in idx.iter().enumerate() {
            ensure!(!seen[r as usize], "{name}[{i}] = {r} repeats an earlier index");
            seen[r as usize] = true;
        }
    }
    Ok(())
}

fn rows_of(name: &str, len: usize, c: usize) -> Result<usize> {
    ensure!(c > 0, "{name}: row width must be positive");
    ensure!(
        len.is_multiple_of(c),
        "{name}: {len} elements is not a whole number of rows of {c}"
    );
    Ok(len / c)
}

/// CPU gather: `dst[i, :] = src[idx[i], :]`, `dst` is `[idx.len(), c]`.
pub fn gather_cpu<T: Elem>(src: &[T], idx: &[u32], c: usize, dst: &mut [T]) -> Result<()> {
    let rows = rows_of("src", src.len(), c)?;
    ensure_len("dst", dst.len(), idx.len() * c)?;
    check_indices("idx", idx, rows, false)?;
    dst.par_chunks_mut(c)
        .zip(idx.par_iter())
        .for_each(|(d, &r)| d.copy_from_slice(&src[r as usize * c..][..c]));
    Ok(())
}

/// CPU scatter: `dst[idx[i], :] = src[i, :]` for distinct `idx`; other rows of `dst` unchanged.
pub fn scatter_cpu<T: Elem>(src: &[T], idx: &[u32], c: usize, dst: &mut [T]) -> Result<()> {
    let rows = rows_of("dst", dst.len(), c)?;
    ensure_len("src", src.len(), idx.len() * c)?;
    check_indices("idx", idx, rows, true)?;
    for (i, &r) in idx.iter().enumerate() {
        dst[r as usize * c..][..c].copy_from_slice(&src[i * c..][..c]);
    }
    Ok(())
}

/// CPU argmax (first maximum) and f64-accumulated mean of each row of `[rows, vocab]` logits.
pub fn argmax_mean_cpu<T: Elem>(logits: &[T], vocab: usize, argmax: &mut [u32], mean: &mut [f32]) -> Result<()> {
    let rows = rows_of("logits", logits.len(), vocab)?;
    ensure_len("argmax", argmax.len(), rows)?;
    ensure_len("mean", mean.len(), rows)?;
    argmax
        .par_iter_mut()
        .zip(mean.par_iter_mut())
        .zip(logits.par_chunks(vocab))
        .for_each(|((a, m), row)| {
            let (mut best, mut arg, mut sum) = (f32::NEG_INFINITY, 0u32, 0f64);
            for (i, x) in row.iter().enumerate() {
                let x = x.to_f32();
                if x > best {
                    best = x;
                    arg = i as u32;
                }
                sum += x as f64;
            }
            *a = arg;
            *m = (sum / vocab as f64) as f32;
        });
    Ok(())
}

fn row_cfg(n: usize, c: usize) -> cudarc::driver::LaunchConfig {
    cfg((n as u32, 1, 1), (256.min(c.next_multiple_of(32)) as u32, 1, 1))
}

/// CUDA [`gather_cpu`]. `idx` lives on the device: the caller checks it on the host with
/// [`check_indices`] against `src`'s rows before uploading (the launcher cannot read it).
pub fn gather_cuda<T: GpuElem>(
    dev: &CudaDevice,
    src: &CudaView<T>,
    idx: &CudaView<u32>,
    c: usize,
    dst: &mut CudaViewMut<T>,
) -> Result<()> {
    rows_of("src", src.len(), c)?;
    ensure_len("dst", dst.len(), idx.len() * c)?;
    let (n_i, c_i) = (dim_i32("rows", idx.len())?, dim_i32("C", c)?);
    if idx.is_empty() {
        return Ok(());
    }
    let f = dev.function("rows", &format!("gather_rows_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(src).arg(idx).arg(dst).arg(&n_i).arg(&c_i);
    // SAFETY: argument order and types match `gather_rows_*`; lengths checked above, indices by
    // the caller.
    unsafe { b.launch(row_cfg(idx.len(), c)) }?;
    Ok(())
}

/// CUDA [`scatter_cpu`]. The caller checks `idx` with [`check_indices`] (`distinct = true`)
/// against `dst`'s rows before uploading.
pub fn scatter_cuda<T: GpuElem>(
    dev: &CudaDevice,
    src: &CudaView<T>,
    idx: &CudaView<u32>,
    c: usize,
    dst: &mut CudaViewMut<T>,
) -> Result<()> {
    rows_of("dst", dst.len(), c)?;
    ensure_len("src", src.len(), idx.len() * c)?;
    let (n_i, c_i) = (dim_i32("rows", idx.len())?, dim_i32("C", c)?);
    if idx.is_empty() {
        return Ok(());
    }
    let f = dev.function("rows", &format!("scatter_rows_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(src).arg(idx).arg(dst).arg(&n_i).arg(&c_i);
    // SAFETY: argument order and types match `scatter_rows_*`; lengths checked above, indices
    // (range and distinctness) by the caller.
    unsafe { b.launch(row_cfg(idx.len(), c)) }?;
    Ok(())
}

/// CUDA [`argmax_mean_cpu`]: one block per row.
pub fn argmax_mean_cuda<T: GpuElem>(
    dev: &CudaDevice,
    logits: &CudaView<T>,
    vocab: usize,
    argmax: &mut CudaViewMut<u32>,
    mean: &mut CudaViewMut<f32>,
) -> Result<()> {
    let rows = rows_of("logits", logits.len(), vocab)?;
    ensure_len("argmax", argmax.len(), rows)?;
    ensure_len("mean", mean.len(), rows)?;
    let v_i = dim_i32("vocab", vocab)?;
    dim_i32("rows", rows)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.function("rows", &format!("row_argmax_mean_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(logits).arg(&v_i).arg(argmax).arg(mean);
    // SAFETY: argument order and types match `row_argmax_mean_*`; the block size is the kernel's
    // AM_THREADS (its shared arrays and tree reduction assume exactly that many threads).
    unsafe { b.launch(cfg((rows as u32, 1, 1), (ARGMAX_THREADS, 1, 1))) }?;
    Ok(())
}
