//! CPU throughput of the loss-side twins: sequence reduction over a [64 × 2048] batch, the
//! preference loss over 4096 pairs (single term and a weighted mix), and the f-divergence SFT
//! objective over 1M tokens (token and sequence level).

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use irbridge::ops::prefloss::{self, FDivergence, LossType, PairInputs, PairOutputs, PrefLossConfig};
use irbridge::ops::seqreduce::{self, Reduction, SeqReduceOut};
use irbridge::ops::sftloss::{self, SftDivergence};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn seqreduce_bench(c: &mut Criterion) {
    let (rows, cols) = (64, 2048);
    let mut rng = StdRng::seed_from_u64(1);
    let values: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-15.0..0.0)).collect();
    let mask: Vec<u8> = (0..rows * cols).map(|_| rng.gen_bool(0.8) as u8).collect();
    let seg = seqreduce::segment_ids_from_mask(&mask, rows, cols).unwrap();
    let (mut s, mut n, mut m) = (vec![0f32; rows], vec![0i32; rows], vec![0f32; rows]);
    let mut g = c.benchmark_group("seqreduce_64x2048");
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.bench_function("padded_forward", |b| {
        b.iter(|| {
            seqreduce::padded_forward_cpu(
                black_box(&values),
                &mask,
                rows,
                cols,
                SeqReduceOut {
                    sums: &mut s,
                    counts: &mut n,
                    means: &mut m,
                },
            )
            .unwrap()
        })
    });
    g.bench_function("packed_forward", |b| {
        b.iter(|| {
            seqreduce::packed_forward_cpu(
                black_box(&values),
                &seg,
                rows,
                SeqReduceOut {
                    sums: &mut s,
                    counts: &mut n,
                    means: &mut m,
                },
            )
            .unwrap()
        })
    });
    let grad = vec![0.5f32; rows];
    let mut d = vec![0f32; rows * cols];
    g.bench_function("padded_backward_mean", |b| {
        b.iter(|| {
            seqreduce::padded_backward_cpu(black_box(&grad), &n, Reduction::Mean, &mask, rows, cols, &mut d).unwrap()
        })
    });
    g.finish();
}

fn prefloss_bench(c: &mut Criterion) {
    let p = 4096;
    let mut rng = StdRng::seed_from_u64(2);
    let mut col = |lo: f32, hi: f32| (0..p).map(|_| rng.gen_range(lo..hi)).collect::<Vec<f32>>();
    let (pc, pr, rc, rr) = (
        col(-600.0, -5.0),
        col(-600.0, -5.0),
        col(-600.0, -5.0),
        col(-600.0, -5.0),
    );
    let nc: Vec<i32> = (0..p as i32).map(|i| 20 + i % 300).collect();
    let nr: Vec<i32> = (0..p as i32).map(|i| 30 + i % 250).collect();
    let inputs = PairInputs {
        policy_chosen: &pc,
        policy_rejected: &pr,
        ref_chosen: &rc,
        ref_rejected: &rr,
        chosen_counts: &nc,
        rejected_counts: &nr,
    };
    let mut o: [Vec<f32>; 7] = std::array::from_fn(|_| vec![0f32; p]);
    let mut g = c.benchmark_group("prefloss_4096_pairs");
    g.throughput(Throughput::Elements(p as u64));
    let configs = [
        ("sigmoid", PrefLossConfig::default()),
        (
            "mix5_js_divergence",
            PrefLossConfig {
                terms: vec![
                    (LossType::Sigmoid, 1.0),
                    (LossType::Sft, 0.5),
                    (LossType::Discopop, 0.2),
                    (LossType::Ipo, 0.1),
                    (LossType::ExoPair, 0.3),
                ],
                f_divergence: FDivergence::JsDivergence,
                ..Default::default()
            },
        ),
    ];
    for (name, cfg) in &configs {
        g.bench_function(*name, |b| {
            b.iter(|| {
                let [a, bb, cc, d, e, f, h] = &mut o;
                let out = PairOutputs {
                    loss: a,
                    dpolicy_chosen: bb,
                    dpolicy_rejected: cc,
                    rewards_chosen: d,
                    rewards_rejected: e,
                    margins: f,
                    accuracies: h,
                };
                prefloss::forward_cpu(cfg, black_box(&inputs), out).unwrap()
            })
        });
    }
    g.finish();
}

fn sftloss_bench(c: &mut Criterion) {
    let n = 1 << 20;
    let mut rng = StdRng::seed_from_u64(3);
    let logp: Vec<f32> = (0..n).map(|_| rng.gen_range(-12.0..-0.1)).collect();
    let ref_logp: Vec<f32> = logp.iter().map(|&l| l - rng.gen_range(-2.0..2.0)).collect();
    let mask = vec![1u8; n];
    let seg: Vec<i32> = (0..n).map(|t| (t / 2048) as i32).collect();
    let (mut loss, mut grad) = (vec![0f32; n], vec![0f32; n]);
    let mut seq_loss = vec![0f32; n / 2048];
    let mut g = c.benchmark_group("sft_fdiv_1M_tokens");
    g.throughput(Throughput::Elements(n as u64));
    for div in [SftDivergence::PearsonChi2, SftDivergence::JensenShannon] {
        g.bench_function(format!("token_{div}"), |b| {
            b.iter(|| {
                sftloss::token_forward_cpu(div, 0.1, black_box(&logp), &ref_logp, &mask, &mut loss, &mut grad).unwrap()
            })
        });
    }
    g.bench_function("sequence_jensen_shannon", |b| {
        b.iter(|| {
            sftloss::sequence_forward_cpu(
                SftDivergence::JensenShannon,
                0.01,
                black_box(&logp),
                &ref_logp,
                &seg,
                n / 2048,
                &mut seq_loss,
                &mut grad,
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(2));
    targets = seqreduce_bench, prefloss_bench, sftloss_bench
}
criterion_main!(benches);
