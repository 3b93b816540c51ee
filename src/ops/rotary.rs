//! Rotary position embeddings in the HF `rotate_half` convention, applied in place.
//!
//! For each row `x` of head_dim D (q laid out `[N, Hq, D]`, k `[N, Hkv, D]`) at token position p,
//! pairs `(i, i + D/2)` rotate by `a = p·inv_freq[i]` (one f32 product, as HF's
//! `inv_freq.float() @ position_ids.float()`):
//! `x1' = x1·cos a − x2·sin a`, `x2' = x2·cos a + x1·sin a` (= `x·cos + rotate_half(x)·sin`).
//! The backward is the rotation by `−a`, also in place on `dq`/`dk`.
//! `inv_freq` (length D/2) is computed on the host: [`default_inv_freq`] for `rope_type
//! "default"`, [`llama3_inv_freq`] for Llama-3 `rope_scaling`. The rotation is done in f32 and
//! rounded once to the storage type (HF in bf16 rounds cos/sin and each product separately).

use super::support::{cfg_elementwise, dim_i32, ensure_len, GpuElem};
use crate::device::CudaDevice;
use crate::dtype::Elem;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, PushKernelArg};
use rayon::prelude::*;

/// HF default `inv_freq_i = 1 / θ^(2i/D)`, the exponent rounded to f32 as torch does.
pub fn default_inv_freq(theta: f64, head_dim: usize) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| {
            let e = ((2 * i) as f32 / head_dim as f32) as f64;
            (1.0 / theta.powf(e)) as f32
        })
        .collect()
}

/// HF `_compute_llama3_parameters`: long wavelengths divided by `factor`, short ones kept, the
/// band between smoothly interpolated.
pub fn llama3_inv_freq(
    theta: f64,
    head_dim: usize,
    factor: f64,
    low_freq_factor: f64,
    high_freq_factor: f64,
    original_max_position_embeddings: f64,
) -> Vec<f32> {
    let low_wavelen = original_max_position_embeddings / low_freq_factor;
    let high_wavelen = original_max_position_embeddings / high_freq_factor;
    default_inv_freq(theta, head_dim)
        .into_iter()
        .map(|f| {
            let f = f as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let scaled = if wavelen > low_wavelen { f / factor } else { f };
            let medium = (high_wavelen..=low_wavelen).contains(&wavelen);
            let out = if medium {
                let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            };
            out as f32
        })
        .collect()
}

fn check(name: &str, len: usize, positions: usize, heads: usize, head_dim: usize, inv_freq: usize) -> Result<()> {
    ensure!(
        head_dim > 0 && head_dim.is_multiple_of(2),
        "{name}: head_dim {head_dim} must be even and positive"
    );
    ensure_len("inv_freq", inv_freq, head_dim / 2)?;
    ensure_len(name, len, positions * heads * head_dim)
}

fn rotate_cpu<T: Elem>(x: &mut [T], positions: &[u32], inv_freq: &[f32], heads: usize, head_dim: usize, sign: f32) {
    let half = head_dim / 2;
    x.par_chunks_mut(heads * head_dim)
        .zip(positions.par_iter())
        .for_each(|(tok, &p)| {
            for i in 0..half {
                let (s, c) = (p as f32 * inv_freq[i]).sin_cos();
                let s = s * sign;
                for row in tok.chunks_mut(head_dim) {
                    let (x1, x2) = (row[i].to_f32(), row[i + half].to_f32());
                    row[i] = T::from_f32(x1 * c - x2 * s);
                    row[i + half] = T::from_f32(x2 * c + x1 * s);
                }
            }
        });
}

/// CPU forward: rotates `q` `[N, heads_q, D]` and `k` `[N, heads_kv, D]` in place;
/// `positions` has one entry per token (N).
pub fn forward_cpu<T: Elem>(
    q: &mut [T],
    k: &mut [T],
    positions: &[u32],
    inv_freq: &[f32],
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
) -> Result<()> {
    check("q", q.len(), positions.len(), heads_q, head_dim, inv_freq.len())?;
    check("k", k.len(), positions.len(), heads_kv, head_dim, inv_freq.len())?;
    rotate_cpu(q, positions, inv_freq, heads_q, head_dim, 1.0);
    rotate_cpu(k, positions, inv_freq, heads_kv, head_dim, 1.0);
    Ok(())
}

/// CPU backward: rotates `dq`, `dk` by −angle in place (same shapes as [`forward_cpu`]).
pub fn backward_cpu<T: Elem>(
    dq: &mut [T],
    dk: &mut [T],
    positions: &[u32],
    inv_freq: &[f32],
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
) -> Result<()> {
    check("dq", dq.len(), positions.len(), heads_q, head_dim, inv_freq.len())?;
    check("dk", dk.len(), positions.len(), heads_kv, head_dim, inv_freq.len())?;
    rotate_cpu(dq, positions, inv_freq, heads_q, head_dim, -1.0);
    rotate_cpu(dk, positions, inv_freq, heads_kv, head_dim, -1.0);
    Ok(())
}

fn rotate_cuda<T: GpuElem>(
    dev: &CudaDevice,
    x: &mut CudaViewMut<T>,
    positions: &CudaView<u32>,
    inv_freq: &CudaView<f32>,
    heads: usize,
    head_dim: usize,
    sign: f32,
) -> Result<()> {
    let n = positions.len();
    let (n_i, h_i, d_i) = (
        dim_i32("tokens", n)?,
        dim_i32("heads", heads)?,
        dim_i32("head_dim", head_dim)?,
    );
    if n * heads == 0 {
        return Ok(());
    }
    let f = dev.function("rotary", &format!("rotary_apply_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(x)
        .arg(positions)
        .arg(inv_freq)
        .arg(&n_i)
        .arg(&h_i)
        .arg(&d_i)
        .arg(&sign);
    unsafe { b.launch(cfg_elementwise(n * heads * head_dim / 2)) }?;
    Ok(())
}

/// CUDA forward (same contract as [`forward_cpu`]).
#[allow(clippy::too_many_arguments)]
pub fn forward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    q: &mut CudaViewMut<T>,
    k: &mut CudaViewMut<T>,
    positions: &CudaView<u32>,
    inv_freq: &CudaView<f32>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
) -> Result<()> {
    check("q", q.len(), positions.len(), heads_q, head_dim, inv_freq.len())?;
    check("k", k.len(), positions.len(), heads_kv, head_dim, inv_freq.len())?;
    rotate_cuda(dev, q, positions, inv_freq, heads_q, head_dim, 1.0)?;
    rotate_cuda(dev, k, positions, inv_freq, heads_kv, head_dim, 1.0)
}

/// CUDA backward (same contract as [`backward_cpu`]).
#[allow(clippy::too_many_arguments)]
pub fn backward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    dq: &mut CudaViewMut<T>,
    dk: &mut CudaViewMut<T>,
    positions: &CudaView<u32>,
    inv_freq: &CudaView<f32>,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
) -> Result<()> {
    check("dq", dq.len(), positions.len(), heads_q, head_dim, inv_freq.len())?;
    check("dk", dk.len(), positions.len(), heads_kv, head_dim, inv_freq.len())?;
    rotate_cuda(dev, dq, positions, inv_freq, heads_q, head_dim, -1.0)?;
    rotate_cuda(dev, dk, positions, inv_freq, heads_kv, head_dim, -1.0)
}
