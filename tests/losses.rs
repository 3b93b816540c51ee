//! Loss-side ops: sequence reductions, preference losses, f-divergence SFT objectives.
//! CPU twins against the f64 goldens of `golden/losses.json`, finite differences, property tests
//! on extreme inputs, and (with a GPU) the CUDA kernels against the same goldens and the CPU.

mod common;

use irbridge::ops::prefloss::{
    self, BatchMetrics, FDivergence, LossType, Pair, PairInputs, PairOutputs, PrefLossConfig,
};
use irbridge::ops::seqreduce::{self, Reduction, SeqReduceOut};
use irbridge::ops::sftloss::{self, SftDivergence, MAX_WEIGHT};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

fn losses_json() -> Value {
    let path = common::fixtures().join("golden/losses.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn i32s(v: &Value) -> Vec<i32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect()
}

/// The 16 golden pairs in f64.
struct GoldenPairs {
    pc: Vec<f64>,
    pr: Vec<f64>,
    rc: Vec<f64>,
    rr: Vec<f64>,
    nc: Vec<i32>,
    nr: Vec<i32>,
}

impl GoldenPairs {
    fn load(j: &Value) -> Self {
        let p = &j["dpo"]["pairs"];
        GoldenPairs {
            pc: f64s(&p["policy_chosen_logps"]),
            pr: f64s(&p["policy_rejected_logps"]),
            rc: f64s(&p["ref_chosen_logps"]),
            rr: f64s(&p["ref_rejected_logps"]),
            nc: i32s(&p["chosen_counts"]),
            nr: i32s(&p["rejected_counts"]),
        }
    }

    fn inputs(&self) -> PairInputs<'_, f64> {
        PairInputs {
            policy_chosen: &self.pc,
            policy_rejected: &self.pr,
            ref_chosen: &self.rc,
            ref_rejected: &self.rr,
            chosen_counts: &self.nc,
            rejected_counts: &self.nr,
        }
    }
}

/// Owned per-pair outputs for the CPU twin.
struct Outs<T> {
    v: [Vec<T>; 7],
}

impl<T: Copy + Default> Outs<T> {
    fn new(n: usize) -> Self {
        Outs {
            v: std::array::from_fn(|_| vec![T::default(); n]),
        }
    }
    fn view(&mut self) -> PairOutputs<'_, T> {
        let [a, b, c, d, e, f, g] = &mut self.v;
        PairOutputs {
            loss: a,
            dpolicy_chosen: b,
            dpolicy_rejected: c,
            rewards_chosen: d,
            rewards_rejected: e,
            margins: f,
            accuracies: g,
        }
    }
}

