//! Fused log-softmax + gather: the CPU twin against the goldens (fixtures README §5), finite
//! differences and random properties; the CUDA launchers against the same goldens and the CPU
//! twin when a GPU is present (visible skip otherwise).

mod common;

use half::bf16;
use irbridge::dtype::Elem;
use irbridge::ops::logsoftmax::{backward_cpu, forward_backward_cpu, forward_cpu, ForwardOut, IGNORE_INDEX};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};

const GOLDENS: [&str; 3] = ["logsoftmax_7x50257", "logsoftmax_33x1000", "logsoftmax_5x32003"];

/// One golden file with its index entry.
struct Case {
    rows: usize,
    vocab: usize,
    g: std::collections::HashMap<String, common::Golden>,
    index: serde_json::Value,
}

impl Case {
    fn load(name: &'static str) -> Case {
        let dir = common::fixtures().join("golden");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("logsoftmax_index.json")).unwrap()).unwrap();
        let index = index[name].clone();
        let g = common::load_goldens(&dir.join(format!("{name}.safetensors")));
        let rows = index["R"].as_u64().unwrap() as usize;
        let vocab = index["V"].as_u64().unwrap() as usize;
        assert_eq!(g["logits"].shape, vec![rows, vocab], "{name}: logits shape vs index");
        Case { rows, vocab, g, index }
    }
    fn d(&self, k: &str) -> &[f64] {
        &self.g[k].data
    }
    fn targets(&self) -> Vec<i64> {
        self.g["targets"].i64()
    }
    fn weights(&self) -> Vec<f32> {
        self.g["weights"].f32()
    }
    fn ignored_rows(&self) -> Vec<usize> {
        self.index["ignored_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect()
    }
    /// `(row, col)` pairs of `grad_sample_idx`.
    fn sample_idx(&self) -> Vec<(usize, usize)> {
        self.g["grad_sample_idx"]
            .i64()
            .chunks_exact(2)
            .map(|p| (p[0] as usize, p[1] as usize))
            .collect()
    }
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Forward outputs as owned vectors.
struct Fwd {
    lse: Vec<f32>,
    logp: Vec<f32>,
    entropy: Vec<f32>,
}

fn fwd_cpu<T: Elem>(x: &[T], rows: usize, vocab: usize, t: &[i64]) -> Fwd {
    let (mut lse, mut logp, mut entropy) = (vec![0f32; rows], vec![0f32; rows], vec![0f32; rows]);
    forward_cpu(
        x,
        rows,
        vocab,
        t,
        ForwardOut {
            lse: &mut lse,
            logp: &mut logp,
            entropy: Some(&mut entropy),
        },
    )
    .unwrap();
    Fwd { lse, logp, entropy }
}

fn check_forward(what: &str, f: &Fwd, lse: &[f64], logp: &[f64], entropy: &[f64], rtol: f64) {
    common::assert_close(&format!("{what} lse"), &widen(&f.lse), lse, rtol, 1e-6);
    common::assert_close(&format!("{what} target_logp"), &widen(&f.logp), logp, rtol, 1e-6);
    common::assert_close(&format!("{what} entropy"), &widen(&f.entropy), entropy, rtol, 1e-6);
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

#[test]
fn goldens_f32_forward_backward() {
    for name in GOLDENS {
        let c = Case::load(name);
        let (r, v, t, w) = (c.rows, c.vocab, c.targets(), c.weights());
        let logits = c.g["logits"].f32();
        let f = fwd_cpu(&logits, r, v, &t);
        check_forward(name, &f, c.d("lse"), c.d("target_logp"), c.d("entropy"), 1e-5);
        for &i in &c.ignored_rows() {
            assert_eq!(t[i], IGNORE_INDEX, "{name}: index says row {i} is ignored");
            assert_eq!(f.logp[i], 0.0, "{name}: ignored row {i} logp");
        }
        let sum: f64 = f.logp.iter().zip(&w).map(|(&l, &w)| l as f64 * w as f64).sum();
        let want = c.index["sum_weighted_logp"].as_f64().unwrap();
        assert!(
            (sum - want).abs() <= 1e-5 * want.abs(),
            "{name}: Σ w·logp {sum} vs {want}"
        );

        // Gradient of Σ_r w_r·logp_r: dlogp = w.
        let mut grad = logits.clone();
        backward_cpu(&mut grad, r, v, &t, &f.lse, &w).unwrap();
        let grad = widen(&grad);
        let sampled: Vec<f64> = c.sample_idx().iter().map(|&(i, j)| grad[i * v + j]).collect();
        let want = c.d("grad_sample");
        common::assert_close(
            &format!("{name} grad_sample"),
            &sampled,
            want,
            1e-5,
            1e-6 * max_abs(want),
        );
        if c.index["full_grad_stored"].as_bool().unwrap() {
            let want = c.d("grad");
            common::assert_close(&format!("{name} grad"), &grad, want, 1e-5, 1e-6 * max_abs(want));
        }
        for &i in &c.ignored_rows() {
            assert!(
                grad[i * v..(i + 1) * v].iter().all(|&g| g == 0.0),
                "{name}: ignored row {i} gradient"
            );
        }
    }
}

#[test]
fn goldens_bf16_against_from_bf16_references() {
    for name in GOLDENS {
        let c = Case::load(name);
        let (r, v, t, w) = (c.rows, c.vocab, c.targets(), c.weights());
        let logits = c.g["logits_bf16"].bf16();
        let f = fwd_cpu(&logits, r, v, &t);
        let what = format!("{name} bf16");
        check_forward(
            &what,
            &f,
            c.d("lse_from_bf16"),
            c.d("target_logp_from_bf16"),
            c.d("entropy_from_bf16"),
            1e-5,
        );
        let mut grad = logits.clone();
        backward_cpu(&mut grad, r, v, &t, &f.lse, &w).unwrap();
        let sampled: Vec<f64> = c.sample_idx().iter().map(|&(i, j)| grad[i * v + j].to_f64()).collect();
        let want = c.d("grad_from_bf16_sample");
        common::assert_close(
            &format!("{what} grad_from_bf16_sample"),
            &sampled,
            want,
            1e-2,
            1e-4 * max_abs(want),
        );
    }
}

#[test]
fn goldens_forward_backward_in_one_call() {
    for name in GOLDENS {
        let c = Case::load(name);
        let (r, v, t, w) = (c.rows, c.vocab, c.targets(), c.weights());
        let mut grad = c.g["logits"].f32();
        let (mut lse, mut logp) = (vec![0f32; r], vec![0f32; r]);
        let out = ForwardOut {
            lse: &mut lse,
            logp: &mut logp,
            entropy: None,
        };
        forward_backward_cpu(&mut grad, r, v, &t, &w, out).unwrap();
        common::assert_close(&format!("{name} fwd_bwd lse"), &widen(&lse), c.d("lse"), 1e-5, 1e-6);
        common::assert_close(
            &format!("{name} fwd_bwd logp"),
            &widen(&logp),
            c.d("target_logp"),
            1e-5,
            1e-6,
        );
        let sampled: Vec<f64> = c.sample_idx().iter().map(|&(i, j)| grad[i * v + j] as f64).collect();
        let want = c.d("grad_sample");
        common::assert_close(
            &format!("{name} fwd_bwd grad_sample"),
            &sampled,
            want,
            1e-5,
            1e-6 * max_abs(want),
        );
    }
}

/// Reference log-softmax of one row in f64: `(lse, entropy)`.
fn row_ref_f64(x: &[f64]) -> (f64, f64) {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let s: f64 = x.iter().map(|&v| (v - m).exp()).sum();
    let lse = m + s.ln();
    let entropy = -x.iter().map(|&v| (v - lse).exp() * (v - lse)).sum::<f64>();
    (lse, entropy)
}

/// Σ_r w_r·logp_r in f64.
fn objective_f64(x: &[f64], vocab: usize, t: &[i64], w: &[f32]) -> f64 {
    x.chunks(vocab)
        .zip(t.iter().zip(w))
        .filter(|(_, (&t, _))| t != IGNORE_INDEX)
        .map(|(row, (&t, &w))| w as f64 * (row[t as usize] - row_ref_f64(row).0))
        .sum()
}

#[test]
fn backward_matches_central_differences() {
    let (r, v) = (4, 37);
    let mut rng = StdRng::seed_from_u64(7);
    let normal = Normal::new(0.0f32, 2.0).unwrap();
    let logits: Vec<f32> = (0..r * v).map(|_| normal.sample(&mut rng)).collect();
    let t = vec![5i64, IGNORE_INDEX, 0, 36];
    let w: Vec<f32> = (0..r).map(|_| rng.gen_range(0.5..2.0)).collect();
    let f = fwd_cpu(&logits, r, v, &t);
    let mut grad = logits.clone();
    backward_cpu(&mut grad, r, v, &t, &f.lse, &w).unwrap();

    let x64 = widen(&logits);
    let h = 1e-4;
    // Target columns, non-target columns, and the ignored row.
    let entries = [(0, 5), (0, 6), (2, 0), (2, 36), (3, 36), (3, 1), (1, 5), (1, 20)];
    for (i, j) in entries {
        let k = i * v + j;
        let (mut xp, mut xm) = (x64.clone(), x64.clone());
        xp[k] += h;
        xm[k] -= h;
        let fd = (objective_f64(&xp, v, &t, &w) - objective_f64(&xm, v, &t, &w)) / (2.0 * h);
        let g = grad[k] as f64;
        assert!(
            (g - fd).abs() <= 1e-5 + 1e-4 * fd.abs(),
            "grad[{i},{j}] = {g}, central difference {fd}"
        );
    }
}

/// Random logits with a given distribution, targets with some ignored rows.
fn random_case(rng: &mut StdRng, r: usize, v: usize, spread: f32, ignore_every: usize) -> (Vec<f32>, Vec<i64>) {
    let x: Vec<f32> = (0..r * v).map(|_| rng.gen_range(-spread..spread)).collect();
    let t = (0..r)
        .map(|i| {
            if ignore_every > 0 && i % ignore_every == 1 {
                IGNORE_INDEX
            } else {
                rng.gen_range(0..v as i64)
            }
        })
        .collect();
    (x, t)
}

/// Checks the CPU forward against the f64 reference on the values the twin saw (`x` as f32).
fn check_against_f64(what: &str, x: &[f32], r: usize, v: usize, t: &[i64], f: &Fwd) {
    let x64 = widen(x);
    let (mut lse, mut logp, mut ent) = (vec![], vec![], vec![]);
    for (row, &ti) in x64.chunks(v).zip(t) {
        let (l, h) = row_ref_f64(row);
        lse.push(l);
        ent.push(h);
        logp.push(if ti == IGNORE_INDEX { 0.0 } else { row[ti as usize] - l });
    }
    assert_eq!(lse.len(), r);
    check_forward(what, f, &lse, &logp, &ent, 1e-5);
}

#[test]
fn random_shapes_match_f64_reference() {
    let mut rng = StdRng::seed_from_u64(42);
    // V not a multiple of 256 or 8, R = 1, tiny V, logits ±80.
    for &(r, v, spread) in &[
        (1, 1001, 4.0),
        (5, 257, 80.0),
        (3, 7, 80.0),
        (2, 1, 3.0),
        (9, 300, 10.0),
    ] {
        let (x, t) = random_case(&mut rng, r, v, spread, 3);
        let f = fwd_cpu(&x, r, v, &t);
        check_against_f64(&format!("f32 {r}x{v}±{spread}"), &x, r, v, &t, &f);
        // bf16 storage: the reference is computed from the rounded values.
        let xb: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
        let fb = fwd_cpu(&xb, r, v, &t);
        let xr: Vec<f32> = xb.iter().map(|b| b.to_f32()).collect();
        check_against_f64(&format!("bf16 {r}x{v}±{spread}"), &xr, r, v, &t, &fb);
        if v == 1 {
            // One class: lse = x, logp = 0 for every kept row, entropy 0.
            assert!(f.logp.iter().all(|&l| l == 0.0) && f.entropy.iter().all(|&h| h.abs() < 1e-6));
        }
    }
}

#[test]
fn confident_true_class_gradient_is_formed_in_f32() {
    // p_t ≈ 0.995: in bf16, 1 − p rounded after −p was rounded would be 0.0039 or 0.0078; formed
    // in f32 and rounded once it is 0.0050 to bf16 precision.
    let v = 301;
    let mut x = vec![-10.0f32; v];
    x[17] = 1.0;
    let t = [17i64];
    let (lse_ref, _) = row_ref_f64(&widen(&x));
    let want = 1.0 - (1.0 - lse_ref).exp();
    assert!((0.004..0.006).contains(&want), "test setup: 1 − p = {want}");

    let xb: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
    let f = fwd_cpu(&xb, 1, v, &t);
    let mut g = xb.clone();
    backward_cpu(&mut g, 1, v, &t, &f.lse, &[1.0]).unwrap();
    let got = g[17].to_f64();
    assert!(
        (got - want).abs() <= 5e-3 * want,
        "bf16 true-class gradient {got} vs {want}"
    );

    // f32: the gradient row sums to 0 (softmax sums to 1).
    let f = fwd_cpu(&x, 1, v, &t);
    let mut g = x.clone();
    backward_cpu(&mut g, 1, v, &t, &f.lse, &[1.0]).unwrap();
    assert!(
        ((g[17] as f64) - want).abs() <= 1e-3 * want,
        "f32 true-class gradient {} vs {want}",
        g[17]
    );
    let s: f64 = g.iter().map(|&a| a as f64).sum();
    assert!(s.abs() < 1e-6, "gradient row sum {s}");
}

#[test]
fn all_rows_ignored() {
    let mut rng = StdRng::seed_from_u64(3);
    let (r, v) = (4, 129);
    let (x, _) = random_case(&mut rng, r, v, 5.0, 0);
    let t = vec![IGNORE_INDEX; r];
    let f = fwd_cpu(&x, r, v, &t);
    assert!(f.logp.iter().all(|&l| l == 0.0), "logp of ignored rows");
    check_against_f64("all ignored", &x, r, v, &t, &f);
    let mut g = x.clone();
    backward_cpu(&mut g, r, v, &t, &f.lse, &[1.0; 4]).unwrap();
    assert!(g.iter().all(|&a| a == 0.0), "gradient of ignored rows");
}

#[test]
fn forward_backward_equals_forward_then_backward() {
    let mut rng = StdRng::seed_from_u64(11);
    for &(r, v, spread) in &[(6, 1003, 80.0), (1, 64, 3.0), (3, 9, 1.0)] {
        let (x, t) = random_case(&mut rng, r, v, spread, 2);
        let dlogp: Vec<f32> = (0..r).map(|_| rng.gen_range(-2.0..2.0)).collect();
        for bf in [false, true] {
            let check = |what: &str, a: &[f32], b: &[f32]| assert_eq!(a, b, "{what} {r}x{v} bf16={bf}");
            if bf {
                let xb: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
                let (sep, fused) = fwd_bwd_both(&xb, r, v, &t, &dlogp);
                check("lse", &sep.0.lse, &fused.0.lse);
                check("logp", &sep.0.logp, &fused.0.logp);
                check("entropy", &sep.0.entropy, &fused.0.entropy);
                assert_eq!(sep.1, fused.1, "bf16 grad {r}x{v}");
            } else {
                let (sep, fused) = fwd_bwd_both(&x, r, v, &t, &dlogp);
                check("lse", &sep.0.lse, &fused.0.lse);
                check("logp", &sep.0.logp, &fused.0.logp);
                check("entropy", &sep.0.entropy, &fused.0.entropy);
                check("grad", &sep.1, &fused.1);
            }
        }
    }
}

type FwdGrad<T> = (Fwd, Vec<T>);

fn fwd_bwd_both<T: Elem + PartialEq>(
    x: &[T],
    r: usize,
    v: usize,
    t: &[i64],
    dlogp: &[f32],
) -> (FwdGrad<T>, FwdGrad<T>) {
    let f = fwd_cpu(x, r, v, t);
    let mut g = x.to_vec();
    backward_cpu(&mut g, r, v, t, &f.lse, dlogp).unwrap();
    let mut g2 = x.to_vec();
    let (mut lse, mut logp, mut entropy) = (vec![0f32; r], vec![0f32; r], vec![0f32; r]);
    let out = ForwardOut {
        lse: &mut lse,
        logp: &mut logp,
        entropy: Some(&mut entropy),
    };
    forward_backward_cpu(&mut g2, r, v, t, dlogp, out).unwrap();
    ((f, g), (Fwd { lse, logp, entropy }, g2))
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_tensor() {
    let (r, v) = (3, 5);
    let x = vec![0.5f32; r * v];
    let t = [1i64, IGNORE_INDEX, 4];
    let (mut lse, mut logp, mut ent) = (vec![0f32; r], vec![0f32; r], vec![0f32; r]);
    macro_rules! out {
        ($lse_len:expr, $ent_len:expr) => {
            ForwardOut {
                lse: &mut lse[..$lse_len],
                logp: &mut logp[..],
                entropy: Some(&mut ent[..$ent_len]),
            }
        };
    }
    let e = err_text(forward_cpu(&x[..14], r, v, &t, out!(3, 3)));
    assert!(e.contains("logits") && e.contains("14"), "{e}");
    let e = err_text(forward_cpu(&x, r, v, &t[..2], out!(3, 3)));
    assert!(e.contains("targets") && e.contains("got 2"), "{e}");
    let e = err_text(forward_cpu(&x, r, v, &[1, 5, 0], out!(3, 3)));
    assert!(e.contains("targets[1] = 5"), "{e}");
    let e = err_text(forward_cpu(&x, r, v, &[1, -1, 0], out!(3, 3)));
    assert!(e.contains("targets[1] = -1"), "{e}");
    let e = err_text(forward_cpu(&x, r, v, &t, out!(2, 3)));
    assert!(e.contains("lse"), "{e}");
    let e = err_text(forward_cpu(&x, r, v, &t, out!(3, 1)));
    assert!(e.contains("entropy"), "{e}");
    let e = err_text(forward_cpu(&x, r, 0, &t, out!(3, 3)));
    assert!(e.contains("vocabulary"), "{e}");

    let mut g = x.clone();
    let e = err_text(backward_cpu(&mut g, r, v, &t, &[0.0; 3], &[1.0; 2]));
    assert!(e.contains("dlogp"), "{e}");
    let e = err_text(backward_cpu(&mut g, r, v, &t, &[0.0; 4], &[1.0; 3]));
    assert!(e.contains("lse"), "{e}");
    let e = err_text(backward_cpu(&mut g, r, v, &[0, 0, 9], &[0.0; 3], &[1.0; 3]));
    assert!(e.contains("targets[2] = 9"), "{e}");
    assert_eq!(g, x, "a rejected backward must not touch the logits");
    let (mut l2, mut p2) = (vec![0f32; r], vec![0f32; r]);
    let out2 = ForwardOut {
        lse: &mut l2,
        logp: &mut p2,
        entropy: None,
    };
    let e = err_text(forward_backward_cpu(&mut g, r, v, &t, &[1.0; 4], out2));
    assert!(e.contains("dlogp"), "{e}");
}

/// CUDA: the same checks on the GPU, when one is present.
mod gpu {
    use super::*;
    use cudarc::driver::CudaSlice;
    use irbridge::device::CudaDevice;
    use irbridge::ops::logsoftmax::{
        backward_cuda, forward_backward_cuda, forward_cuda, unfused_backward_cuda, unfused_forward_cuda, CudaElem,
        CudaForwardOut,
    };
    use std::sync::Arc;

    /// Results of the three CUDA paths on one input.
    struct GpuRun<T> {
        fwd: Fwd,
        grad_two_launch: Vec<T>,
        fwd_bwd: Fwd,
        grad_one_launch: Vec<T>,
    }

    /// Runs forward(+entropy), backward and forward_backward(+entropy) on the GPU. `offset`
    /// places the logits that many elements into the allocation (unaligned rows).
    fn run_gpu<T: CudaElem>(
        dev: &Arc<CudaDevice>,
        x: &[T],
        offset: usize,
        r: usize,
        v: usize,
        t: &[i64],
        dlogp: &[f32],
    ) -> GpuRun<T> {
        let s = dev.stream();
        let mut host = vec![T::from_f32(0.0); offset];
        host.extend_from_slice(x);
        let d_t = s.clone_htod(t).unwrap();
        let d_dlogp = s.clone_htod(dlogp).unwrap();
        let mut lse: CudaSlice<f32> = s.alloc_zeros(r).unwrap();
        let mut logp: CudaSlice<f32> = s.alloc_zeros(r).unwrap();
        let mut ent: CudaSlice<f32> = s.alloc_zeros(r).unwrap();

        let mut d_x = s.clone_htod(&host).unwrap();
        let out = CudaForwardOut {
            lse: lse.as_view_mut(),
            logp: logp.as_view_mut(),
            entropy: Some(ent.as_view_mut()),
        };
        forward_cuda(dev, &d_x.slice(offset..), r, v, &d_t.as_view(), out).unwrap();
        let fwd = Fwd {
            lse: s.clone_dtoh(&lse).unwrap(),
            logp: s.clone_dtoh(&logp).unwrap(),
            entropy: s.clone_dtoh(&ent).unwrap(),
        };
        backward_cuda(
            dev,
            &mut d_x.slice_mut(offset..),
            r,
            v,
            &d_t.as_view(),
            &lse.as_view(),
            &d_dlogp.as_view(),
        )
        .unwrap();
        let grad_two_launch = s.clone_dtoh(&d_x.slice(offset..)).unwrap();

        let mut d_x = s.clone_htod(&host).unwrap();
        let (mut lse2, mut logp2, mut ent2): (CudaSlice<f32>, CudaSlice<f32>, CudaSlice<f32>) = (
            s.alloc_zeros(r).unwrap(),
            s.alloc_zeros(r).unwrap(),
            s.alloc_zeros(r).unwrap(),
        );
        let out = CudaForwardOut {
            lse: lse2.as_view_mut(),
            logp: logp2.as_view_mut(),
            entropy: Some(ent2.as_view_mut()),
        };
        forward_backward_cuda(
            dev,
            &mut d_x.slice_mut(offset..),
            r,
            v,
            &d_t.as_view(),
            &d_dlogp.as_view(),
            out,
        )
        .unwrap();
        let fwd_bwd = Fwd {
            lse: s.clone_dtoh(&lse2).unwrap(),
            logp: s.clone_dtoh(&logp2).unwrap(),
            entropy: s.clone_dtoh(&ent2).unwrap(),
        };
        let grad_one_launch = s.clone_dtoh(&d_x.slice(offset..)).unwrap();
        s.synchronize().unwrap();
        GpuRun {
            fwd,
            grad_two_launch,
            fwd_bwd,
            grad_one_launch,
        }
    }

    fn device(test: &str) -> Option<Arc<CudaDevice>> {
        if common::skip_without_gpu(test) {
            return None;
        }
        Some(CudaDevice::get(0).expect("CUDA device 0"))
    }

    fn to64<T: Elem>(x: &[T]) -> Vec<f64> {
        x.iter().map(|a| a.to_f32() as f64).collect()
    }

    #[test]
    fn gpu_goldens_f32_and_bf16() {
        let Some(dev) = device("logsoftmax gpu_goldens_f32_and_bf16") else {
            return;
        };
        for name in GOLDENS {
            let c = Case::load(name);
            let (r, v, t, w) = (c.rows, c.vocab, c.targets(), c.weights());
            let idx = c.sample_idx();
            for offset in [0, 1] {
                let what = format!("cuda {name} f32 offset {offset}");
                let run = run_gpu(&dev, &c.g["logits"].f32(), offset, r, v, &t, &w);
                for f in [&run.fwd, &run.fwd_bwd] {
                    check_forward(&what, f, c.d("lse"), c.d("target_logp"), c.d("entropy"), 1e-5);
                }
                let want = c.d("grad_sample");
                for g in [&run.grad_two_launch, &run.grad_one_launch] {
                    let got: Vec<f64> = idx.iter().map(|&(i, j)| g[i * v + j] as f64).collect();
                    common::assert_close(&format!("{what} grad_sample"), &got, want, 1e-4, 1e-6 * max_abs(want));
                    if c.index["full_grad_stored"].as_bool().unwrap() {
                        let want = c.d("grad");
                        common::assert_close(&format!("{what} grad"), &to64(g), want, 1e-4, 1e-6 * max_abs(want));
                    }
                }

                let what = format!("cuda {name} bf16 offset {offset}");
                let run = run_gpu(&dev, &c.g["logits_bf16"].bf16(), offset, r, v, &t, &w);
                for f in [&run.fwd, &run.fwd_bwd] {
                    let (l, p, h) = (
                        c.d("lse_from_bf16"),
                        c.d("target_logp_from_bf16"),
                        c.d("entropy_from_bf16"),
                    );
                    check_forward(&what, f, l, p, h, 1e-5);
                }
                let want = c.d("grad_from_bf16_sample");
                for g in [&run.grad_two_launch, &run.grad_one_launch] {
                    let got: Vec<f64> = idx.iter().map(|&(i, j)| g[i * v + j].to_f64()).collect();
                    common::assert_close(&format!("{what} grad"), &got, want, 1e-2, 1e-4 * max_abs(want));
                }
            }
        }
    }

    fn compare_cpu_gpu<T: CudaElem + PartialEq>(
        dev: &Arc<CudaDevice>,
        x: &[T],
        r: usize,
        v: usize,
        t: &[i64],
        dlogp: &[f32],
    ) {
        let what = format!("{} {r}x{v}", T::NAME);
        // The CPU twin rejects out-of-range targets; the GPU treats them as ignored.
        let t_cpu: Vec<i64> = t
            .iter()
            .map(|&a| if a < 0 || a >= v as i64 { IGNORE_INDEX } else { a })
            .collect();
        let ((f, g), _) = fwd_bwd_both(x, r, v, &t_cpu, dlogp);
        let (lse, logp, ent) = (widen(&f.lse), widen(&f.logp), widen(&f.entropy));
        let grad_tol = if T::NAME == "bf16" { 1e-2 } else { 1e-4 };
        let g64 = to64(&g);
        for offset in [0, 3] {
            let run = run_gpu(dev, x, offset, r, v, t, dlogp);
            for fw in [&run.fwd, &run.fwd_bwd] {
                check_forward(
                    &format!("cuda vs cpu {what} offset {offset}"),
                    fw,
                    &lse,
                    &logp,
                    &ent,
                    1e-5,
                );
            }
            for gg in [&run.grad_two_launch, &run.grad_one_launch] {
                let what = format!("cuda vs cpu {what} grad offset {offset}");
                common::assert_close(&what, &to64(gg), &g64, grad_tol, 1e-6 * max_abs(&g64).max(1e-30));
            }
        }
    }

    #[test]
    fn gpu_matches_cpu_on_random_inputs() {
        let Some(dev) = device("logsoftmax gpu_matches_cpu_on_random_inputs") else {
            return;
        };
        let mut rng = StdRng::seed_from_u64(5);
        for &(r, v, spread) in &[
            (1, 1001, 4.0),
            (7, 50257, 80.0),
            (5, 3, 10.0),
            (16, 4099, 6.0),
            (3, 8, 2.0),
        ] {
            let (x, mut t) = random_case(&mut rng, r, v, spread, 3);
            if r > 4 {
                t[r - 1] = v as i64; // out of range: ignored on the GPU
                t[r - 2] = -7;
            }
            let dlogp: Vec<f32> = (0..r).map(|_| rng.gen_range(-2.0..2.0)).collect();
            compare_cpu_gpu(&dev, &x, r, v, &t, &dlogp);
            let xb: Vec<bf16> = x.iter().map(|&a| bf16::from_f32(a)).collect();
            compare_cpu_gpu(&dev, &xb, r, v, &t, &dlogp);
        }
    }

    #[test]
    fn gpu_unfused_baseline_matches_fused() {
        let Some(dev) = device("logsoftmax gpu_unfused_baseline_matches_fused") else {
            return;
        };
        let c = Case::load("logsoftmax_33x1000");
        let (r, v, t, w) = (c.rows, c.vocab, c.targets(), c.weights());
        let s = dev.stream();
        let mut d_x = s.clone_htod(&c.g["logits"].f32()).unwrap();
        let d_t = s.clone_htod(&t).unwrap();
        let d_w = s.clone_htod(&w).unwrap();
        let mut full: CudaSlice<f32> = s.alloc_zeros(r * v).unwrap();
        let mut lse: CudaSlice<f32> = s.alloc_zeros(r).unwrap();
        let mut logp: CudaSlice<f32> = s.alloc_zeros(r).unwrap();
        unfused_forward_cuda(
            &dev,
            &d_x.as_view(),
            r,
            v,
            &d_t.as_view(),
            &mut full.as_view_mut(),
            &mut lse.as_view_mut(),
            &mut logp.as_view_mut(),
        )
        .unwrap();
        unfused_backward_cuda(
            &dev,
            &full.as_view(),
            r,
            v,
            &d_t.as_view(),
            &d_w.as_view(),
            &mut d_x.as_view_mut(),
        )
        .unwrap();
        let (lse, logp, grad) = (
            s.clone_dtoh(&lse).unwrap(),
            s.clone_dtoh(&logp).unwrap(),
            s.clone_dtoh(&d_x).unwrap(),
        );
        s.synchronize().unwrap();
        common::assert_close("unfused lse", &widen(&lse), c.d("lse"), 1e-5, 1e-6);
        common::assert_close("unfused logp", &widen(&logp), c.d("target_logp"), 1e-5, 1e-6);
        let want = c.d("grad");
        common::assert_close("unfused grad", &widen(&grad), want, 1e-4, 1e-6 * max_abs(want));
    }

    #[test]
    fn gpu_launchers_reject_bad_lengths() {
        let Some(dev) = device("logsoftmax gpu_launchers_reject_bad_lengths") else {
            return;
        };
        let s = dev.stream();
        let (r, v) = (3, 5);
        let mut x = s.clone_htod(&vec![0.5f32; r * v]).unwrap();
        let t = s.clone_htod(&[1i64, IGNORE_INDEX, 99]).unwrap();
        let mut rowbuf: Vec<CudaSlice<f32>> = (0..4).map(|_| s.alloc_zeros(r).unwrap()).collect();
        let short: CudaSlice<f32> = s.alloc_zeros(r - 1).unwrap();
        let [a, b, c, d] = &mut rowbuf[..] else { unreachable!() };
        let out = CudaForwardOut {
            lse: a.as_view_mut(),
            logp: b.as_view_mut(),
            entropy: None,
        };
        let e = err_text(forward_cuda(&dev, &x.slice(1..), r, v, &t.as_view(), out));
        assert!(e.contains("logits"), "{e}");
        let out = CudaForwardOut {
            lse: a.as_view_mut(),
            logp: b.as_view_mut(),
            entropy: None,
        };
        let e = err_text(forward_cuda(&dev, &x.as_view(), r, v, &t.slice(1..), out));
        assert!(e.contains("targets"), "{e}");
        let out = CudaForwardOut {
            lse: a.as_view_mut(),
            logp: b.as_view_mut(),
            entropy: Some(c.slice_mut(1..)),
        };
        let e = err_text(forward_cuda(&dev, &x.as_view(), r, v, &t.as_view(), out));
        assert!(e.contains("entropy"), "{e}");
        let e = err_text(backward_cuda(
            &dev,
            &mut x.as_view_mut(),
            r,
            v,
            &t.as_view(),
            &short.as_view(),
            &d.as_view(),
        ));
        assert!(e.contains("lse"), "{e}");
        let out = CudaForwardOut {
            lse: a.as_view_mut(),
            logp: b.as_view_mut(),
            entropy: None,
        };
        let e = err_text(forward_backward_cuda(
            &dev,
            &mut x.as_view_mut(),
            r,
            v,
            &t.as_view(),
            &short.as_view(),
            out,
        ));
        assert!(e.contains("dlogp"), "{e}");
        // Target 99 is out of range: accepted on the GPU (no host copy) and treated as ignored.
        let out = CudaForwardOut {
            lse: a.as_view_mut(),
            logp: b.as_view_mut(),
            entropy: None,
        };
        forward_cuda(&dev, &x.as_view(), r, v, &t.as_view(), out).unwrap();
        let logp = s.clone_dtoh(&*b).unwrap();
        s.synchronize().unwrap();
        assert_eq!(logp[2], 0.0, "out-of-range target must read as ignored");
        assert!((logp[0] + (v as f32).ln()).abs() < 1e-6, "uniform row logp {}", logp[0]);
    }
}
