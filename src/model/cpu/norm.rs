//! LayerNorm (GPT-2) and RMSNorm (Llama family) over rows of width `C`, forward and backward.
//!
//! Statistics are accumulated in f64 per row (C is small, the cost is nil) and saved per row
//! (`mean`, `rstd`) for the backward, as llm.c does; the normalised input is recomputed from the
//! saved residual rather than stored a second time.

use super::reduce::{add_column_sums, par_row_sum};
use rayon::prelude::*;

/// `out = (x − μ)·rstd·w + b` per row; saves `mean` and `rstd` (one per row).
pub fn layernorm_forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
) {
    let c = w.len();
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((o, xr), (m, r))| {
            let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
            let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
            let rs = 1.0 / (var + eps as f64).sqrt();
            for j in 0..c {
                o[j] = ((xr[j] as f64 - mu) * rs) as f32 * w[j] + b[j];
            }
            *m = mu as f32;
            *r = rs as f32;
        });
}

/// Backward of [`layernorm_forward`]: `dx += ∂L/∂x`, `dw += Σ_rows dout·x̂`, `db += Σ_rows dout`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dout: &[f32],
    x: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    let n = mean.len();
    par_row_sum(n, c, dw, |r, acc| {
        let (d, xr) = (&dout[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
        for j in 0..c {
            acc[j] += d[j] * (xr[j] - mean[r]) * rstd[r];
        }
    });
    add_column_sums(dout, db);
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dxr)| {
        let (d, xr) = (&dout[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
        let (mu, rs) = (mean[r], rstd[r]);
        // dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with g = dout·w.
        let (mut sg, mut sgx) = (0f64, 0f64);
        for j in 0..c {
            let g = (d[j] * w[j]) as f64;
            sg += g;
            sgx += g * ((xr[j] - mu) * rs) as f64;
        }
        let (mg, mgx) = ((sg / c as f64) as f32, (sgx / c as f64) as f32);
        for j in 0..c {
            let xhat = (xr[j] - mu) * rs;
            dxr[j] += rs * (d[j] * w[j] - mg - xhat * mgx);
        }
    });
}

/// `out = w · x·rstd`, `rstd = 1/√(mean(x²) + ε)` per row (transformers' `LlamaRMSNorm`).
pub fn rmsnorm_forward(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], rstd: &mut [f32]) {
    let c = w.len();
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .zip(rstd.par_iter_mut())
        .for_each(|((o, xr), r)| {
            let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / c as f64;
            let rs = (1.0 / (ms + eps as f64).sqrt()) as f32;
            for j in 0..c {
                o[j] = w[j] * (xr[j] * rs);
            }
            *r = rs;
        });
}

/// Backward of [`rmsnorm_forward`]: `dx += ∂L/∂x`, `dw += Σ_rows dout·x·rstd`.
pub fn rmsnorm_backward(dout: &[f32], x: &[f32], w: &[f32], rstd: &[f32], dx: &mut [f32], dw: &mut [f32]) {
    let c = w.len();
    par_row_sum(rstd.len(), c, dw, |r, acc| {
        let (d, xr) = (&dout[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
        for j in 0..c {
            acc[j] += d[j] * xr[j] * rstd[r];
        }
    });
    dx.par_chunks_mut(c).enumerate().for_each(|(r, dxr)| {
        let (d, xr) = (&dout[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
        let rs = rstd[r];
        // dx = rstd·g − x·rstd³·mean(g·x) with g = dout·w.
        let sgx: f64 = (0..c).map(|j| (d[j] * w[j] * xr[j]) as f64).sum();
        let k = (sgx / c as f64) as f32 * rs * rs * rs;
        for j in 0..c {
            dxr[j] += rs * d[j] * w[j] - xr[j] * k;
        }
    });
}