/// The config of a golden key such as `sigmoid` or `sigmoid@js_divergence`.
fn golden_config(j: &Value, beta: f64, entry: &Value) -> PrefLossConfig {
    let c = &j["dpo"]["constants"];
    PrefLossConfig {
        terms: vec![(entry["loss_type"].as_str().unwrap().parse().unwrap(), 1.0)],
        beta,
        f_divergence: entry["f_divergence_type"].as_str().unwrap().parse().unwrap(),
        alpha: c["alpha_divergence_alpha"].as_f64().unwrap(),
        label_smoothing: 0.0,
        robust_eps: c["robust_label_smoothing"].as_f64().unwrap(),
        exo_eps: c["exo_pair_label_smoothing"].as_f64().unwrap(),
        discopop_tau: c["discopop_tau"].as_f64().unwrap(),
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn dpo_goldens_every_loss_type_and_beta() {
    let j = losses_json();
    let pairs = GoldenPairs::load(&j);
    let mut checked = 0;
    for cfg_j in j["dpo"]["configs"].as_array().unwrap() {
        let beta = cfg_j["beta"].as_f64().unwrap();
        for (key, entry) in cfg_j["losses"].as_object().unwrap() {
            let cfg = golden_config(&j, beta, entry);
            let mut out = Outs::<f64>::new(16);
            prefloss::forward_cpu(&cfg, &pairs.inputs(), out.view()).unwrap();
            let what = format!("β={beta} {key}");
            common::assert_close(&format!("{what} loss"), &out.v[0], &f64s(&entry["loss"]), 1e-9, 1e-12);
            common::assert_close(
                &format!("{what} dchosen"),
                &out.v[1],
                &f64s(&entry["dloss_dpolicy_chosen"]),
                1e-9,
                1e-12,
            );
            common::assert_close(
                &format!("{what} drejected"),
                &out.v[2],
                &f64s(&entry["dloss_dpolicy_rejected"]),
                1e-9,
                1e-12,
            );
            common::assert_close(
                &format!("{what} mean"),
                &[mean(&out.v[0])],
                &[entry["mean_loss"].as_f64().unwrap()],
                1e-9,
                1e-12,
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 30, "2 β tables × (12 loss types + 3 f-divergences)");
}

#[test]
fn dpo_metrics_goldens_with_strict_accuracy() {
    let j = losses_json();
    let pairs = GoldenPairs::load(&j);
    for cfg_j in j["dpo"]["configs"].as_array().unwrap() {
        let beta = cfg_j["beta"].as_f64().unwrap();
        let m = &cfg_j["metrics"];
        let cfg = PrefLossConfig {
            beta,
            ..Default::default()
        };
        let mut out = Outs::<f64>::new(16);
        prefloss::forward_cpu(&cfg, &pairs.inputs(), out.view()).unwrap();
        for (k, name) in [
            (3, "rewards/chosen"),
            (4, "rewards/rejected"),
            (5, "rewards/margins"),
            (6, "rewards/accuracies"),
        ] {
            common::assert_close(&format!("β={beta} {name}"), &out.v[k], &f64s(&m[name]), 1e-9, 1e-12);
        }
        assert_eq!(out.v[6][0], 0.0, "pair 0 has policy == ref: strict accuracy must be 0");
        assert_eq!(out.v[6][1], 0.0, "pair 1 has r_w == r_l: strict accuracy must be 0");
        let bm =
            BatchMetrics::from_pairs(&pairs.inputs(), &out.v[0], &out.v[3], &out.v[4], &out.v[5], &out.v[6]).unwrap();
        for (name, got) in bm.named() {
            let want = if name == "loss" {
                cfg_j["losses"]["sigmoid"]["mean_loss"].as_f64().unwrap()
            } else {
                m["mean"][name]
                    .as_f64()
                    .unwrap_or_else(|| panic!("metrics.mean.{name} missing"))
            };
            common::assert_close(&format!("β={beta} mean {name}"), &[got], &[want], 1e-9, 1e-12);
        }
        // Step 0 of DPO (policy == ref): the sigmoid loss is exactly ln 2.
        assert!((out.v[0][0] - std::f64::consts::LN_2).abs() < 1e-15);
    }
}

#[test]
fn sft_fdiv_golden_sets() {
    let j = losses_json();
    let sets = j["sft_fdiv"]["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 2);
    for set in sets {
        let beta = set["beta"].as_f64().unwrap();
        let (logp, ref_logp) = (f64s(&set["logp"]), f64s(&set["ref_logp"]));
        let mask = vec![1u8; logp.len()];
        let divs = set["divergences"].as_object().unwrap();
        assert_eq!(divs.len(), 6);
        for (name, d) in divs {
            let div: SftDivergence = name.parse().unwrap();
            assert_eq!(div.to_string(), *name);
            let mut loss = vec![0f64; logp.len()];
            let mut grad = vec![0f64; logp.len()];
            let clamped = sftloss::token_forward_cpu(div, beta, &logp, &ref_logp, &mask, &mut loss, &mut grad).unwrap();
            assert_eq!(
                clamped, 0,
                "{name} β={beta}: every golden token is inside the safe range"
            );
            common::assert_close(&format!("{name} β={beta} loss"), &loss, &f64s(&d["loss"]), 1e-9, 1e-12);
            common::assert_close(
                &format!("{name} β={beta} dloss_dlogp"),
                &grad,
                &f64s(&d["dloss_dlogp"]),
                1e-9,
                1e-12,
            );
            common::assert_close(
                &format!("{name} β={beta} mean"),
                &[mean(&loss)],
                &[d["mean_loss"].as_f64().unwrap()],
                1e-9,
                1e-12,
            );
        }
    }
}

#[test]
fn sft_fdiv_boundary_probes() {
    let j = losses_json();
    let probes = j["sft_fdiv"]["boundary_probes"].as_object().unwrap();
    assert_eq!(probes.len(), 6);
    for (name, list) in probes {
        let div: SftDivergence = name.parse().unwrap();
        for p in list.as_array().unwrap() {
            let s = p["s"].as_f64().unwrap();
            assert_eq!(
                div.in_domain(s),
                p["in_domain"].as_bool().unwrap(),
                "{name} in_domain({s})"
            );
            for (got, key) in [(div.h(s), "h"), (div.h_prime(s), "h_prime")] {
                match p[key].as_f64() {
                    Some(want) => {
                        common::assert_close(&format!("{name} {key}({s})"), &[got.unwrap()], &[want], 1e-9, 1e-12)
                    }
                    None => assert_eq!(got, None, "{name} {key}({s}) must be None outside the domain"),
                }
            }
        }
    }
}

#[test]
fn sft_fdiv_clamps_and_counts_out_of_domain_tokens() {
    let beta = 1.0;
    // s = −1.5, −1, −0.95, −0.69, 0, 2.5, 50, −50: covers every divergence's boundary.
    let s = [-1.5, -1.0, -0.95, -0.69, 0.0, 2.5, 50.0, -50.0];
    let logp: Vec<f64> = s.iter().map(|x| x - 3.0).collect();
    let ref_logp = vec![-3.0; s.len()];
    let mask = vec![1u8; s.len()];
    let expect_clamped = |div: SftDivergence| s.iter().filter(|&&x| div.clamp(x).1).count();
    for div in SftDivergence::ALL {
        let mut loss = vec![0f64; s.len()];
        let mut grad = vec![0f64; s.len()];
        let n = sftloss::token_forward_cpu(div, beta, &logp, &ref_logp, &mask, &mut loss, &mut grad).unwrap();
        assert_eq!(n, expect_clamped(div), "{div}");
        for (i, &x) in s.iter().enumerate() {
            assert!(
                loss[i].is_finite() && grad[i].is_finite(),
                "{div} s={x}: loss {} grad {}",
                loss[i],
                grad[i]
            );
            let w = -grad[i];
            assert!(
                (0.0..=MAX_WEIGHT * (1.0 + 1e-12)).contains(&w),
                "{div} s={x}: weight {w} outside [0, 100]"
            );
            if !div.in_domain(x) {
                assert!(div.clamp(x).1, "{div} s={x} is outside the domain and must be clamped");
            }
        }
    }
    let counts: Vec<usize> = SftDivergence::ALL.iter().map(|&d| expect_clamped(d)).collect();
    // tv never clamps; pearson clamps −1.5, −1, −50; neyman 2.5, 50; hellinger −1.5, −1, −0.95, −50;
    // JS −1.5, −1, −0.95, −0.69 (inside the domain but past the weight-100 margin) and reverse_kl −50.
    assert_eq!(counts, vec![0, 3, 2, 4, 5, 1]);
}

fn all_configs() -> Vec<PrefLossConfig> {
    let mut v = Vec::new();
    for fdiv in FDivergence::ALL {
        for t in LossType::ALL {
            for beta in [0.1, 0.5, 2.0] {
                v.push(PrefLossConfig {
                    terms: vec![(t, 1.0)],
                    beta,
                    f_divergence: fdiv,
                    robust_eps: 0.1,
                    label_smoothing: if t == LossType::Sigmoid { 0.05 } else { 0.0 },
                    ..Default::default()
                });
            }
        }
    }
    v
}

fn random_pair(rng: &mut StdRng, spread: f64) -> Pair {
    let pc = rng.gen_range(-600.0..-5.0);
    let pr = rng.gen_range(-600.0..-5.0);
    Pair {
        policy_chosen: pc,
        policy_rejected: pr,
        ref_chosen: pc - rng.gen_range(-spread..spread),
        ref_rejected: pr - rng.gen_range(-spread..spread),
        chosen_count: rng.gen_range(0..300),
        rejected_count: rng.gen_range(0..300),
    }
}

#[test]
fn preference_gradients_match_finite_differences() {
    let mut rng = StdRng::seed_from_u64(7);
    let sft_scale = 0.0137;
    let mut checked = 0;
    for cfg in all_configs() {
        // Spreads: ordinary margins and large |βΔ| (up to ~βΔ = 2·100 here).
        for spread in [3.0, 100.0] {
            for _ in 0..6 {
                let p = random_pair(&mut rng, spread);
                let g = prefloss::pair_loss(&cfg, &p, sft_scale);
                // Hinge has a kink at βΔ = 1: keep clear of it.
                if cfg.terms[0].0 == LossType::Hinge {
                    let dz = cfg.beta * ((p.policy_chosen - p.ref_chosen) - (p.policy_rejected - p.ref_rejected));
                    if cfg.f_divergence == FDivergence::ReverseKl && (dz - 1.0).abs() < 1e-3 {
                        continue;
                    }
                }
                let h = 1e-5;
                let f = |dc: f64, dr: f64| {
                    let q = Pair {
                        policy_chosen: p.policy_chosen + dc,
                        policy_rejected: p.policy_rejected + dr,
                        ..p
                    };
                    prefloss::pair_loss(&cfg, &q, sft_scale).loss
                };
                let fd_c = (f(h, 0.0) - f(-h, 0.0)) / (2.0 * h);
                let fd_r = (f(0.0, h) - f(0.0, -h)) / (2.0 * h);
                let noise = 1e-15 * g.loss.abs().max(1.0) / h;
                for (name, fd, an) in [
                    ("chosen", fd_c, g.dpolicy_chosen),
                    ("rejected", fd_r, g.dpolicy_rejected),
                ] {
                    let tol = 1e-6 * (1.0 + an.abs()) + 10.0 * noise;
                    assert!(
                        (fd - an).abs() <= tol,
                        "{} @{} β={} d/d{name}: analytic {an}, finite difference {fd} (pair {p:?})",
                        cfg.terms[0].0,
                        cfg.f_divergence,
                        cfg.beta
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 500, "only {checked} finite-difference checks ran");
}

#[test]
fn length_normalised_losses_use_counts_with_floor_one() {
    // ipo and sigmoid_norm divide by max(count, 1): a zero count behaves as one token.
    let base = Pair {
        policy_chosen: -10.0,
        policy_rejected: -12.0,
        ref_chosen: -11.0,
        ref_rejected: -11.5,
        chosen_count: 0,
        rejected_count: 4,
    };
    for t in [LossType::Ipo, LossType::SigmoidNorm] {
        let cfg = PrefLossConfig::single(t);
        let a = prefloss::pair_loss(&cfg, &base, 0.0);
        let b = prefloss::pair_loss(
            &cfg,
            &Pair {
                chosen_count: 1,
                ..base
            },
            0.0,
        );
        assert_eq!(a, b, "{t}: count 0 must act as 1");
        let c = prefloss::pair_loss(
            &cfg,
            &Pair {
                chosen_count: 8,
                ..base
            },
            0.0,
        );
        assert!(
            (c.dpolicy_chosen - a.dpolicy_chosen).abs() > 1e-6,
            "{t}: the chosen count must normalise"
        );
    }
    // ipo by hand: (1/1 − (−0.5)/4 − 1/(2·0.1))² = (1.125 − 5)².
    let ipo = prefloss::pair_loss(&PrefLossConfig::single(LossType::Ipo), &base, 0.0);
    assert!((ipo.loss - (1.125f64 - 5.0).powi(2)).abs() < 1e-12);
}

#[test]
fn weighted_terms_sum_their_losses_and_gradients() {
    let mut rng = StdRng::seed_from_u64(11);
    let terms = vec![
        (LossType::Sigmoid, 0.7),
        (LossType::Sft, 0.3),
        (LossType::BcoPair, 1.5),
        (LossType::Ipo, -0.2),
    ];
    let combo = PrefLossConfig {
        terms: terms.clone(),
        f_divergence: FDivergence::JsDivergence,
        ..Default::default()
    };
    for _ in 0..20 {
        let p = random_pair(&mut rng, 20.0);
        let all = prefloss::pair_loss(&combo, &p, 0.01);
        let (mut l, mut dc, mut dr) = (0.0, 0.0, 0.0);
        for &(t, w) in &terms {
            let one = prefloss::pair_loss(
                &PrefLossConfig {
                    terms: vec![(t, 1.0)],
                    ..combo.clone()
                },
                &p,
                0.01,
            );
            l += w * one.loss;
            dc += w * one.dpolicy_chosen;
            dr += w * one.dpolicy_rejected;
        }
        assert!((all.loss - l).abs() <= 1e-12 * l.abs().max(1.0));
        assert!((all.dpolicy_chosen - dc).abs() <= 1e-12 * dc.abs().max(1.0));
        assert!((all.dpolicy_rejected - dr).abs() <= 1e-12 * dr.abs().max(1.0));
    }
}

#[test]
fn sft_term_mean_is_token_mean_nll_of_chosen() {
    let j = losses_json();
    let pairs = GoldenPairs::load(&j);
    let cfg = PrefLossConfig::single(LossType::Sft);
    let mut out = Outs::<f64>::new(16);
    prefloss::forward_cpu(&cfg, &pairs.inputs(), out.view()).unwrap();
    let tokens: i32 = pairs.nc.iter().sum();
    let nll = -pairs.pc.iter().sum::<f64>() / tokens as f64;
    assert!(
        (mean(&out.v[0]) - nll).abs() < 1e-12 * nll,
        "mean {} vs token-mean NLL {nll}",
        mean(&out.v[0])
    );
    assert!(out.v[1].iter().all(|&g| (g + 16.0 / tokens as f64).abs() < 1e-15));
    assert!(out.v[2].iter().all(|&g| g == 0.0));
}

#[test]
fn preference_losses_never_nan_on_extreme_inputs() {
    let extremes: [f64; 6] = [1e4, -1e4, 0.0, 1e-3, -85.0, 300.0];
    let mut checked = 0;
    for cfg in all_configs() {
        for &rw in &extremes {
            for &rl in &extremes {
                for counts in [(0, 0), (0, 7), (1, 1), (500, 3)] {
                    let pc = [-20.0 + rw.min(0.0), -1e4];
                    let pr = [-30.0 + rl.min(0.0), -3.0];
                    let rc = [pc[0] - rw, pc[1] - rw];
                    let rr = [pr[0] - rl, pr[1] - rl];
                    let (nc, nr) = ([counts.0, counts.0], [counts.1, counts.1]);
                    let inputs = PairInputs {
                        policy_chosen: &pc,
                        policy_rejected: &pr,
                        ref_chosen: &rc,
                        ref_rejected: &rr,
                        chosen_counts: &nc,
                        rejected_counts: &nr,
                    };
                    let mut out = Outs::<f64>::new(2);
                    prefloss::forward_cpu(&cfg, &inputs, out.view()).unwrap();
                    for (k, v) in out.v.iter().enumerate() {
                        assert!(
                            v.iter().all(|x| x.is_finite()),
                            "{} @{} β={} r=({rw},{rl}) counts {counts:?}: output {k} = {v:?}",
                            cfg.terms[0].0,
                            cfg.f_divergence,
                            cfg.beta
                        );
                    }
                    // f32 I/O: values past f32 range may round to ±inf, but never to NaN.
                    let f = |a: &[f64]| a.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                    let (pc32, pr32, rc32, rr32) = (f(&pc), f(&pr), f(&rc), f(&rr));
                    let inputs32 = PairInputs {
                        policy_chosen: &pc32,
                        policy_rejected: &pr32,
                        ref_chosen: &rc32,
                        ref_rejected: &rr32,
                        chosen_counts: &nc,
                        rejected_counts: &nr,
                    };
                    let mut out32 = Outs::<f32>::new(2);
                    prefloss::forward_cpu(&cfg, &inputs32, out32.view()).unwrap();
                    assert!(out32.v.iter().flatten().all(|x| !x.is_nan()));
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > 5000);
}

#[test]
fn preference_names_configs_and_input_errors() {
    for t in LossType::ALL {
        assert_eq!(t.to_string().parse::<LossType>().unwrap(), t);
    }
    for d in FDivergence::ALL {
        assert_eq!(d.to_string().parse::<FDivergence>().unwrap(), d);
    }
    assert!("aot"
        .parse::<LossType>()
        .unwrap_err()
        .to_string()
        .contains("not supported"));
    assert!("sigmod"
        .parse::<LossType>()
        .unwrap_err()
        .to_string()
        .contains("unknown loss_type"));
    assert!("kl".parse::<FDivergence>().is_err());
    assert!(PrefLossConfig {
        beta: 0.0,
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(PrefLossConfig {
        terms: vec![(LossType::Sigmoid, 1.0); 9],
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(PrefLossConfig {
        terms: vec![],
        ..Default::default()
    }
    .validate()
    .is_err());
    assert!(PrefLossConfig {
        exo_eps: 0.0,
        ..Default::default()
    }
    .validate()
    .is_err());

    let a = [-1.0f64, -2.0];
    let short = [-1.0f64];
    let c = [3, 4];
    let bad = PairInputs {
        policy_chosen: &a,
        policy_rejected: &a,
        ref_chosen: &short,
        ref_rejected: &a,
        chosen_counts: &c,
        rejected_counts: &c,
    };
    let mut out = Outs::<f64>::new(2);
    let err = prefloss::forward_cpu(&PrefLossConfig::default(), &bad, out.view())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ref_chosen") && err.contains("expected 2"), "{err}");
    let nan = [f64::NAN, -2.0];
    let bad = PairInputs {
        policy_chosen: &nan,
        policy_rejected: &a,
        ref_chosen: &a,
        ref_rejected: &a,
        chosen_counts: &c,
        rejected_counts: &c,
    };
    let err = prefloss::forward_cpu(&PrefLossConfig::default(), &bad, out.view())
        .unwrap_err()
        .to_string();
    assert!(err.contains("policy_chosen[0]"), "{err}");
    let neg = [3, -1];
    let bad = PairInputs {
        policy_chosen: &a,
        policy_rejected: &a,
        ref_chosen: &a,
        ref_rejected: &a,
        chosen_counts: &c,
        rejected_counts: &neg,
    };
    assert!(prefloss::forward_cpu(&PrefLossConfig::default(), &bad, out.view())
        .unwrap_err()
        .to_string()
        .contains("rejected_counts[1]"));
}

/// Random padded batch: values with some ±80 entries, a mask with an all-masked row.
fn random_padded(rng: &mut StdRng, rows: usize, cols: usize) -> (Vec<f32>, Vec<u8>) {
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| {
            if rng.gen_bool(0.01) {
                rng.gen_range(-80.0..80.0)
            } else {
                rng.gen_range(-15.0..0.0)
            }
        })
        .collect();
    let mut mask: Vec<u8> = (0..rows * cols).map(|_| rng.gen_bool(0.7) as u8).collect();
    if rows > 1 {
        mask[cols..2 * cols].fill(0); // row 1 entirely masked
    }
    (values, mask)
}

#[test]
fn seqreduce_padded_and_packed_random_shapes() {
    let mut rng = StdRng::seed_from_u64(3);
    for (rows, cols) in [(1, 1), (1, 257), (3, 7), (5, 300), (17, 1000), (2, 2048), (4, 0)] {
        let (values, mask) = random_padded(&mut rng, rows, cols);
        let (mut sums, mut counts, mut means) = (vec![0f32; rows], vec![0i32; rows], vec![0f32; rows]);
        seqreduce::padded_forward_cpu(
            &values,
            &mask,
            rows,
            cols,
            SeqReduceOut {
                sums: &mut sums,
                counts: &mut counts,
                means: &mut means,
            },
        )
        .unwrap();
        for r in 0..rows {
            let (mut s, mut c) = (0f64, 0i32);
            for t in 0..cols {
                if mask[r * cols + t] != 0 {
                    s += values[r * cols + t] as f64;
                    c += 1;
                }
            }
            assert_eq!(counts[r], c, "{rows}×{cols} row {r} count");
            assert!(
                (sums[r] as f64 - s).abs() <= 1e-6 * s.abs().max(1.0),
                "{rows}×{cols} row {r}: {} vs {s}",
                sums[r]
            );
            let m = if c == 0 { 0.0 } else { s / c as f64 };
            assert!((means[r] as f64 - m).abs() <= 1e-6 * m.abs().max(1.0));
        }
        if rows > 1 && cols > 0 {
            assert_eq!((sums[1], counts[1], means[1]), (0.0, 0, 0.0), "all-masked row");
        }
        // The packed layout over the equivalent segment ids gives the same result.
        let seg = seqreduce::segment_ids_from_mask(&mask, rows, cols).unwrap();
        let (mut s2, mut c2, mut m2) = (vec![0f32; rows], vec![0i32; rows], vec![0f32; rows]);
        seqreduce::packed_forward_cpu(
            &values,
            &seg,
            rows,
            SeqReduceOut {
                sums: &mut s2,
                counts: &mut c2,
                means: &mut m2,
            },
        )
        .unwrap();
        assert_eq!((&s2, &c2, &m2), (&sums, &counts, &means));

        // Backward is the exact adjoint: Σ_t dvalues_t·values_t == Σ_r g_r·out_r.
        let grad: Vec<f32> = (0..rows).map(|_| rng.gen_range(-2.0..2.0)).collect();
        for reduction in [Reduction::Sum, Reduction::Mean] {
            let mut d = vec![f32::NAN; rows * cols];
            seqreduce::padded_backward_cpu(&grad, &counts, reduction, &mask, rows, cols, &mut d).unwrap();
            let mut d2 = vec![f32::NAN; rows * cols];
            seqreduce::packed_backward_cpu(&grad, &counts, reduction, &seg, rows, &mut d2).unwrap();
            assert_eq!(d, d2);
            let lhs: f64 = d.iter().zip(&values).map(|(&a, &b)| a as f64 * b as f64).sum();
            let out = if reduction == Reduction::Sum { &sums } else { &means };
            let rhs: f64 = grad.iter().zip(out).map(|(&a, &b)| a as f64 * b as f64).sum();
            assert!(
                (lhs - rhs).abs() <= 1e-5 * rhs.abs().max(1.0),
                "{rows}×{cols} {reduction:?}: {lhs} vs {rhs}"
            );
            assert!(
                d.iter().zip(&mask).all(|(&x, &m)| m != 0 || x == 0.0),
                "masked tokens get 0"
            );
        }
    }
}

#[test]
fn seqreduce_packed_noncontiguous_segments_and_errors() {
    let mut rng = StdRng::seed_from_u64(5);
    let (n, segs) = (40_000, 37); // > one CPU chunk, segments interleaved, segment 36 empty
    let values: Vec<f32> = (0..n).map(|_| rng.gen_range(-20.0..5.0)).collect();
    let seg: Vec<i32> = (0..n).map(|_| rng.gen_range(-1..36)).collect();
    let (mut sums, mut counts, mut means) = (vec![0f32; segs], vec![0i32; segs], vec![0f32; segs]);
    seqreduce::packed_forward_cpu(
        &values,
        &seg,
        segs,
        SeqReduceOut {
            sums: &mut sums,
            counts: &mut counts,
            means: &mut means,
        },
    )
    .unwrap();
    let mut want = vec![(0f64, 0i32); segs];
    for (&v, &s) in values.iter().zip(&seg) {
        if s >= 0 {
            want[s as usize].0 += v as f64;
            want[s as usize].1 += 1;
        }
    }
    for k in 0..segs {
        assert_eq!(counts[k], want[k].1);
        assert!((sums[k] as f64 - want[k].0).abs() <= 1e-6 * want[k].0.abs().max(1.0));
    }
    assert_eq!((sums[36], counts[36], means[36]), (0.0, 0, 0.0));
    let mut bad = seg.clone();
    bad[17] = 37;
    let err = seqreduce::packed_forward_cpu(
        &values,
        &bad,
        segs,
        SeqReduceOut {
            sums: &mut sums,
            counts: &mut counts,
            means: &mut means,
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("segment_ids[17] = 37"), "{err}");
    let err = seqreduce::padded_forward_cpu(
        &values[..10],
        &[1u8; 12],
        3,
        4,
        SeqReduceOut {
            sums: &mut sums[..3],
            counts: &mut counts[..3],
            means: &mut means[..3],
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("values: expected 3×4"), "{err}");
}

#[test]
fn sequence_level_fdiv_is_token_formula_on_summed_ratio() {
    let mut rng = StdRng::seed_from_u64(9);
    let (n, segs) = (3000, 12);
    // Contiguous completions with prompt gaps (−1), one empty segment (11).
    let mut seg = vec![-1i32; n];
    for k in 0..11 {
        let start = k * 270 + 20;
        seg[start..start + 200].fill(k as i32);
    }
    for beta in [0.001, 0.01, 0.1] {
        let logp: Vec<f64> = (0..n).map(|_| rng.gen_range(-12.0..-0.1)).collect();
        let ref_logp: Vec<f64> = logp.iter().map(|&l| l - rng.gen_range(-0.5..0.45)).collect();
        for div in SftDivergence::ALL {
            let mut seq_loss = vec![0f64; segs];
            let mut w = vec![0f64; n];
            let clamped =
                sftloss::sequence_forward_cpu(div, beta, &logp, &ref_logp, &seg, segs, &mut seq_loss, &mut w).unwrap();
            let mut expect_clamped = 0;
            for (k, &got_loss) in seq_loss.iter().enumerate() {
                let sum: f64 = (0..n)
                    .filter(|&t| seg[t] == k as i32)
                    .map(|t| logp[t] - ref_logp[t])
                    .sum();
                let (l, g, c) = div.loss_and_grad(beta * sum, beta);
                expect_clamped += c as usize;
                common::assert_close(&format!("{div} β={beta} seq {k} loss"), &[got_loss], &[l], 1e-9, 1e-12);
                for t in (0..n).filter(|&t| seg[t] == k as i32) {
                    assert_eq!(w[t], g, "{div} token {t}");
                }
                if div.in_domain(beta * sum) && !c {
                    let hv = div.h(beta * sum).unwrap();
                    assert!((got_loss + hv / beta).abs() <= 1e-9 * (hv / beta).abs().max(1.0));
                }
            }
            assert_eq!(clamped, expect_clamped);
            assert!(w.iter().zip(&seg).all(|(&x, &s)| s >= 0 || x == 0.0));
            if div == SftDivergence::Tv {
                assert!(
                    w.iter().zip(&seg).all(|(&x, &s)| s < 0 || x == -1.0),
                    "tv weight is plain NLL"
                );
            }
        }
    }
    // One token per segment: sequence level == token level.
    let logp = [-1.0, -2.0, -3.5, -0.25];
    let ref_logp = [-1.5, -1.0, -3.0, -0.5];
    for div in SftDivergence::ALL {
        let (mut sl, mut sw, mut tl, mut tw) = ([0f64; 4], [0f64; 4], [0f64; 4], [0f64; 4]);
        let a = sftloss::sequence_forward_cpu(div, 0.5, &logp, &ref_logp, &[0, 1, 2, 3], 4, &mut sl, &mut sw).unwrap();
        let b = sftloss::token_forward_cpu(div, 0.5, &logp, &ref_logp, &[1; 4], &mut tl, &mut tw).unwrap();
        assert_eq!((a, sl, sw), (b, tl, tw), "{div}");
    }
}

#[test]
fn token_level_fdiv_masks_and_validates() {
    let logp = [-1.0f32, -2.0, -3.0];
    let ref_logp = [-1.5f32, -1.0, -3.0];
    let (mut l, mut g) = ([9f32; 3], [9f32; 3]);
    sftloss::token_forward_cpu(
        SftDivergence::PearsonChi2,
        0.1,
        &logp,
        &ref_logp,
        &[1, 0, 1],
        &mut l,
        &mut g,
    )
    .unwrap();
    assert_eq!((l[1], g[1]), (0.0, 0.0), "masked token");
    assert_eq!((l[2], g[2]), (0.0, -1.0), "s = 0: loss 0, NLL weight");
    let err =
        sftloss::token_forward_cpu(SftDivergence::Tv, 0.1, &logp, &ref_logp[..2], &[1; 3], &mut l, &mut g).unwrap_err();
    assert!(err.to_string().contains("ref_logp"), "{err}");
    assert!(sftloss::token_forward_cpu(SftDivergence::Tv, -1.0, &logp, &ref_logp, &[1; 3], &mut l, &mut g).is_err());
    assert!("kl".parse::<SftDivergence>().is_err());
}

/// The CUDA kernels against the goldens and the CPU twins (skipped visibly without a GPU).
mod gpu {
    use super::*;
    use cudarc::driver::CudaSlice;
    use irbridge::device::CudaDevice;
    use prefloss::{PairInputsCuda, PairOutputsCuda};
    use std::sync::Arc;

    fn dev() -> Arc<CudaDevice> {
        CudaDevice::get(0).unwrap()
    }

    fn up<T: cudarc::driver::DeviceRepr>(d: &CudaDevice, v: &[T]) -> CudaSlice<T> {
        d.stream().clone_htod(v).unwrap()
    }

    fn down<T: cudarc::driver::DeviceRepr + Default + Clone>(d: &CudaDevice, v: &CudaSlice<T>) -> Vec<T> {
        d.stream().clone_dtoh(v).unwrap()
    }

    fn widen(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| x as f64).collect()
    }

    /// Runs the preference kernel on f32 inputs; returns the 7 outputs.
    #[allow(clippy::too_many_arguments)]
    fn pref_cuda(
        d: &CudaDevice,
        cfg: &PrefLossConfig,
        pc: &[f32],
        pr: &[f32],
        rc: &[f32],
        rr: &[f32],
        nc: &[i32],
        nr: &[i32],
    ) -> Vec<Vec<f32>> {
        let n = pc.len();
        let (pc, pr, rc, rr, nc, nr) = (up(d, pc), up(d, pr), up(d, rc), up(d, rr), up(d, nc), up(d, nr));
        let mut o: Vec<CudaSlice<f32>> = (0..7).map(|_| d.stream().alloc_zeros::<f32>(n).unwrap()).collect();
        {
            let [a, b, c, e, f, g, h] = &mut o[..] else {
                unreachable!()
            };
            let inputs = PairInputsCuda {
                policy_chosen: &pc.as_view(),
                policy_rejected: &pr.as_view(),
                ref_chosen: &rc.as_view(),
                ref_rejected: &rr.as_view(),
                chosen_counts: &nc.as_view(),
                rejected_counts: &nr.as_view(),
            };
            let out = PairOutputsCuda {
                loss: &mut a.as_view_mut(),
                dpolicy_chosen: &mut b.as_view_mut(),
                dpolicy_rejected: &mut c.as_view_mut(),
                rewards_chosen: &mut e.as_view_mut(),
                rewards_rejected: &mut f.as_view_mut(),
                margins: &mut g.as_view_mut(),
                accuracies: &mut h.as_view_mut(),
            };
            prefloss::forward_cuda(d, cfg, &inputs, out).unwrap();
        }
        o.iter().map(|x| down(d, x)).collect()
    }

    #[test]
    fn gpu_preference_goldens_and_cpu_agreement() {
        if common::skip_without_gpu("gpu_preference_goldens_and_cpu_agreement") {
            return;
        }
        let d = dev();
        let j = losses_json();
        let g = GoldenPairs::load(&j);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let (pc, pr, rc, rr) = (f(&g.pc), f(&g.pr), f(&g.rc), f(&g.rr));
        for cfg_j in j["dpo"]["configs"].as_array().unwrap() {
            let beta = cfg_j["beta"].as_f64().unwrap();
            for (key, entry) in cfg_j["losses"].as_object().unwrap() {
                let cfg = golden_config(&j, beta, entry);
                let gpu = pref_cuda(&d, &cfg, &pc, &pr, &rc, &rr, &g.nc, &g.nr);
                // Against the f64 golden (inputs rounded to f32: loose) ...
                common::assert_close(
                    &format!("gpu {key} β={beta} loss"),
                    &widen(&gpu[0]),
                    &f64s(&entry["loss"]),
                    1e-3,
                    1e-4,
                );
                common::assert_close(
                    &format!("gpu {key} β={beta} dchosen"),
                    &widen(&gpu[1]),
                    &f64s(&entry["dloss_dpolicy_chosen"]),
                    1e-3,
                    1e-4,
                );
                // ... and tightly against the CPU twin on the same f32 inputs.
                let inputs = PairInputs {
                    policy_chosen: &pc,
                    policy_rejected: &pr,
                    ref_chosen: &rc,
                    ref_rejected: &rr,
                    chosen_counts: &g.nc,
                    rejected_counts: &g.nr,
                };
                let mut cpu = Outs::<f32>::new(16);
                prefloss::forward_cpu(&cfg, &inputs, cpu.view()).unwrap();
                for (k, (gv, cv)) in gpu.iter().zip(&cpu.v).enumerate() {
                    common::assert_close(
                        &format!("gpu vs cpu {key} β={beta} out {k}"),
                        &widen(gv),
                        &widen(cv),
                        1e-6,
                        1e-7,
                    );
                }
            }
        }
        // Random batch (4099 pairs, several blocks) with a weighted mix including sft.
        let mut rng = StdRng::seed_from_u64(21);
        let n = 4099;
        let pairs: Vec<Pair> = (0..n)
            .map(|i| random_pair(&mut rng, if i % 3 == 0 { 1e3 } else { 5.0 }))
            .collect();
        let col = |h: fn(&Pair) -> f64| pairs.iter().map(|p| h(p) as f32).collect::<Vec<f32>>();
        let (pc, pr, rc, rr) = (
            col(|p| p.policy_chosen),
            col(|p| p.policy_rejected),
            col(|p| p.ref_chosen),
            col(|p| p.ref_rejected),
        );
        let nc: Vec<i32> = pairs.iter().map(|p| p.chosen_count).collect();
        let nr: Vec<i32> = pairs.iter().map(|p| p.rejected_count).collect();
        for fdiv in FDivergence::ALL {
            let cfg = PrefLossConfig {
                terms: vec![
                    (LossType::Sigmoid, 1.0),
                    (LossType::Sft, 0.5),
                    (LossType::Discopop, 0.25),
                    (LossType::Ipo, 0.1),
                    (LossType::ApoZero, 1.0),
                ],
                f_divergence: fdiv,
                ..Default::default()
            };
            let gpu = pref_cuda(&d, &cfg, &pc, &pr, &rc, &rr, &nc, &nr);
            let inputs = PairInputs {
                policy_chosen: &pc,
                policy_rejected: &pr,
                ref_chosen: &rc,
                ref_rejected: &rr,
                chosen_counts: &nc,
                rejected_counts: &nr,
            };
            let mut cpu = Outs::<f32>::new(n);
            prefloss::forward_cpu(&cfg, &inputs, cpu.view()).unwrap();
            for (k, (gv, cv)) in gpu.iter().zip(&cpu.v).enumerate() {
                common::assert_close(
                    &format!("gpu vs cpu random {fdiv} out {k}"),
                    &widen(gv),
                    &widen(cv),
                    1e-6,
                    1e-7,
                );
            }
        }
    }

    #[test]
    fn gpu_seqreduce_matches_cpu() {
        if common::skip_without_gpu("gpu_seqreduce_matches_cpu") {
            return;
        }
        let d = dev();
        let mut rng = StdRng::seed_from_u64(4);
        for (rows, cols) in [(1, 1), (1, 257), (3, 7), (17, 1000), (64, 2048)] {
            let (values, mask) = random_padded(&mut rng, rows, cols);
            let (mut s, mut c, mut m) = (vec![0f32; rows], vec![0i32; rows], vec![0f32; rows]);
            seqreduce::padded_forward_cpu(
                &values,
                &mask,
                rows,
                cols,
                SeqReduceOut {
                    sums: &mut s,
                    counts: &mut c,
                    means: &mut m,
                },
            )
            .unwrap();
            let (dv, dm) = (up(&d, &values), up(&d, &mask));
            let (mut gs, mut gc, mut gm) = (
                d.stream().alloc_zeros::<f32>(rows).unwrap(),
                d.stream().alloc_zeros::<i32>(rows).unwrap(),
                d.stream().alloc_zeros::<f32>(rows).unwrap(),
            );
            seqreduce::padded_forward_cuda(
                &d,
                &dv.as_view(),
                &dm.as_view(),
                rows,
                cols,
                &mut gs.as_view_mut(),
                &mut gc.as_view_mut(),
                &mut gm.as_view_mut(),
            )
            .unwrap();
            assert_eq!(down(&d, &gc), c);
            common::assert_close("gpu padded sums", &widen(&down(&d, &gs)), &widen(&s), 1e-5, 1e-4);
            common::assert_close("gpu padded means", &widen(&down(&d, &gm)), &widen(&m), 1e-5, 1e-5);
            let seg = seqreduce::segment_ids_from_mask(&mask, rows, cols).unwrap();
            let dseg = up(&d, &seg);
            let (mut ps, mut pcn, mut pm) = (
                d.stream().alloc_zeros::<f32>(rows).unwrap(),
                d.stream().alloc_zeros::<i32>(rows).unwrap(),
                d.stream().alloc_zeros::<f32>(rows).unwrap(),
            );
            seqreduce::packed_forward_cuda(
                &d,
                &dv.as_view(),
                &dseg.as_view(),
                rows,
                &mut ps.as_view_mut(),
                &mut pcn.as_view_mut(),
                &mut pm.as_view_mut(),
            )
            .unwrap();
            assert_eq!(down(&d, &pcn), c);
            let first = down(&d, &ps);
            common::assert_close("gpu packed sums", &widen(&first), &widen(&s), 1e-5, 1e-4);
            // Deterministic: a second run gives bit-identical sums.
            seqreduce::packed_forward_cuda(
                &d,
                &dv.as_view(),
                &dseg.as_view(),
                rows,
                &mut ps.as_view_mut(),
                &mut pcn.as_view_mut(),
                &mut pm.as_view_mut(),
            )
            .unwrap();
            assert_eq!(down(&d, &ps), first, "packed sums differ between runs");
            let grad: Vec<f32> = (0..rows).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let (dg, dc) = (up(&d, &grad), up(&d, &c));
            for reduction in [Reduction::Sum, Reduction::Mean] {
                let mut want = vec![0f32; rows * cols];
                seqreduce::padded_backward_cpu(&grad, &c, reduction, &mask, rows, cols, &mut want).unwrap();
                let mut out = d.stream().alloc_zeros::<f32>(rows * cols).unwrap();
                seqreduce::padded_backward_cuda(
                    &d,
                    &dg.as_view(),
                    &dc.as_view(),
                    reduction,
                    &dm.as_view(),
                    rows,
                    cols,
                    &mut out.as_view_mut(),
                )
                .unwrap();
                common::assert_close("gpu padded backward", &widen(&down(&d, &out)), &widen(&want), 1e-6, 0.0);
                seqreduce::packed_backward_cuda(
                    &d,
                    &dg.as_view(),
                    &dc.as_view(),
                    reduction,
                    &dseg.as_view(),
                    rows,
                    &mut out.as_view_mut(),
                )
                .unwrap();
                common::assert_close("gpu packed backward", &widen(&down(&d, &out)), &widen(&want), 1e-6, 0.0);
            }
        }
    }

    #[test]
    fn gpu_sft_fdiv_goldens_and_sequence_level() {
        if common::skip_without_gpu("gpu_sft_fdiv_goldens_and_sequence_level") {
            return;
        }
        let d = dev();
        let j = losses_json();
        for set in j["sft_fdiv"]["sets"].as_array().unwrap() {
            let beta = set["beta"].as_f64().unwrap();
            let f = |v: Vec<f64>| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let (logp, ref_logp) = (f(f64s(&set["logp"])), f(f64s(&set["ref_logp"])));
            let n = logp.len();
            let (dl, dr, dm) = (up(&d, &logp), up(&d, &ref_logp), up(&d, &vec![1u8; n]));
            for (name, gold) in set["divergences"].as_object().unwrap() {
                let div: SftDivergence = name.parse().unwrap();
                let (mut loss, mut grad, mut cnt) = (
                    d.stream().alloc_zeros::<f32>(n).unwrap(),
                    d.stream().alloc_zeros::<f32>(n).unwrap(),
                    d.stream().alloc_zeros::<u32>(1).unwrap(),
                );
                sftloss::token_forward_cuda(
                    &d,
                    div,
                    beta as f32,
                    &dl.as_view(),
                    &dr.as_view(),
                    &dm.as_view(),
                    &mut loss.as_view_mut(),
                    &mut grad.as_view_mut(),
                    &mut cnt.as_view_mut(),
                )
                .unwrap();
                assert_eq!(down(&d, &cnt), vec![0]);
                // f32 inputs and math: loss is −h/β, so scale the tolerance by 1/β.
                common::assert_close(
                    &format!("gpu {name} β={beta} loss"),
                    &widen(&down(&d, &loss)),
                    &f64s(&gold["loss"]),
                    1e-4,
                    1e-5 / beta,
                );
                common::assert_close(
                    &format!("gpu {name} β={beta} grad"),
                    &widen(&down(&d, &grad)),
                    &f64s(&gold["dloss_dlogp"]),
                    1e-4,
                    1e-5,
                );
            }
        }
        // Random tokens incl. out-of-domain ones, token and sequence level, against the CPU.
        let mut rng = StdRng::seed_from_u64(33);
        let n = 100_003;
        let logp: Vec<f32> = (0..n).map(|_| rng.gen_range(-12.0..-0.1)).collect();
        let ref_logp: Vec<f32> = logp.iter().map(|&l| l - rng.gen_range(-3.0..3.0)).collect();
        let mask: Vec<u8> = (0..n).map(|_| rng.gen_bool(0.8) as u8).collect();
        let segs = 50;
        let seg: Vec<i32> = (0..n)
            .map(|t| if mask[t] != 0 { (t * segs / n) as i32 } else { -1 })
            .collect();
        let (dl, dr, dm, ds) = (up(&d, &logp), up(&d, &ref_logp), up(&d, &mask), up(&d, &seg));
        for div in SftDivergence::ALL {
            for beta in [0.5f32, 0.002] {
                let (mut l, mut g) = (vec![0f32; n], vec![0f32; n]);
                let c = sftloss::token_forward_cpu(div, beta as f64, &logp, &ref_logp, &mask, &mut l, &mut g).unwrap();
                let (mut gl, mut gg, mut gc) = (
                    d.stream().alloc_zeros::<f32>(n).unwrap(),
                    d.stream().alloc_zeros::<f32>(n).unwrap(),
                    d.stream().alloc_zeros::<u32>(1).unwrap(),
                );
                sftloss::token_forward_cuda(
                    &d,
                    div,
                    beta,
                    &dl.as_view(),
                    &dr.as_view(),
                    &dm.as_view(),
                    &mut gl.as_view_mut(),
                    &mut gg.as_view_mut(),
                    &mut gc.as_view_mut(),
                )
                .unwrap();
                let gcount = down(&d, &gc)[0] as i64;
                assert!(
                    (gcount - c as i64).abs() <= 2,
                    "{div} β={beta}: clamped {gcount} vs cpu {c} (f32 rounding at the boundary)"
                );
                common::assert_close(
                    &format!("gpu token {div} loss"),
                    &widen(&down(&d, &gl)),
                    &widen(&l),
                    1e-3,
                    1e-3 / beta as f64,
                );
                common::assert_close(
                    &format!("gpu token {div} grad"),
                    &widen(&down(&d, &gg)),
                    &widen(&g),
                    1e-3,
                    1e-3,
                );

                let (mut sl, mut sw) = (vec![0f32; segs], vec![0f32; n]);
                let c = sftloss::sequence_forward_cpu(div, beta as f64, &logp, &ref_logp, &seg, segs, &mut sl, &mut sw)
                    .unwrap();
                let (mut gsl, mut gsw) = (
                    d.stream().alloc_zeros::<f32>(segs).unwrap(),
                    d.stream().alloc_zeros::<f32>(n).unwrap(),
                );
                sftloss::sequence_forward_cuda(
                    &d,
                    div,
                    beta,
                    &dl.as_view(),
                    &dr.as_view(),
                    &ds.as_view(),
                    segs,
                    &mut gsl.as_view_mut(),
                    &mut gsw.as_view_mut(),
                    &mut gc.as_view_mut(),
                )
                .unwrap();
                assert_eq!(down(&d, &gc)[0] as usize, c, "{div} β={beta} sequence clamp count");
                common::assert_close(
                    &format!("gpu seq {div} loss"),
                    &widen(&down(&d, &gsl)),
                    &widen(&sl),
                    1e-3,
                    1e-2 / beta as f64,
                );
                common::assert_close(
                    &format!("gpu seq {div} weight"),
                    &widen(&down(&d, &gsw)),
                    &widen(&sw),
                    1e-3,
                    1e-3,
                );
            }
        }
    }
}
