//! CPU twin of the fused log-softmax + gather: forward, in-place backward and the one-call
//! forward + backward, throughput in logit bytes (forward reads R·V·sizeof once; the backward
//! reads and writes them; forward + backward reads twice and writes once).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use half::bf16;
use irbridge::dtype::Elem;
use irbridge::ops::logsoftmax::{backward_cpu, forward_backward_cpu, forward_cpu, ForwardOut, IGNORE_INDEX};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

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

fn benches(c: &mut Criterion) {
    bench_dtype::<f32>(c);
    bench_dtype::<bf16>(c);
}

criterion_group!(cpu, benches);
criterion_main!(cpu);
