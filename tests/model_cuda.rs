//! The CUDA transformer engine against the CPU engine and the transformers goldens (fixtures
//! README §2–§3) on all three fixture models, in f32 and bf16: per-token outputs, every parameter
//! gradient, the chunked head against the full logits, a few AdamW steps of `CudaEngine` against
//! `CpuEngine`, checkpoint round trips; and, without a GPU, that every CUDA entry point (the
//! library and the CLI) fails with one plain line naming the reason.
//!
//! GPU tests print `skipped: no GPU (<test>)` on machines without a usable CUDA device.

mod common;

use common::{arg, assert_clean_error, irbridge, TempDir};

use common::{assert_close, fixtures, load_goldens, skip_without_gpu, Golden};
use irbridge::model::cuda::{CudaForward, CudaModel, Precision};
use irbridge::model::{Batch, Grads, Model, Tensors};
use irbridge::ops::adamw::AdamWStep;
use irbridge::train::{CpuEngine, CudaEngine, Engine, TokenOutputs};
use std::collections::HashMap;
use std::path::PathBuf;

const MODELS: [&str; 3] = ["tiny-gpt2", "tiny-llama", "tiny-qwen2"];

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

/// The golden batch of a model (B = 4, T = 211, lengths 211/57/128/13) and its goldens.
fn golden(name: &str) -> (Batch, HashMap<String, Golden>) {
    let g = load_goldens(&fixtures().join(format!("golden/{name}.safetensors")));
    let (b, t) = (g["input_ids"].shape[0], g["input_ids"].shape[1]);
    let lengths: Vec<usize> = g["lengths"].i64().iter().map(|&l| l as usize).collect();
    let batch = Batch::causal_lm(&g["input_ids"].i64(), b, t, &lengths).unwrap();
    (batch, g)
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Tolerances `(per-token rtol, per-token atol, gradient relative Frobenius)` for CUDA vs CPU.
fn tol(p: Precision) -> (f64, f64, f64) {
    match p {
        Precision::F32 => (1e-5, 2e-4, 1e-4),
        Precision::Bf16 => (1e-2, 5e-2, 5e-2),
    }
}

/// The worst per-tensor `‖a − b‖ / ‖b‖` (0 when both are zero) and that tensor's name.
fn worst_rel(a: &Tensors, b: &Tensors) -> (f64, String) {
    let mut worst = (0f64, String::from("(none)"));
    for ((s, x), (_, y)) in a.iter().zip(b.iter()) {
        let num = x
            .iter()
            .zip(y)
            .map(|(p, q)| ((p - q) as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let den = y.iter().map(|&q| (q as f64).powi(2)).sum::<f64>().sqrt();
        let r = match (num == 0.0, den == 0.0) {
            (true, _) => 0.0,
            (false, true) => f64::INFINITY,
            (false, false) => num / den,
        };
        if r > worst.0 {
            worst = (r, s.name.clone());
        }
    }
    worst
}

/// Per-token outputs at the positions with a target.
fn at_targets(mask: &[bool], x: &[f32]) -> Vec<f64> {
    mask.iter().zip(x).filter(|(&m, _)| m).map(|(_, &v)| v as f64).collect()
}

/// `dlogp = 1` at every target (the golden objective L = Σ token log-probs).
fn ones(mask: &[bool]) -> Vec<f32> {
    mask.iter().map(|&t| if t { 1.0 } else { 0.0 }).collect()
}

/// CPU forward + backward of L = Σ logp: the reference side.
fn cpu_reference(m: &Model, batch: &Batch) -> (irbridge::model::Forward, Grads) {
    let f = m.forward(batch).unwrap();
    let mut g = m.new_grads();
    m.backward(&f, &ones(&f.target_mask()), &mut g).unwrap();
    (f, g)
}

/// CUDA vs CPU on one model and precision: per-token logp/lse/entropy/mean logit/argmax, the
/// golden token log-probs, and every parameter gradient.
fn check_parity(name: &str, precision: Precision) {
    let (batch, g) = golden(name);
    let m = Model::load(&model_dir(name)).unwrap();
    let (cf, cg) = cpu_reference(&m, &batch);
    let mut cm = CudaModel::new(&m, 0, precision).unwrap();
    let f: CudaForward = cm.forward(&batch).unwrap();
    let mask = cf.target_mask();
    assert_eq!(f.num_targets(), cf.num_targets());
    let (rtol, atol, grel) = tol(precision);
    let what = |q: &str| format!("{name} {precision} {q}");
    for (q, got, want) in [
        ("logp", f.logp(), cf.logp()),
        ("lse", f.lse(), cf.lse()),
        ("entropy", f.entropy(), cf.entropy()),
        ("logit_mean", f.logit_mean(), cf.logit_mean()),
    ] {
        assert_close(&what(q), &at_targets(&mask, got), &at_targets(&mask, want), rtol, atol);
    }
    // Zero wherever there is no target, as the CPU engine.
    assert!(
        f.logp().iter().zip(&mask).all(|(&x, &m)| m || x == 0.0),
        "{}",
        what("padding")
    );
    let differ = mask
        .iter()
        .enumerate()
        .filter(|&(i, &m)| m && f.argmax()[i] != cf.argmax()[i])
        .count();
    // Top-2 logit gaps are ~0.4 on average here, so bf16 rounding (~0.02 per logit) flips a few
    // percent of near-ties; f32 round-off flips one in a thousand at most.
    let allowed = match precision {
        Precision::F32 => 2,
        Precision::Bf16 => cf.num_targets() / 5,
    };
    assert!(differ <= allowed, "{}: {differ} argmax mismatches", what("argmax"));
    // Against transformers directly (README: ~10x the CPU tolerance on CUDA, TF32 off).
    if precision == Precision::F32 {
        let t_n = batch.seq();
        let want = g["token_logps"].f32();
        let got: Vec<f64> = (0..batch.batch())
            .flat_map(|b| (0..t_n - 1).map(move |t| (b, t)))
            .map(|(b, t)| f.logp()[b * t_n + t] as f64)
            .collect();
        assert_close(&what("golden token_logps"), &got, &f64s(&want), 0.0, 1e-3);
    }
    cm.backward(&f, &ones(&mask)).unwrap();
    let gg = cm.grads_to_host().unwrap();
    let (rel, worst) = worst_rel(&gg, &cg);
    eprintln!(
        "{}: worst gradient rel. Frobenius error {rel:.2e} ({worst})",
        what("grads")
    );
    assert!(
        rel <= grel,
        "{}: {worst} rel. error {rel:.2e} > {grel:.0e}",
        what("grads")
    );
    // A second backward accumulates: exactly twice the first.
    cm.backward(&f, &ones(&mask)).unwrap();
    let g2 = cm.grads_to_host().unwrap();
    for ((s, a), (_, b)) in g2.iter().zip(gg.iter()) {
        assert!(
            a.iter()
                .zip(b)
                .all(|(&x, &y)| (x - 2.0 * y).abs() <= 1e-5 * (1.0 + y.abs())),
            "{}: {} does not accumulate",
            what("grads"),
            s.name
        );
    }
    cm.zero_grads().unwrap();
    assert_eq!(cm.grad_sq_norm().unwrap(), 0.0, "{}", what("zero_grads"));
}

#[test]
fn gpu_gpt2_matches_cpu_f32_and_bf16() {
    if skip_without_gpu("gpu_gpt2_matches_cpu_f32_and_bf16") {
        return;
    }
    check_parity("tiny-gpt2", Precision::F32);
    check_parity("tiny-gpt2", Precision::Bf16);
}

#[test]
fn gpu_llama_matches_cpu_f32_and_bf16() {
    if skip_without_gpu("gpu_llama_matches_cpu_f32_and_bf16") {
        return;
    }
    check_parity("tiny-llama", Precision::F32);
    check_parity("tiny-llama", Precision::Bf16);
}

#[test]
fn gpu_qwen2_matches_cpu_f32_and_bf16() {
    if skip_without_gpu("gpu_qwen2_matches_cpu_f32_and_bf16") {
        return;
    }
    check_parity("tiny-qwen2", Precision::F32);
    check_parity("tiny-qwen2", Precision::Bf16);
}

/// The chunked head agrees with the full-logits path (and with the CPU's full logits and the
/// golden logit rows); the chunk size changes neither outputs nor gradients.
#[test]
fn gpu_chunked_head_matches_full_logits() {
    if skip_without_gpu("gpu_chunked_head_matches_full_logits") {
        return;
    }
    for name in MODELS {
        let (batch, g) = golden(name);
        let m = Model::load(&model_dir(name)).unwrap();
        let mut cm = CudaModel::new(&m, 0, Precision::F32).unwrap();
        let (b_n, t_n, v) = (batch.batch(), batch.seq(), m.config().vocab_size);
        let full = cm.forward_logits(&batch).unwrap();
        assert_eq!(full.len(), b_n * t_n * v);
        let cpu_full = m.forward_logits(&batch).unwrap();
        for (b, &len) in batch.lengths().iter().enumerate() {
            let r = b * t_n * v..(b * t_n + len) * v;
            assert_close(
                &format!("{name} full logits row {b}"),
                &f64s(&full[r.clone()]),
                &f64s(&cpu_full[r]),
                0.0,
                2e-4,
            );
            assert!(full[(b * t_n + len) * v..(b + 1) * t_n * v].iter().all(|&x| x == 0.0));
        }
        let pos = g["logits_rows_pos"].i64();
        let rows = g["logits_rows"].f32();
        for (k, bt) in pos.chunks(2).enumerate() {
            let at = (bt[0] as usize * t_n + bt[1] as usize) * v;
            assert_close(
                &format!("{name} golden logits_rows[{k}]"),
                &f64s(&full[at..at + v]),
                &f64s(&rows[k * v..(k + 1) * v]),
                0.0,
                1e-3,
            );
        }
        // Chunked log-softmax == the log-softmax twin over the full logits.
        let f = cm.forward(&batch).unwrap();
        let (mut lse, mut logp) = (vec![0f32; b_n * t_n], vec![0f32; b_n * t_n]);
        let out = irbridge::ops::logsoftmax::ForwardOut {
            lse: &mut lse,
            logp: &mut logp,
            entropy: None,
        };
        irbridge::ops::logsoftmax::forward_cpu(&full, b_n * t_n, v, batch.targets(), out).unwrap();
        let mask: Vec<bool> = batch.targets().iter().map(|&t| t != -100).collect();
        assert_close(
            &format!("{name} chunked vs full logp"),
            &at_targets(&mask, f.logp()),
            &at_targets(&mask, &logp),
            1e-6,
            2e-5,
        );
        // Chunk 7 (many partial chunks) vs the default.
        let w: Vec<f32> = mask
            .iter()
            .enumerate()
            .map(|(i, &t)| if t { ((i % 7) as f32 - 3.0) / 2.0 } else { 0.0 })
            .collect();
        cm.backward(&f, &w).unwrap();
        let g_default = cm.grads_to_host().unwrap();
        cm.zero_grads().unwrap();
        cm.set_lm_head_chunk(7).unwrap();
        let f7 = cm.forward(&batch).unwrap();
        assert_close(
            &format!("{name} chunk 7 logp"),
            &f64s(f7.logp()),
            &f64s(f.logp()),
            1e-6,
            1e-5,
        );
        cm.backward(&f7, &w).unwrap();
        let (rel, worst) = worst_rel(&cm.grads_to_host().unwrap(), &g_default);
        assert!(rel < 1e-5, "{name} chunk 7 vs default gradients: {worst} rel {rel:.2e}");
    }
}

/// Three optimizer steps of the trainers' loop (zero, forward, backward of the token-mean NLL,
/// norm, clip, AdamW with weight decay) on both engines agree; the CUDA engine's checkpoint
/// files round-trip bit-exactly and are the CPU engine's format.
#[test]
fn gpu_engine_steps_match_cpu_engine() {
    if skip_without_gpu("gpu_engine_steps_match_cpu_engine") {
        return;
    }
    for name in ["tiny-gpt2", "tiny-llama"] {
        let (batch, _) = golden(name);
        let m = Model::load(&model_dir(name)).unwrap();
        let p0 = m.params().clone();
        let mut cpu = CpuEngine::new(m.clone());
        let mut gpu = CudaEngine::new(CudaModel::new(&m, 0, Precision::F32).unwrap());
        // eps = 1 keeps the update linear in the gradient (AdamW's eps = 1e-8 turns the first
        // step into lr·sign(g), which flips on round-off for near-zero gradients); lr = 1 makes
        // the updates large against the f32 spacing of the weights.
        let hp = |step| AdamWStep {
            lr: 1.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1.0,
            weight_decay: 0.01,
            step,
        };
        for step in 1..=3u64 {
            let mut norms = [0f64; 2];
            let mut losses = [0f64; 2];
            for (k, e) in [&mut cpu as &mut dyn StepEngine, &mut gpu].into_iter().enumerate() {
                let (loss, norm) = e.step(&batch, &hp(step));
                losses[k] = loss;
                norms[k] = norm;
            }
            assert!(
                (losses[0] - losses[1]).abs() <= 1e-5 * losses[0].abs(),
                "{name} step {step}: loss cpu {} cuda {}",
                losses[0],
                losses[1]
            );
            assert!(
                (norms[0] - norms[1]).abs() <= 1e-4 * norms[0],
                "{name} step {step}: grad norm² cpu {} cuda {}",
                norms[0],
                norms[1]
            );
        }
        let pc = cpu.model().params().clone();
        let pg = gpu.model().params_to_host().unwrap();
        let delta = |p: &Tensors| -> Tensors {
            let mut d = p.clone();
            for (i, x) in d.data_mut().iter_mut().enumerate() {
                x.iter_mut().zip(p0.at(i)).for_each(|(a, &b)| *a -= b);
            }
            d
        };
        let (rel, worst) = worst_rel(&delta(&pg), &delta(&pc));
        assert!(rel < 1e-3, "{name}: parameter updates differ, {worst} rel {rel:.2e}");

        let dir = TempDir::new(&format!("steps-{name}"));
        let opt = dir.0.join("optimizer.safetensors");
        gpu.save_optimizer(&opt).unwrap();
        let (gm, gv) = gpu.moments_to_host().unwrap();
        let cpu_opt = dir.0.join("cpu-optimizer.safetensors");
        cpu.save_optimizer(&cpu_opt).unwrap();
        let mut cpu2 = CpuEngine::new(m.clone());
        cpu2.load_optimizer(&opt).unwrap(); // the CUDA file is the CPU format
        let mut gpu2 = CudaEngine::new(CudaModel::new(&m, 0, Precision::F32).unwrap());
        gpu2.load_optimizer(&opt).unwrap();
        let (gm2, gv2) = gpu2.moments_to_host().unwrap();
        for (a, b) in [(&gm, &gm2), (&gv, &gv2)] {
            for ((s, x), (_, y)) in a.iter().zip(b.iter()) {
                assert!(
                    x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{name}: moment {} not bit-exact after save/load",
                    s.name
                );
            }
        }
        let out = dir.0.join("model");
        gpu.save_model(&out).unwrap();
        let back = Model::load(&out).unwrap();
        for ((s, x), (_, y)) in back.params().iter().zip(pg.iter()) {
            assert!(
                x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                "{name}: {} not bit-exact after save/load",
                s.name
            );
        }
        assert!(out.join("tokenizer.json").is_file(), "tokenizer files are copied");
    }
}

/// One trainer-style step on either engine: `(loss, ‖g‖²)`.
trait StepEngine {
    fn step(&mut self, batch: &Batch, hp: &AdamWStep) -> (f64, f64);
}

impl<E: Engine> StepEngine for E {
    fn step(&mut self, batch: &Batch, hp: &AdamWStep) -> (f64, f64) {
        self.zero_grads().unwrap();
        let f = self.forward(batch).unwrap();
        let n = batch.targets().iter().filter(|&&t| t != -100).count() as f64;
        let mut loss = 0f64;
        let dlogp: Vec<f32> = batch
            .targets()
            .iter()
            .zip(f.logp())
            .map(|(&t, &lp)| {
                if t == -100 {
                    0.0
                } else {
                    loss -= lp as f64 / n;
                    (-1.0 / n) as f32
                }
            })
            .collect();
        self.backward(&f, &dlogp).unwrap();
        let norm = self.grad_sq_norm().unwrap();
        let clip = 0.5f64;
        if norm.sqrt() > clip {
            self.scale_grads((clip / norm.sqrt()) as f32).unwrap();
        }
        self.optimizer_step(hp).unwrap();
        (loss, norm)
    }
}

/// Configurations the CUDA kernels do not implement are refused before any device work (so
/// this runs everywhere), naming the key; without a GPU a supported model names the reason.
#[test]
fn unsupported_configs_and_missing_gpus_are_plain_errors() {
    let m = Model::load(&model_dir("tiny-gpt2")).unwrap();
    let mut raw = m.config().raw.clone();
    raw["scale_attn_weights"] = serde_json::Value::Bool(false);
    let cfg = irbridge::model::ModelConfig::from_json(raw).unwrap();
    let unscaled = Model::from_parts(cfg, m.params().clone()).unwrap();
    let err = format!("{:#}", CudaModel::new(&unscaled, 0, Precision::F32).unwrap_err());
    assert!(err.contains("scale_attn_weights"), "{err}");
    if let Some(why) = irbridge::device::cuda_unavailable_reason(0) {
        let err = format!("{:#}", CudaModel::new(&m, 0, Precision::Bf16).unwrap_err());
        assert!(err.contains(&why), "`{err}` should carry the reason `{why}`");
        let err = format!(
            "{:#}",
            CudaEngine::load(&model_dir("tiny-llama"), 0, Precision::F32)
                .err()
                .unwrap()
        );
        assert!(err.contains(&why), "{err}");
    }
}

/// `--device cuda` on `logps`, `eval` and `train`: without a GPU one clear line naming the
/// reason (and nothing written); with one, `logps` on the GPU reproduces the TRL goldens.
#[test]
fn cli_device_cuda_fails_cleanly_without_a_gpu_and_scores_with_one() {
    let f = fixtures();
    let model = arg(&model_dir("tiny-gpt2"));
    let data = arg(&f.join("e2e/dpo_input.jsonl"));
    let out = irbridge(&[
        "logps",
        "--model",
        &model,
        "--data",
        &data,
        "--max-length",
        "256",
        "--device",
        "cpu",
        "--dtype",
        "bf16",
    ]);
    assert_clean_error(&out, "--dtype bf16");
    match irbridge::device::cuda_unavailable_reason(0) {
        Some(why) => {
            common::say_skipped("cli_device_cuda scoring half");
            let out = irbridge(&[
                "logps",
                "--model",
                &model,
                "--data",
                &data,
                "--max-length",
                "256",
                "--device",
                "cuda",
            ]);
            assert_clean_error(&out, &why);
            let out = irbridge(&[
                "eval",
                "--policy",
                &model,
                "--ref",
                &model,
                "--data",
                &data,
                "--max-length",
                "256",
                "--device",
                "cuda:0",
            ]);
            assert_clean_error(&out, &why);
            let dir = TempDir::new("cli-train");
            let out_dir = dir.0.join("run");
            let sft = arg(&f.join("e2e/sft_input.jsonl"));
            let out = irbridge(&[
                "train",
                "sft",
                "--model",
                &model,
                "--data",
                &sft,
                "--output-dir",
                &arg(&out_dir),
                "--max-length",
                "256",
                "--device",
                "cuda",
            ]);
            assert_clean_error(&out, &why);
            assert!(!out_dir.exists(), "nothing written after a device error");
        }
        None => {
            let want: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(f.join("e2e/dpo_expected.json")).unwrap()).unwrap();
            let out = irbridge(&[
                "logps",
                "--model",
                &model,
                "--data",
                &data,
                "--max-length",
                "256",
                "--device",
                "cuda",
            ]);
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let got: Vec<serde_json::Value> = String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            let rows = want["rows"].as_array().unwrap();
            assert_eq!(got.len(), rows.len());
            for (g, w) in got.iter().zip(rows) {
                if w["dropped"].as_bool().unwrap() {
                    continue;
                }
                for side in ["chosen", "rejected"] {
                    let lp = g[format!("{side}_logps")].as_f64().unwrap();
                    let want_lp = w[format!("policy_{side}_logps")].as_f64().unwrap();
                    assert!((lp - want_lp).abs() < 2e-2, "{} {side}: {lp} vs {want_lp}", w["source"]);
                }
            }
        }
    }
}

/// `generate --device cuda`: without a GPU one clear line naming the reason (and `--dtype bf16`
/// on the CPU is refused as for the scoring commands); with one, greedy sampling on the GPU in
/// f32 starts with the CPU's token and bf16 samples the requested number of tokens.
#[test]
fn cli_generate_device_cuda_fails_cleanly_without_a_gpu_and_samples_with_one() {
    let model = arg(&model_dir("tiny-llama"));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "Once upon a time",
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
            "--json",
        ];
        args.extend_from_slice(extra);
        irbridge(&args)
    };
    assert_clean_error(&run(&["--device", "cpu", "--dtype", "bf16"]), "--dtype bf16");
    match irbridge::device::cuda_unavailable_reason(0) {
        Some(why) => {
            common::say_skipped("cli_generate_device_cuda sampling half");
            assert_clean_error(&run(&["--device", "cuda"]), &why);
            assert_clean_error(&run(&["--device", "cuda:0", "--dtype", "bf16"]), &why);
        }
        None => {
            let sample = |extra: &[&str]| -> serde_json::Value {
                let out = run(extra);
                assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
                serde_json::from_str(String::from_utf8(out.stdout).unwrap().trim()).unwrap()
            };
            let cpu = sample(&["--device", "cpu"]);
            let gpu = sample(&["--device", "cuda"]);
            let bf16 = sample(&["--device", "cuda:0", "--dtype", "bf16"]);
            // The whole greedy sequences are compared by tests/generate.rs (with its allowance
            // for f32 near-ties); here the first token must match.
            assert_eq!(gpu["token_ids"][0], cpu["token_ids"][0], "{gpu} vs {cpu}");
            for s in [&gpu, &bf16] {
                assert_eq!(s["token_ids"].as_array().unwrap().len(), 5, "{s}");
                assert!(s["logp"].as_f64().unwrap().is_finite(), "{s}");
            }
        }
    }
}

/// TokenOutputs of the CUDA forward are the trainers' view: same lengths as the batch.
#[test]
fn gpu_token_outputs_shape() {
    if skip_without_gpu("gpu_token_outputs_shape") {
        return;
    }
    let (batch, _) = golden("tiny-qwen2");
    let mut e = CudaEngine::load(&model_dir("tiny-qwen2"), 0, Precision::Bf16).unwrap();
    let f = e.forward(&batch).unwrap();
    let cells = batch.batch() * batch.seq();
    assert_eq!((f.batch(), f.seq()), (batch.batch(), batch.seq()));
    for len in [
        f.logp().len(),
        f.entropy().len(),
        f.argmax().len(),
        f.logit_mean().len(),
    ] {
        assert_eq!(len, cells);
    }
    // A batch with no target at all runs no kernel and gives zeros (and a no-op backward).
    let empty = Batch::new(&[5, 6, 0], 1, 3, &[2], &[-100, -100, -100]).unwrap();
    let f0 = e.forward(&empty).unwrap();
    assert!(f0.logp().iter().all(|&x| x == 0.0));
    e.backward(&f0, &[0.0; 3]).unwrap();
}
