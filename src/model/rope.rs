//! Rotary position tables, backend independent: `cos`/`sin` of `pos · inv_freq_i` for
//! `i < head_dim/2`, in the `rotate_half` convention (pairs `(i, i + head_dim/2)`).
//!
//! The inverse frequencies are computed in f32 the way transformers does
//! (`1 / θ^(2i/d)` with an f32 exponent, then `pos · inv_freq` in f32), so positions far from 0
//! round exactly like the reference.

use super::config::{Rope, RopeScaling};

/// `cos`/`sin` tables `[positions, head_dim/2]`, row-major.
#[derive(Clone, Debug)]
pub struct RopeTable {
    /// Half the head width (number of rotated pairs).
    pub half: usize,
    /// `cos(pos · inv_freq_i)`.
    pub cos: Vec<f32>,
    /// `sin(pos · inv_freq_i)`.
    pub sin: Vec<f32>,
}

impl RopeTable {
    /// Tables for positions `0..positions`.
    pub fn new(rope: &Rope, head_dim: usize, positions: usize) -> Self {
        let inv = inv_freq(rope, head_dim);
        let half = inv.len();
        let mut cos = Vec::with_capacity(positions * half);
        let mut sin = Vec::with_capacity(positions * half);
        for p in 0..positions {
            for &f in &inv {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates one head vector `x` (length `2·half`) to position `pos`, or back (`inverse`,
    /// which is the backward: the rotation is orthogonal, so its gradient is the transpose).
    pub fn rotate(&self, x: &mut [f32], pos: usize, inverse: bool) {
        let (c, s) = (
            &self.cos[pos * self.half..][..self.half],
            &self.sin[pos * self.half..][..self.half],
        );
        let (lo, hi) = x.split_at_mut(self.half);
        for i in 0..self.half {
            let (x1, x2) = (lo[i], hi[i]);
            let si = if inverse { -s[i] } else { s[i] };
            lo[i] = x1 * c[i] - x2 * si;
            hi[i] = x2 * c[i] + x1 * si;
        }
    }
}

/// `inv_freq_i = θ^(−2i/d)`, then the checkpoint's scaling rule.
pub fn inv_freq(rope: &Rope, head_dim: usize) -> Vec<f32> {
    let base = rope.theta as f32;
    let plain = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / head_dim as f32));
    match rope.scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => plain
            .map(|f| {
                // transformers `_compute_llama3_parameters`.
                let f = f as f64;
                let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                let wavelen = 2.0 * std::f64::consts::PI / f;
                let scaled = if wavelen > low_wl { f / factor } else { f };
                let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                let medium = wavelen >= high_wl && wavelen <= low_wl;
                (if medium {
                    (1.0 - smooth) * scaled / factor + smooth * scaled
                } else {
                    scaled
                }) as f32
            })
            .collect(),
    }
}
