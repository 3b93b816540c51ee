//! Causal multi-head attention over packed sequences (grouped-query, optional sliding window).
//!
//! Rows are tokens of several sequences laid end to end (no padding); row `n` attends to rows
//! `start[n] ..= n` of its own sequence (fewer with a window). Only the per-row log-sum-exp of the
//! scores is saved: the backward recomputes the probabilities, so memory stays O(rows·heads)
//! instead of O(rows·T·heads).
//!
//! The backward runs in two passes so that every output row has one writer: dq per query row,
//! then dk/dv per key row (summing over the query heads of its group), with no atomics or locks.

use rayon::prelude::*;

/// Which keys each row sees, and the head geometry.
pub struct Geometry<'a> {
    /// Per row: first row of its sequence.
    pub seq_start: &'a [usize],
    /// Per row: one past the last row of its sequence.
    pub seq_end: &'a [usize],
    /// Query heads `H`.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Head width `d`.
    pub head_dim: usize,
    /// Score multiplier.
    pub scale: f32,
    /// Sliding window: keys with `query − key ≥ window` are masked.
    pub window: Option<usize>,
}

impl Geometry<'_> {
    /// Keys of query row `n`.
    fn keys(&self, n: usize) -> std::ops::Range<usize> {
        let lo = match self.window {
            Some(w) => self.seq_start[n].max((n + 1).saturating_sub(w)),
            None => self.seq_start[n],
        };
        lo..n + 1
    }
    /// Queries that see key row `j`.
    fn queries(&self, j: usize) -> std::ops::Range<usize> {
        let hi = match self.window {
            Some(w) => self.seq_end[j].min(j + w),
            None => self.seq_end[j],
        };
        j..hi
    }
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One query head attending over key rows `keys` of `k`/`v` (row stride `kvw`, head offset
/// `off`): writes `Σ_j softmax_j(scale·q·k_j) v_j` into `oh` and returns the scores' log-sum-exp.
/// The one softmax both the packed and the cached forward use, so they round alike.
#[allow(clippy::too_many_arguments)]
fn attend(
    qh: &[f32],
    k: &[f32],
    v: &[f32],
    keys: std::ops::Range<usize>,
    kvw: usize,
    off: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    oh: &mut [f32],
) -> f32 {
    let d = qh.len();
    scores.clear();
    scores.extend(keys.clone().map(|j| scale * dot(qh, &k[j * kvw + off..][..d])));
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - m).exp();
        sum += *s;
    }
    oh.fill(0.0);
    for (p, j) in scores.iter().zip(keys) {
        for (a, &b) in oh.iter_mut().zip(&v[j * kvw + off..][..d]) {
            *a += p * b;
        }
    }
    let inv = 1.0 / sum;
    oh.iter_mut().for_each(|a| *a *= inv);
    m + sum.ln()
}

/// `out[n, h] = Σ_j softmax_j(scale·q[n,h]·k[j,g]) v[j,g]` with `g = h / group`;
/// `lse[n, h]` = log-sum-exp of the scores. `q`, `out`: `[N, H·d]`; `k`, `v`: `[N, KvH·d]`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], geo: &Geometry, out: &mut [f32], lse: &mut [f32]) {
    let (h_n, d, kvw) = (geo.heads, geo.head_dim, geo.kv_heads * geo.head_dim);
    out.par_chunks_mut(h_n * d)
        .zip(lse.par_chunks_mut(h_n))
        .enumerate()
        .for_each_init(Vec::new, |scores, (n, (o, l))| {
            for h in 0..h_n {
                let qh = &q[n * h_n * d + h * d..][..d];
                let off = h / geo.group() * d;
                let oh = &mut o[h * d..(h + 1) * d];
                l[h] = attend(qh, k, v, geo.keys(n), kvw, off, geo.scale, scores, oh);
            }
        });
}

/// Gradients of [`forward`]: overwrites `dq`, `dk`, `dv` from `dout`; `delta` (`[N, H]`) is scratch.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    geo: &Geometry,
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    delta: &mut [f32],
) {
    let (h_n, d, kvw) = (geo.heads, geo.head_dim, geo.kv_heads * geo.head_dim);
    let qw = h_n * d;
    // delta[n,h] = dout·out = Σ_j p_j (dout·v_j): the softmax backward's row constant.
    delta.par_chunks_mut(h_n).enumerate().for_each(|(n, dl)| {
        for (h, x) in dl.iter_mut().enumerate() {
            *x = dot(&dout[n * qw + h * d..][..d], &out[n * qw + h * d..][..d]);
        }
    });
    let delta = &*delta;
    // dS[n,h,j] = p·(dout[n,h]·v[j] − delta[n,h]); dq[n,h] = scale Σ_j dS k[j].
    dq.par_chunks_mut(qw).enumerate().for_each(|(n, dqr)| {
        dqr.fill(0.0);
        for h in 0..h_n {
            let g = h / geo.group();
            let (qh, doh) = (&q[n * qw + h * d..][..d], &dout[n * qw + h * d..][..d]);
            let dqh = &mut dqr[h * d..(h + 1) * d];
            for j in geo.keys(n) {
                let kj = &k[j * kvw + g * d..][..d];
                let p = (geo.scale * dot(qh, kj) - lse[n * h_n + h]).exp();
                let ds = p * (dot(doh, &v[j * kvw + g * d..][..d]) - delta[n * h_n + h]) * geo.scale;
                for (a, &b) in dqh.iter_mut().zip(kj) {
                    *a += ds * b;
                }
            }
        }
    });
    // dk[j,g] = scale Σ_{n,h∈g} dS q[n,h];  dv[j,g] = Σ_{n,h∈g} p dout[n,h].
    dk.par_chunks_mut(kvw)
        .zip(dv.par_chunks_mut(kvw))
        .enumerate()
        .for_each(|(j, (dkr, dvr))| {
            dkr.fill(0.0);
            dvr.fill(0.0);
            for g in 0..geo.kv_heads {
                let (kj, vj) = (&k[j * kvw + g * d..][..d], &v[j * kvw + g * d..][..d]);
                let (dkh, dvh) = (&mut dkr[g * d..(g + 1) * d], &mut dvr[g * d..(g + 1) * d]);
                for h in g * geo.group()..(g + 1) * geo.group() {
                    for n in geo.queries(j) {
                        let (qh, doh) = (&q[n * qw + h * d..][..d], &dout[n * qw + h * d..][..d]);
                        let p = (geo.scale * dot(qh, kj) - lse[n * h_n + h]).exp();
                        let ds = p * (dot(doh, vj) - delta[n * h_n + h]) * geo.scale;
                        for i in 0..d {
                            dkh[i] += ds * qh[i];
                            dvh[i] += p * doh[i];
                        }
                    }
                }
            }
        });
}

