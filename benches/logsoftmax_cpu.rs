//! CPU twin of the fused log-softmax + gather: forward, in-place backward and the one-call
//! forward + backward, throughput in logit bytes (forward reads R·V·sizeof once; the backward
//! reads and writes them; forward + backward reads twice and writes once).
//!
//! Two references run in the same group so every number has its context: `copy` (a parallel
//! memcpy of the logits: the bandwidth ceiling a one-pass forward can approach; its throughput
//! counts read + write) and `unfused_forward` (what a framework does without fusion: materialise
//! the full f32 log-softmax, then gather; counts the logits read plus the R·V·4 bytes written).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use half::bf16;
use irbridge::dtype::Elem;
use irbridge::ops::logsoftmax::{backward_cpu, forward_backward_cpu, forward_cpu, ForwardOut, IGNORE_INDEX};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;

const SHAPES: [(usize, usize); 3] = [(8, 50257), (32, 32003), (256, 1000)];

fn inputs<T: Elem>(rows: usize, vocab: usize) -> (Vec<T>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(1);
    let n = Normal::new(0.0f32, 3.0).unwrap();
    let x = (0..rows * vocab).map(|_| T::from_f32(n.sample(&mut rng))).collect();
    let t = (0..rows)
        .map(|r| {
            if r % 8 == 7 {
                IGNORE_INDEX
            } else {
                rng.gen_range(0..vocab as i64)
            }
        })
        .collect();
    (x, t)
}

fn bench_dtype<T: Elem>(c: &mut Criterion) {
    let mut g = c.benchmark_group(format!("logsoftmax_cpu_{}", T::NAME));
    g.sample_size(10);
    for (rows, vocab) in SHAPES {
        let (x, t) = inputs::<T>(rows, vocab);
        let bytes = (rows * vocab * std::mem::size_of::<T>()) as u64;
        let id = format!("{rows}x{vocab}");
        let (mut lse, mut logp, mut ent) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
        let dlogp = vec![-1.0 / rows as f32; rows];

        g.throughput(Throughput::Bytes(2 * bytes));
        let mut copy = x.clone();
        g.bench_function(BenchmarkId::new("copy", &id), |b| {
            b.iter(|| {
                copy.par_chunks_mut(vocab)
                    .zip(x.par_chunks(vocab))
                    .for_each(|(d, s)| d.copy_from_slice(s))
            })
        });
        g.throughput(Throughput::Bytes(bytes + (rows * vocab * 4) as u64));
        let mut full = vec![0f32; rows * vocab];
        g.bench_function(BenchmarkId::new("unfused_forward", &id), |b| {
            b.iter(|| unfused_forward(&x, vocab, &t, &mut full, &mut logp))
        });
        g.throughput(Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("forward", &id), |b| {
            b.iter(|| {
                let out = ForwardOut {
                    lse: &mut lse,
                    logp: &mut logp,
                    entropy: None,
                };
                forward_cpu(&x, rows, vocab, &t, out).unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("forward_entropy", &id), |b| {
            b.iter(|| {
                let out = ForwardOut {
                    lse: &mut lse,
                    logp: &mut logp,
                    entropy: Some(&mut ent),
                };
                forward_cpu(&x, rows, vocab, &t, out).unwrap()
            })
        });
        g.throughput(Throughput::Bytes(2 * bytes));
        let lse_fwd = lse.clone();
        g.bench_function(BenchmarkId::new("backward", &id), |b| {
            b.iter_batched_ref(
                || x.clone(),
                |grad| backward_cpu(grad, rows, vocab, &t, &lse_fwd, &dlogp).unwrap(),
                BatchSize::LargeInput,
            )
        });
        g.throughput(Throughput::Bytes(3 * bytes));
        g.bench_function(BenchmarkId::new("forward_backward", &id), |b| {
            b.iter_batched_ref(
                || x.clone(),
                |grad| {
                    let out = ForwardOut {
                        lse: &mut lse,
                        logp: &mut logp,
                        entropy: None,
                    };
                    forward_backward_cpu(grad, rows, vocab, &t, &dlogp, out).unwrap()
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// The unfused baseline: a full f32 log-softmax tensor (as `torch.log_softmax` returns), then a
/// gather of the target column.
fn unfused_forward<T: Elem>(x: &[T], vocab: usize, targets: &[i64], full: &mut [f32], logp: &mut [f32]) {
    full.par_chunks_mut(vocab)
        .zip(x.par_chunks(vocab))
        .for_each(|(out, row)| {
            let m = row.iter().map(|v| v.to_f32()).fold(f32::NEG_INFINITY, f32::max);
            let s: f64 = row.iter().map(|v| ((v.to_f32() - m) as f64).exp()).sum();
            let lse = m + s.ln() as f32;
            for (o, v) in out.iter_mut().zip(row) {
                *o = v.to_f32() - lse;
            }
        });
    for (r, (lp, &t)) in logp.iter_mut().zip(targets).enumerate() {
        *lp = if t == IGNORE_INDEX {
            0.0
        } else {
            full[r * vocab + t as usize]
        };
    }
}

fn benches(c: &mut Criterion) {
    bench_dtype::<f32>(c);
    bench_dtype::<bf16>(c);
}

criterion_group!(cpu, benches);
criterion_main!(cpu);
