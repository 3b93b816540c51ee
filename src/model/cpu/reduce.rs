//! Deterministic parallel column sums over rows (bias and norm-weight gradients).
//!
//! Rows are split into fixed blocks, each block is summed on its own thread, and the block partials
//! are added in block order: the result does not depend on thread scheduling, so two runs (and
//! the accumulation tests) see bit-identical gradients.

use rayon::prelude::*;

/// Rows per partial sum.
const BLOCK: usize = 64;

/// `acc += Σ_{r < rows} contribution(r)`, where `f(r, partial)` adds row `r`'s contribution
/// (width `acc.len()`) into `partial`.
pub fn par_row_sum(rows: usize, width: usize, acc: &mut [f32], f: impl Fn(usize, &mut [f32]) + Sync) {
    debug_assert_eq!(acc.len(), width);
    let partials: Vec<Vec<f32>> = (0..rows.div_ceil(BLOCK))
        .into_par_iter()
        .map(|blk| {
            let mut p = vec![0f32; width];
            for r in blk * BLOCK..((blk + 1) * BLOCK).min(rows) {
                f(r, &mut p);
            }
            p
        })
        .collect();
    for p in partials {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
}

/// `acc += Σ_rows x[r, ·]` for a row-major `[rows, acc.len()]` matrix (bias gradients).
pub fn add_column_sums(x: &[f32], acc: &mut [f32]) {
    let w = acc.len();
    par_row_sum(x.len() / w, w, acc, |r, p| {
        for (a, &v) in p.iter_mut().zip(&x[r * w..(r + 1) * w]) {
            *a += v;
        }
    });
}