/// Where each new row of an incremental (KV-cached) forward sits: its cache slot range.
///
/// Row `r` is the token at position `pos[r]` of sequence `seq[r]`; its keys are the cache
/// entries `seq[r]·cap + lo ..= seq[r]·cap + pos[r]` (`lo` from the sliding window), which the
/// caller has already written, including those of the same call's earlier rows.
pub struct CachedRows<'a> {
    /// Sequence of each new row.
    pub seq: &'a [usize],
    /// Position of each new row in its sequence.
    pub pos: &'a [usize],
    /// Cache slots per sequence.
    pub cap: usize,
}

/// The decode-time twin of [`forward`]: `out[r, h]` attends over the cached keys/values of its
/// own sequence instead of over packed rows. Same numerics (f32 scores, max-subtracted softmax,
/// one division at the end), so a cached generation reproduces the full forward's logits.
pub fn forward_cached(q: &[f32], k_cache: &[f32], v_cache: &[f32], rows: &CachedRows, geo: &Geometry, out: &mut [f32]) {
    let (h_n, d, kvw) = (geo.heads, geo.head_dim, geo.kv_heads * geo.head_dim);
    out.par_chunks_mut(h_n * d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (r, o)| {
            let (t, base) = (rows.pos[r], rows.seq[r] * rows.cap);
            let lo = geo.window.map_or(0, |w| (t + 1).saturating_sub(w));
            for h in 0..h_n {
                let qh = &q[r * h_n * d + h * d..][..d];
                let off = h / geo.group() * d;
                let oh = &mut o[h * d..(h + 1) * d];
                attend(
                    qh,
                    k_cache,
                    v_cache,
                    base + lo..base + t + 1,
                    kvw,
                    off,
                    geo.scale,
                    scores,
                    oh,
                );
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::attention::{decode_cpu, DecodeShape};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The op twin the CUDA decode kernel is checked against computes bitwise what this engine's
    /// cached attention computes: GQA, ragged rows of several sequences in one call, a one-row
    /// call, and sliding windows shorter and longer than the rows' histories.
    #[test]
    fn decode_op_twin_is_the_engines_cached_attention() {
        let (batch, cap, heads, kv_heads, head_dim) = (3, 9, 4, 2, 6);
        let mut rng = StdRng::seed_from_u64(5);
        let mut randn = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-2.0f32..2.0)).collect() };
        let kvw = kv_heads * head_dim;
        let (k, v) = (randn(batch * cap * kvw), randn(batch * cap * kvw));
        let ragged: Vec<(usize, usize)> = (0..5)
            .map(|t| (0, t))
            .chain((3..9).map(|t| (2, t)))
            .chain([(1, 8)])
            .collect();
        for rows in [vec![(1, 0)], vec![(2, 8)], ragged] {
            let q = randn(rows.len() * heads * head_dim);
            let (seq, pos): (Vec<usize>, Vec<usize>) = rows.iter().copied().unzip();
            for window in [None, Some(1), Some(3), Some(20)] {
                let geo = Geometry {
                    seq_start: &[],
                    seq_end: &[],
                    heads,
                    kv_heads,
                    head_dim,
                    scale: 0.37,
                    window,
                };
                let cached = CachedRows {
                    seq: &seq,
                    pos: &pos,
                    cap,
                };
                let mut want = vec![0f32; q.len()];
                forward_cached(&q, &k, &v, &cached, &geo, &mut want);
                let shape = DecodeShape {
                    rows: rows.len(),
                    batch,
                    capacity: cap,
                    heads_q: heads,
                    heads_kv: kv_heads,
                    head_dim,
                    scale: 0.37,
                    window,
                };
                let (seq32, pos32): (Vec<u32>, Vec<u32>) = rows.iter().map(|&(b, t)| (b as u32, t as u32)).unzip();
                let mut got = vec![f32::NAN; q.len()];
                decode_cpu(shape, &q, &k, &v, &seq32, &pos32, &mut got).unwrap();
                assert_eq!(got, want, "{} rows, window {window:?}", rows.len());
            }
        }
    }
}
