//! The training loop end to end on the tiny GPT-2 fixture: gradient-accumulation invariance
//! (REFERENCE §6), exact resume, DPO's step-0 identities (§5), checkpoint rotation and refusal,
//! config errors, and the training-level faults of §9 that the data tests cannot see.
//!
//! Every run is a few optimizer steps on sequences of a few dozen tokens, written to a fresh
//! folder under the system temp dir.
mod common;

use common::{arg, irbridge, TempDir};

use irbridge::data::{read_records, tokenize_dpo, tokenize_sft, TokenizeOptions, TokenizedSeq, Tokenizer};
use irbridge::model::Model;
use irbridge::train::dpo::{DpoTask, PairSeqs, RefSource};
use irbridge::train::sft::SftTask;
use irbridge::train::trainer::Task;
use irbridge::train::{self, CpuEngine, Engine, Kind, RunOptions, TrainConfig};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::process::Output;

// ---------------------------------------------------------------- helpers

fn model_dir() -> PathBuf {
    common::fixtures().join("models/tiny-gpt2")
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&model_dir()).expect("loading the tiny-gpt2 tokenizer")
}

const WORDS: [&str; 8] = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"];

/// `n` words starting at `offset` of a fixed list, each with a leading space.
fn words(offset: usize, n: usize) -> String {
    (0..n)
        .map(|k| format!(" {}", WORDS[(offset + k) % WORDS.len()]))
        .collect()
}

/// SFT prompt/completion rows whose completions (1..=17 words) and prompts differ in length, so
/// a reduction that averaged per micro-batch would weigh tokens differently.
fn sft_jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            let prompt = format!("Question {i}:{} list words.", " please".repeat(i % 3));
            json!({"prompt": prompt, "completion": words(i, 1 + (i * 5) % 17)}).to_string() + "\n"
        })
        .collect()
}

/// DPO prompt/chosen/rejected rows with chosen and rejected of different lengths.
fn dpo_jsonl(n: usize) -> String {
    (0..n)
        .map(|i| {
            let prompt = format!("Pair {i}:{} say words.", " kindly".repeat(i % 2));
            json!({"prompt": prompt, "chosen": words(i, 2 + (i * 3) % 9), "rejected": words(i + 3, 1 + (i * 7) % 11)})
                .to_string()
                + "\n"
        })
        .collect()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// A resolved config over the fixture model: short sequences, one metrics line per step, no
/// checkpoints unless `edit` asks for them, an lr large enough that steps visibly move weights.
fn config(kind: Kind, data: &Path, out: &Path, edit: impl FnOnce(&mut TrainConfig)) -> TrainConfig {
    let mut c = TrainConfig {
        model: Some(model_dir()),
        data: Some(data.to_path_buf()),
        output_dir: Some(out.to_path_buf()),
        learning_rate: Some(1e-3),
        max_length: 64,
        logging_steps: 1,
        save_steps: 0,
        ..TrainConfig::default()
    };
    edit(&mut c);
    c.resolve(kind).expect("a valid config")
}

fn run(cfg: &TrainConfig) -> train::Outcome {
    train::run(cfg, RunOptions::default()).expect("the run succeeds")
}

fn run_err(cfg: &TrainConfig) -> String {
    match train::run(cfg, RunOptions::default()) {
        Ok(_) => panic!("the run should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

/// `metrics.jsonl` as JSON objects, one per line.
fn metrics(out: &Path) -> Vec<Map<String, Value>> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| match serde_json::from_str(l).unwrap() {
            Value::Object(o) => o,
            v => panic!("not an object: {v}"),
        })
        .collect()
}

fn num(line: &Map<String, Value>, key: &str) -> f64 {
    line.get(key)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number `{key}` in {line:?}"))
}

/// Every parameter of a saved model, in HF order, flattened.
fn weights(dir: &Path) -> Vec<f32> {
    let m = Model::load(dir).unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()));
    m.params().iter().flat_map(|(_, d)| d.iter().copied()).collect()
}

/// `max |a − b| ≤ rel · max |b|` — relative to the tensor's scale, so entries near zero do not
/// make a tolerance meaningless.
fn assert_close_scaled(what: &str, a: &[f32], b: &[f32], rel: f64) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = b.iter().fold(0f64, |m, &x| m.max(f64::from(x).abs()));
    let diff = a.iter().zip(b).fold(0f64, |m, (&x, &y)| m.max(f64::from(x - y).abs()));
    assert!(
        diff <= rel * scale,
        "{what}: max |diff| {diff:e} > {rel:e} · max |want| {scale:e}"
    );
}

fn assert_rel(what: &str, got: f64, want: f64, rel: f64) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-30),
        "{what}: got {got}, want {want} (rel {:e} > {rel:e})",
        ((got - want) / want).abs()
    );
}

/// Non-zero exit, exactly one `error:` line that mentions every `needle`, no panic.
fn assert_one_error_line(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "should fail; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{}` should mention `{n}`", lines[0]);
    }
    lines[0].to_string()
}

/// Tokenised kept SFT sequences of a data file.
fn sft_seqs(data: &Path, max_length: usize) -> Vec<TokenizedSeq> {
    let opts = TokenizeOptions {
        max_length,
        ..Default::default()
    };
    let ds = tokenize_sft(&read_records(data).unwrap(), &tokenizer(), &opts).unwrap();
    ds.kept().map(|e| e.info.seq.clone()).collect()
}

fn dpo_pairs(data: &Path, max_length: usize) -> Vec<PairSeqs> {
    let opts = TokenizeOptions {
        max_length,
        ..Default::default()
    };
    let ds = tokenize_dpo(&read_records(data).unwrap(), &tokenizer(), &opts).unwrap();
    ds.kept().map(PairSeqs::from).collect()
}

/// The fixture model with every weight nudged by a fixed pseudo-random amount, so a policy
/// differs from its reference and the f-divergence weights `h'(s)` and DPO's `σ(−βΔ)` vary
/// from token to token and pair to pair.
fn perturbed_engine(scale: f32) -> CpuEngine {
    let mut m = Model::load(&model_dir()).unwrap();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for d in m.params_mut().data_mut() {
        for x in d.iter_mut() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *x += scale * ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5);
        }
    }
    CpuEngine::new(m)
}

fn flat_grads(e: &CpuEngine) -> Vec<f32> {
    e.grads()
        .expect("a backward ran")
        .iter()
        .flat_map(|(_, d)| d.iter().copied())
        .collect()
}

/// The (batch size × accumulation steps) splits that must give the same step; `3×3` over eight
/// examples makes micro-batches of 3, 3 and 2, where a mean of per-micro-batch means is not the
/// mean even for DPO's equal-weight pairs.
const SPLITS: [(usize, usize); 4] = [(8, 1), (4, 2), (1, 8), (3, 3)];

// ---------------------------------------------------------------- accumulation (REFERENCE §6)

/// Window loss, metrics and the accumulated gradient of step 0 of an SFT task.
fn sft_window(
    cfg: &TrainConfig,
    seqs: &[TokenizedSeq],
    policy: &mut CpuEngine,
) -> (f64, Vec<(&'static str, f64)>, Vec<f32>) {
    let mut reference = CpuEngine::load(&model_dir()).unwrap();
    let pad = tokenizer().pad_id().unwrap();
    let mut task = SftTask::new(cfg, seqs.to_vec(), Vec::new(), pad, &mut reference).unwrap();
    let window = Task::<CpuEngine>::plan(&task).window(0);
    assert_eq!(
        window.iter().flatten().count(),
        seqs.len(),
        "step 0 covers every example"
    );
    policy.zero_grads().unwrap();
    let out = task.train_window(policy, &window).unwrap();
    (out.loss, out.metrics, flat_grads(policy))
}

fn sft_split_invariance(sft_loss: &str, level: &str) {
    let dir = TempDir::new(&format!("accum-sft-{sft_loss}-{level}"));
    let data = write(&dir.join("sft.jsonl"), &sft_jsonl(8));
    let seqs = sft_seqs(&data, 64);
    assert_eq!(seqs.len(), 8);
    let counts: Vec<usize> = seqs.iter().map(TokenizedSeq::n_completion).collect();
    assert!(
        counts.iter().min() < counts.iter().max(),
        "rows of different lengths: {counts:?}"
    );
    let mut policy = perturbed_engine(0.02);
    let mut results = Vec::new();
    for (bs, ga) in SPLITS {
        let cfg = config(Kind::Sft, &data, &dir.join("unused"), |c| {
            c.per_device_batch_size = bs;
            c.gradient_accumulation_steps = ga;
            c.sft_loss = Some(sft_loss.into());
            c.sft_level = Some(level.parse().unwrap());
            c.sft_beta = Some(0.5);
        });
        results.push(((bs, ga), sft_window(&cfg, &seqs, &mut policy)));
    }
    let (_, (loss0, m0, g0)) = &results[0];
    for ((bs, ga), (loss, m, g)) in &results[1..] {
        let what = format!("SFT {sft_loss}/{level} {bs}×{ga} vs 8×1");
        assert_rel(&format!("{what}: loss"), *loss, *loss0, 1e-6);
        for ((k, v), (_, v0)) in m.iter().zip(m0) {
            assert!((v - v0).abs() <= 1e-6 * v0.abs().max(1.0), "{what}: {k} {v} vs {v0}");
        }
        assert_close_scaled(&format!("{what}: gradient"), g, g0, 1e-5);
    }
    if sft_loss != "nll" {
        // The objective really weighs tokens unevenly here: its gradient is not NLL's.
        let cfg = config(Kind::Sft, &data, &dir.join("unused"), |c| c.per_device_batch_size = 8);
        let (_, _, g_nll) = sft_window(&cfg, &seqs, &mut policy);
        let (_, (_, _, g)) = &results[0];
        let scale = g_nll.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = g.iter().zip(&g_nll).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff > 1e-3 * scale,
            "{sft_loss}: gradient equals NLL's ({diff} vs {scale})"
        );
    }
}

#[test]
fn sft_nll_gradient_is_the_same_for_every_accumulation_split() {
    sft_split_invariance("nll", "token");
}

#[test]
fn sft_fdiv_gradient_is_the_same_for_every_accumulation_split() {
    sft_split_invariance("pearson_chi2", "token");
    sft_split_invariance("squared_hellinger", "sequence");
}

#[test]
fn dpo_gradient_is_the_same_for_every_accumulation_split() {
    let dir = TempDir::new("accum-dpo");
    let data = write(&dir.join("dpo.jsonl"), &dpo_jsonl(8));
    let pairs = dpo_pairs(&data, 64);
    assert_eq!(pairs.len(), 8);
    let pad = tokenizer().pad_id().unwrap();
    let mut policy = perturbed_engine(0.02);
    for loss_type in ["sigmoid", "sigmoid,sft"] {
        let mut results = Vec::new();
        for (bs, ga) in SPLITS {
            let cfg = config(Kind::Dpo, &data, &dir.join("unused"), |c| {
                c.per_device_batch_size = bs;
                c.gradient_accumulation_steps = ga;
                c.loss_type = Some(loss_type.into());
            });
            let reference = RefSource::Live(CpuEngine::load(&model_dir()).unwrap());
            let mut task = DpoTask::new(&cfg, pairs.clone(), Vec::new(), pad, reference).unwrap();
            let window = Task::<CpuEngine>::plan(&task).window(0);
            policy.zero_grads().unwrap();
            let out = task.train_window(&mut policy, &window).unwrap();
            results.push(((bs, ga), out, flat_grads(&policy)));
        }
        let (_, o0, g0) = &results[0];
        let acc = o0.metrics.iter().find(|(k, _)| *k == "rewards/accuracies").unwrap().1;
        assert!(
            acc > 0.0 && acc < 1.0,
            "the perturbed policy ranks some pairs each way: {acc}"
        );
        for ((bs, ga), o, g) in &results[1..] {
            let what = format!("DPO {loss_type} {bs}×{ga} vs 8×1");
            assert_rel(&format!("{what}: loss"), o.loss, o0.loss, 1e-6);
            for ((k, v), (_, v0)) in o.metrics.iter().zip(&o0.metrics) {
                assert!((v - v0).abs() <= 1e-6 * v0.abs().max(1.0), "{what}: {k} {v} vs {v0}");
            }
            assert_eq!(o.tokens, o0.tokens, "{what}: tokens");
            assert_close_scaled(&format!("{what}: gradient"), g, g0, 1e-5);
        }
    }
}

/// The same invariance through the whole loop: one optimizer step per split gives the same
/// logged loss and grad_norm and the same weight update. Adam's first step is
/// `lr·g/(|g| + ε)`; with the default ε = 1e-8 it is ±lr wherever |g| ≫ ε, whatever g's size,
/// and float noise in near-zero gradients decides the sign, so the update is compared with
/// ε = 1, where it is proportional to the gradient (and without clipping, which would hide a
/// scale error).
#[test]
fn one_step_runs_agree_across_accumulation_splits() {
    let dir = TempDir::new("accum-runs");
    let sft = write(&dir.join("sft.jsonl"), &sft_jsonl(8));
    let dpo = write(&dir.join("dpo.jsonl"), &dpo_jsonl(8));
    let initial = weights(&model_dir());
    let update = |w: Vec<f32>| -> Vec<f32> { w.iter().zip(&initial).map(|(a, b)| a - b).collect() };
    for (kind, data) in [(Kind::Sft, &sft), (Kind::Dpo, &dpo)] {
        let mut first: Option<(Map<String, Value>, Vec<f32>)> = None;
        for (bs, ga) in [(8, 1), (4, 2), (1, 8)] {
            let out = dir.join(&format!("{}-{bs}x{ga}", kind.name()));
            let cfg = config(kind, data, &out, |c| {
                c.per_device_batch_size = bs;
                c.gradient_accumulation_steps = ga;
                c.max_steps = Some(1);
                c.adam_epsilon = 1.0;
                c.max_grad_norm = 0.0;
                // Large enough that an update dwarfs the f32 rounding of `w + Δw`.
                c.learning_rate = Some(0.1);
            });
            run(&cfg);
            let m = metrics(&out);
            assert_eq!(m.len(), 1);
            let dw = update(weights(&out.join("final")));
            assert!(dw.iter().any(|&x| x != 0.0), "the step moved the weights");
            match &first {
                None => first = Some((m[0].clone(), dw)),
                Some((m0, dw0)) => {
                    let what = format!("{} {bs}×{ga} vs 8×1", kind.name());
                    for key in ["loss", "grad_norm"] {
                        assert_rel(&format!("{what}: {key}"), num(&m[0], key), num(m0, key), 1e-5);
                    }
                    for key in ["learning_rate", "num_tokens", "epoch"] {
                        assert_eq!(m[0][key], m0[key], "{what}: {key}");
                    }
                    assert_close_scaled(&format!("{what}: weight update"), &dw, dw0, 1e-4);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- exact resume

fn copy_file(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
}

/// Runs `cfg` to the end, then makes the folder look like a run that died after step
/// `crash_after` with its last checkpoint at `resume_at` (later checkpoints and the final model
/// gone, metrics lines up to the crash kept, a half-assembled checkpoint and an incomplete one
/// lying around), resumes with `spec`, and checks the metrics file and the final weights come
/// out byte for byte as in the uninterrupted run. `fingerprint` of the output folder must not
/// change across the resume (e.g. which file holds the reference cache).
fn check_exact_resume(
    cfg: &TrainConfig,
    resume_at: u64,
    crash_after: u64,
    spec: &str,
    fingerprint: &dyn Fn(&Path) -> u64,
) {
    let out = cfg.output_dir().to_path_buf();
    run(cfg);
    let print = fingerprint(&out);
    let want_metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let want_final = std::fs::read(out.join("final/model.safetensors")).unwrap();
    let total = cfg.max_steps.unwrap();
    let later: Vec<u64> = (resume_at + 1..=total).filter(|s| s % cfg.save_steps == 0).collect();
    assert!(!later.is_empty(), "the test needs a checkpoint after the resume point");
    let last = out.join(format!("checkpoint-{}", later[later.len() - 1]));
    let want_optimizer = std::fs::read(last.join("optimizer.safetensors")).unwrap();
    let want_state = std::fs::read_to_string(last.join("trainer_state.json")).unwrap();
    for s in &later {
        std::fs::remove_dir_all(out.join(format!("checkpoint-{s}"))).unwrap();
    }
    std::fs::remove_dir_all(out.join("final")).unwrap();
    let crashed: String = want_metrics
        .lines()
        .filter(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap() <= crash_after)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(out.join("metrics.jsonl"), crashed).unwrap();
    // A checkpoint being assembled when the process died, and a folder with the right name but
    // no trainer state: neither may be taken for the latest checkpoint.
    let ckpt = out.join(format!("checkpoint-{resume_at}"));
    let stray = out.join(format!(".checkpoint-{}.tmp-4242", total + 1));
    std::fs::create_dir_all(&stray).unwrap();
    copy_file(&ckpt.join("trainer_state.json"), &stray.join("trainer_state.json"));
    let incomplete = out.join(format!("checkpoint-{}", resume_at + 1));
    std::fs::create_dir_all(&incomplete).unwrap();
    copy_file(&ckpt.join("config.toml"), &incomplete.join("config.toml"));

    let mut resumed = cfg.clone();
    resumed.resume_from_checkpoint = Some(spec.to_string());
    let summary = run(&resumed).summary;
    assert_eq!(summary.global_step, total);
    assert_eq!(
        fingerprint(&out),
        print,
        "fingerprint of {} changed on resume",
        out.display()
    );
    let got_metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(
        got_metrics, want_metrics,
        "metrics.jsonl after resuming from step {resume_at}"
    );
    assert!(
        std::fs::read(out.join("final/model.safetensors")).unwrap() == want_final,
        "final weights after resuming from step {resume_at} differ"
    );
    assert!(std::fs::read(last.join("optimizer.safetensors")).unwrap() == want_optimizer);
    assert_eq!(
        std::fs::read_to_string(last.join("trainer_state.json")).unwrap(),
        want_state
    );
}

#[test]
fn sft_resume_reproduces_the_uninterrupted_run_exactly() {
    let dir = TempDir::new("resume-sft");
    let data = write(&dir.join("sft.jsonl"), &sft_jsonl(12));
    // 9 train rows (3 held out) in micro-batches of 2, 2 per step: 3 steps per epoch, so the
    // run crosses two epoch boundaries; a checkpoint every 3 steps lands mid logging interval.
    let cfg = config(Kind::Sft, &data, &dir.join("out"), |c| {
        c.per_device_batch_size = 2;
        c.gradient_accumulation_steps = 2;
        c.max_steps = Some(7);
        c.save_steps = 3;
        c.logging_steps = 2;
        c.eval_fraction = 0.25;
        c.eval_steps = 2;
        c.warmup_steps = 2;
        c.weight_decay = 0.01;
    });
    check_exact_resume(&cfg, 3, 5, "latest", &|_| 0);
    let m = metrics(cfg.output_dir());
    let steps: Vec<u64> = m.iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [2, 2, 4, 4, 6, 6, 7, 7], "train and eval lines");
    assert!(m
        .iter()
        .any(|l| l.contains_key("eval_loss") && l.contains_key("eval_log_ratio")));
}

#[test]
fn dpo_resume_reproduces_the_uninterrupted_run_exactly() {
    let dir = TempDir::new("resume-dpo");
    let data = write(&dir.join("dpo.jsonl"), &dpo_jsonl(8));
    let cfg = |out: &str, precompute: bool| {
        config(Kind::Dpo, &data, &dir.join(out), |c| {
            c.per_device_batch_size = 2;
            c.max_steps = Some(5);
            c.save_steps = 2;
            c.eval_fraction = 0.25;
            c.eval_steps = 2;
            c.lr_scheduler_type = "cosine".parse().unwrap();
            c.learning_rate = Some(5e-4);
            c.loss_type = Some("sigmoid,sft".into());
            c.loss_weights = Some("1,0.5".into());
            c.precompute_ref_logps = Some(precompute);
        })
    };
    let live = cfg("live", false);
    let explicit = live.output_dir().join("checkpoint-2");
    check_exact_resume(&live, 2, 3, &arg(&explicit), &|_| 0);

    // Resuming must read the cache the first run wrote, not compute and write a new one: the
    // cache file keeps its inode.
    let cache_inode = |out: &Path| {
        use std::os::unix::fs::MetadataExt;
        let files: Vec<PathBuf> = std::fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("ref_logps-"))
            .collect();
        assert_eq!(files.len(), 1, "one reference cache in {}: {files:?}", out.display());
        std::fs::metadata(&files[0]).unwrap().ino()
    };
    let cached = cfg("cached", true);
    check_exact_resume(&cached, 2, 4, "latest", &cache_inode);
}

// ---------------------------------------------------------------- DPO step 0 (REFERENCE §5)

/// With the policy equal to the reference, every implicit reward is exactly 0: the sigmoid loss
/// is ln 2, no pair counts as ranked (strict `>`), and `logps/*` are the scoring path's
/// completion-only sums (the prompt masked on both sides) — live and with cached reference
/// log-probs computed in a different batching.
#[test]
fn dpo_step_zero_loss_is_ln2_and_accuracy_zero() {
    let dir = TempDir::new("dpo-step0");
    let data = write(&dir.join("dpo.jsonl"), &dpo_jsonl(8));
    let pairs = {
        let opts = TokenizeOptions {
            max_length: 64,
            ..Default::default()
        };
        tokenize_dpo(&read_records(&data).unwrap(), &tokenizer(), &opts).unwrap()
    };
    let kept: Vec<_> = pairs.kept().collect();
    let mut model = irbridge::train::CpuEngine::load(&model_dir()).unwrap();
    let scores =
        irbridge::score::score_pairs(&mut model, &kept, tokenizer().pad_id().unwrap(), 3, &mut |_| {}).unwrap();
    let mean = |f: &dyn Fn(&(irbridge::score::SeqScore, irbridge::score::SeqScore)) -> f64| {
        scores.iter().map(f).sum::<f64>() / scores.len() as f64
    };
    let (want_chosen, want_rejected) = (mean(&|s| s.0.logp), mean(&|s| s.1.logp));
    for precompute in [false, true] {
        let out = dir.join(if precompute { "cached" } else { "live" });
        let cfg = config(Kind::Dpo, &data, &out, |c| {
            c.per_device_batch_size = 4;
            c.gradient_accumulation_steps = 2;
            c.max_steps = Some(2);
            c.precompute_ref_logps = Some(precompute);
        });
        run(&cfg);
        let m = metrics(&out);
        let step1 = &m[0];
        assert_eq!(step1["step"], 1);
        let what = if precompute {
            "cached reference"
        } else {
            "live reference"
        };
        let loss = num(step1, "loss");
        assert!(
            (loss - std::f64::consts::LN_2).abs() <= 4.0 * f64::EPSILON,
            "{what}: step-0 loss {loss:.17} is not ln 2"
        );
        for key in [
            "rewards/accuracies",
            "rewards/margins",
            "rewards/chosen",
            "rewards/rejected",
        ] {
            assert_eq!(num(step1, key), 0.0, "{what}: {key}");
        }
        assert_rel(
            &format!("{what}: logps/chosen"),
            num(step1, "logps/chosen"),
            want_chosen,
            1e-5,
        );
        assert_rel(
            &format!("{what}: logps/rejected"),
            num(step1, "logps/rejected"),
            want_rejected,
            1e-5,
        );
        // After one step the policy has moved: the rewards are no longer all zero.
        assert_ne!(num(&m[1], "rewards/margins"), 0.0, "{what}: step 2 margins");
    }
}

// ---------------------------------------------------------------- checkpoints

fn checkpoint_names(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    v.sort();
    v
}

#[test]
fn save_total_limit_rotates_and_a_fresh_run_never_overwrites_checkpoints() {
    let dir = TempDir::new("rotate");
    let data = write(&dir.join("sft.jsonl"), &sft_jsonl(8));
    let out = dir.join("out");
    let cfg = config(Kind::Sft, &data, &out, |c| {
        c.per_device_batch_size = 4;
        c.max_steps = Some(5);
        c.save_steps = 1;
        c.save_total_limit = Some(2);
    });
    run(&cfg);
    assert_eq!(checkpoint_names(&out), ["checkpoint-4", "checkpoint-5"]);
    for f in [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "config.toml",
    ] {
        assert!(out.join("checkpoint-5").join(f).is_file(), "checkpoint-5/{f}");
    }
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind: {leftovers:?}");

    // A fresh run into the same folder is refused before anything is written.
    let before: Vec<Vec<u8>> = ["config.toml", "metrics.jsonl"]
        .iter()
        .map(|f| std::fs::read(out.join(f)).unwrap())
        .collect();
    let mut fresh = cfg.clone();
    fresh.learning_rate = Some(5e-4);
    let e = run_err(&fresh);
    assert!(
        e.contains("already holds checkpoints") && e.contains("--resume-from-checkpoint"),
        "{e}"
    );
    for (f, b) in ["config.toml", "metrics.jsonl"].iter().zip(&before) {
        assert!(
            &std::fs::read(out.join(f)).unwrap() == b,
            "{f} changed by a refused run"
        );
    }
    assert_eq!(checkpoint_names(&out), ["checkpoint-4", "checkpoint-5"]);

    // Continuing for two more steps keeps rotating.
    let mut more = cfg.clone();
    more.max_steps = Some(7);
    more.resume_from_checkpoint = Some("latest".into());
    assert_eq!(run(&more).summary.global_step, 7);
    assert_eq!(checkpoint_names(&out), ["checkpoint-6", "checkpoint-7"]);
    let steps: Vec<u64> = metrics(&out).iter().map(|l| l["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6, 7]);
}

/// A folder that holds a finished run without checkpoints (`save_steps = 0`) is not overwritten
/// by a fresh run unless `overwrite_output_dir` says so; files the user put there are not
/// touched by the refusal.
#[test]
fn a_fresh_run_refuses_an_earlier_runs_folder_unless_told_to_overwrite() {
    let dir = TempDir::new("overwrite");
    let data = write(&dir.join("sft.jsonl"), &sft_jsonl(8));
    let out = dir.join("out");
    let cfg = config(Kind::Sft, &data, &out, |c| {
        c.per_device_batch_size = 4;
        c.max_steps = Some(1);
        c.save_steps = 0;
    });
    run(&cfg);
    std::fs::write(out.join("final/mine.txt"), "notes").unwrap();
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let e = run_err(&cfg);
    assert!(
        e.contains("holds an earlier run") && e.contains("--overwrite-output-dir"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("metrics.jsonl")).unwrap(), metrics_before);
    assert!(out.join("final/mine.txt").is_file(), "a refused run removed a file");
    let mut again = cfg.clone();
    again.overwrite_output_dir = true;
    assert_eq!(run(&again).summary.global_step, 1);
    assert!(!out.join("final/mine.txt").exists(), "final/ is replaced when asked");
}

/// A resume that is refused (different batching, or no checkpoint to resume from) changes
/// nothing in the output folder — not the resolved config, not the metrics.
#[test]
fn refused_resume_leaves_the_output_folder_untouched() {
    let dir = TempDir::new("refused-resume");
    let data = write(&dir.join("sft.jsonl"), &sft_jsonl(8));
    let out = dir.join("out");
    let cfg = config(Kind::Sft, &data, &out, |c| {
        c.per_device_batch_size = 2;
        c.max_steps = Some(2);
        c.save_steps = 2;
    });
    run(&cfg);
    let snapshot = || -> Vec<(String, Vec<u8>)> {
        ["config.toml", "metrics.jsonl", "checkpoint-2/trainer_state.json"]
            .iter()
            .map(|f| (f.to_string(), std::fs::read(out.join(f)).unwrap()))
            .collect()
    };
    let before = snapshot();
    let mut other = cfg.clone();
    other.resume_from_checkpoint = Some("latest".into());
    other.per_device_batch_size = 4;
    let e = run_err(&other);
    assert!(
        e.contains("resume") && e.contains("`per_device_batch_size` is 4"),
        "{e}"
    );
    // Same settings, other rows in the same file: caught by the data plan.
    write(&data, &sft_jsonl(12));
    let mut other = cfg.clone();
    other.resume_from_checkpoint = Some("latest".into());
    let e = run_err(&other);
    assert!(e.contains("resume") && e.contains("steps per epoch"), "{e}");
    write(&data, &sft_jsonl(8));
    // Another kind of run, or another starting model, is named as such.
    let mut other = cfg.clone();
    other.resume_from_checkpoint = Some("latest".into());
    other.model = Some(common::fixtures().join("models/tiny-llama"));
    let e = run_err(&other);
    assert!(e.contains("resume: `model`"), "{e}");
    let mut other = cfg.clone();
    other.resume_from_checkpoint = Some("latest".into());
    other.seed = 7;
    other.max_steps = Some(3);
    let e = run_err(&other);
    assert!(e.contains("resume") && e.contains("seed"), "{e}");
    let mut other = cfg.clone();
    other.resume_from_checkpoint = Some(arg(&out.join("checkpoint-1")));
    let e = run_err(&other);
    assert!(
        e.contains("checkpoint-1") && e.contains("not a complete checkpoint"),
        "{e}"
    );
    assert!(snapshot() == before, "a refused resume changed the output folder");
    let empty = dir.join("empty");
    let mut none = config(Kind::Sft, &data, &empty, |c| c.max_steps = Some(1));
    none.resume_from_checkpoint = Some("latest".into());
    let e = run_err(&none);
    assert!(e.contains("no complete checkpoint"), "{e}");
    assert!(!empty.exists(), "a refused resume created {}", empty.display());
}

// ---------------------------------------------------------------- config and flags

#[test]
fn config_file_errors_name_the_file_line_and_key() {
    let dir = TempDir::new("config");
    let model = arg(&model_dir());
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "unknown.toml",
            "model = \"m\"\n# a comment\nlearning_rat = 1e-5\n",
            &["unknown.toml:3", "learning_rat"],
        ),
        (
            "type.toml",
            "model = \"m\"\nmax_steps = \"ten\"\n",
            &["type.toml:2", "max_steps"],
        ),
        (
            "variant.toml",
            "\n\nlr_scheduler_type = \"wavy\"\n",
            &["variant.toml:3", "lr_scheduler_type", "wavy"],
        ),
        ("syntax.toml", "model = \"m\"\nseed = \n", &["syntax.toml:2"]),
    ];
    for (name, text, needles) in cases {
        let path = write(&dir.join(name), text);
        let e = format!(
            "{:#}",
            TrainConfig::load(Kind::Sft, Some(&path), toml::Table::new()).unwrap_err()
        );
        for n in needles {
            assert!(e.contains(n), "{name}: `{e}` should mention `{n}`");
        }
        assert_eq!(e.lines().count(), 1, "{name}: one line: {e}");
    }
    // A key of the other trainer is an error, in a file or as a flag.
    let base = format!("model = {model:?}\ndata = \"d.jsonl\"\noutput_dir = \"o\"\n");
    let sft_with_beta = write(&dir.join("beta.toml"), &format!("{base}beta = 0.1\n"));
    let e = format!(
        "{:#}",
        TrainConfig::load(Kind::Sft, Some(&sft_with_beta), toml::Table::new()).unwrap_err()
    );
    assert!(e.contains("beta") && e.contains("train dpo"), "{e}");
    let dpo_with_sft_loss = write(&dir.join("sft_loss.toml"), &format!("{base}sft_loss = \"tv\"\n"));
    let e = format!(
        "{:#}",
        TrainConfig::load(Kind::Dpo, Some(&dpo_with_sft_loss), toml::Table::new()).unwrap_err()
    );
    assert!(e.contains("sft_loss") && e.contains("train sft"), "{e}");
    let kind = write(&dir.join("kind.toml"), &format!("{base}kind = \"dpo\"\n"));
    let e = format!(
        "{:#}",
        TrainConfig::load(Kind::Sft, Some(&kind), toml::Table::new()).unwrap_err()
    );
    assert!(e.contains("kind") && e.contains("dpo"), "{e}");
    // Flags win over the file, and a bad flag value names its key.
    let ok = write(
        &dir.join("ok.toml"),
        &format!("{base}learning_rate = 1e-5\nmax_steps = 3\n"),
    );
    let flags: toml::Table = toml::from_str("learning_rate = 3e-4").unwrap();
    let c = TrainConfig::load(Kind::Sft, Some(&ok), flags).unwrap();
    assert_eq!((c.lr(), c.max_steps), (3e-4, Some(3)));
    let flags: toml::Table = toml::from_str("lr_scheduler_type = \"wavy\"").unwrap();
    let e = format!("{:#}", TrainConfig::load(Kind::Sft, Some(&ok), flags).unwrap_err());
    assert!(e.starts_with("lr_scheduler_type: ") && e.contains("wavy"), "{e}");
}

#[test]
fn bad_flags_give_one_error_line_and_write_nothing() {
    let dir = TempDir::new("flags");
    let sft = arg(&write(&dir.join("sft.jsonl"), &sft_jsonl(4)));
    let dpo = arg(&write(&dir.join("dpo.jsonl"), &dpo_jsonl(4)));
    let model = arg(&model_dir());
    let out = dir.join("out");
    let unknown_cfg = arg(&write(&dir.join("bad.toml"), "max_steps = 2\nwarmup = 3\n"));
    let missing = arg(&dir.join("missing.jsonl"));
    let cases: Vec<(&str, &str, Vec<&str>, Vec<&str>)> = vec![
        (
            "sft",
            &sft,
            vec!["--lr-scheduler-type", "wavy"],
            vec!["lr_scheduler_type", "wavy"],
        ),
        ("sft", &sft, vec!["--sft-level", "word"], vec!["sft_level", "word"]),
        ("sft", &sft, vec!["--sft-loss", "nope"], vec!["sft_loss", "nope"]),
        (
            "sft",
            &sft,
            vec!["--per-device-batch-size", "0"],
            vec!["per_device_batch_size"],
        ),
        ("sft", &sft, vec!["--learning-rate", "nan"], vec!["learning_rate"]),
        ("sft", &sft, vec!["--device", "tpu"], vec!["device", "tpu"]),
        ("sft", &sft, vec!["--max-length", "4096"], vec!["max_length", "256"]),
        ("sft", &sft, vec!["--eval-fraction", "1.5"], vec!["eval_fraction"]),
        ("sft", &sft, vec!["--save-total-limit", "0"], vec!["save_total_limit"]),
        ("sft", &sft, vec!["--beta", "0.1"], vec!["beta", "train dpo"]),
        ("sft", &sft, vec!["--max-steps", "abc"], vec!["--max-steps", "abc"]),
        (
            "sft",
            &sft,
            vec!["--config", &unknown_cfg],
            vec!["bad.toml:2", "warmup"],
        ),
        (
            "sft",
            &sft,
            vec!["--resume-from-checkpoint", "latest"],
            vec!["no complete checkpoint"],
        ),
        ("sft", &dpo, vec![], vec!["dpo.jsonl:1", "DPO"]),
        (
            "dpo",
            &dpo,
            vec!["--loss-type", "sigmoid,nope"],
            vec!["loss_type", "nope"],
        ),
        ("dpo", &dpo, vec!["--loss-weights", "1,2"], vec!["loss_weights"]),
        ("dpo", &dpo, vec!["--sft-loss", "tv"], vec!["sft_loss", "train sft"]),
        (
            "dpo",
            &dpo,
            vec!["--f-divergence-type", "nope"],
            vec!["f_divergence_type"],
        ),
        ("dpo", &missing, vec![], vec!["missing.jsonl"]),
    ];
    for (kind, data, extra, needles) in cases {
        let o = arg(&out);
        let mut args = vec!["train", kind, "--model", &model, "--data", data, "--output-dir", &o];
        if !extra.contains(&"--max-length") {
            args.extend(["--max-length", "32"]);
        }
        args.extend(extra.iter().copied());
        let res = irbridge(&args);
        let line = assert_one_error_line(&res, &needles);
        assert!(!out.exists(), "{line}: the failed run wrote {}", out.display());
    }
}

// ---------------------------------------------------------------- REFERENCE §9 at training level

/// A pair whose chosen and rejected are the same after truncation is reported (in the outcome
/// and on the terminal) and never reaches the loss; a file of nothing but such pairs is an error.
#[test]
fn identical_pairs_after_truncation_are_reported_and_not_trained() {
    let dir = TempDir::new("identical");
    let shared = " the same long answer that goes on and on and on, then";
    let rows = [
        json!({"prompt": "Q:", "chosen": format!("{shared} A"), "rejected": format!("{shared} B")}),
        json!({"prompt": "Q:", "chosen": " yes", "rejected": " no"}),
        json!({"prompt": "R:", "chosen": " fine thanks", "rejected": " go away"}),
    ];
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let data = write(&dir.join("dpo.jsonl"), &text);
    let out = dir.join("out");
    let cfg = config(Kind::Dpo, &data, &out, |c| {
        c.max_length = 10;
        c.per_device_batch_size = 4;
        c.max_steps = Some(1);
    });
    let o = run(&cfg);
    assert_eq!(
        (
            o.train_report.n_identical_pairs,
            o.train_report.n_dropped_identical_pairs
        ),
        (1, 1)
    );
    assert_eq!(o.train_report.n_kept, 2);
    // The step saw exactly the two kept pairs: its token count is theirs.
    let kept = dpo_pairs(&data, 10);
    assert_eq!(kept.len(), 2);
    let tokens: usize = kept.iter().map(|p| p.chosen.len() + p.rejected.len()).sum();
    assert_eq!(num(&metrics(&out)[0], "num_tokens"), tokens as f64);
    // On the command line the report says so.
    let res = irbridge(&[
        "train",
        "dpo",
        "--model",
        &arg(&model_dir()),
        "--data",
        &arg(&data),
        "--output-dir",
        &arg(&dir.join("cli")),
        "--max-length",
        "10",
        "--max-steps",
        "1",
    ]);
    let stdout = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    assert!(
        stdout.contains("identical chosen/rejected:    1 (1 dropped)"),
        "{stdout}"
    );
    // Only identical pairs: nothing to train on, said before anything is written.
    let only = write(&dir.join("only.jsonl"), &format!("{}\n", rows[0]));
    let none = dir.join("none");
    let e = run_err(&config(Kind::Dpo, &only, &none, |c| c.max_length = 10));
    assert!(e.contains("no preference pair reaches the loss"), "{e}");
    assert!(!none.exists());
}

/// Rows left with no completion token (their prompt fills max_length) are dropped from train
/// and eval alike; no metric of the run is NaN or null.
#[test]
fn empty_completions_never_give_nan_metrics() {
    let dir = TempDir::new("empty");
    let long_prompt = "one two three four five six seven eight nine ten eleven twelve thirteen:";
    let mut rows: Vec<Value> = (0..4)
        .map(|i| json!({"prompt": format!("Q{i}:"), "completion": words(i, 2 + i)}))
        .collect();
    rows.insert(1, json!({"prompt": long_prompt, "completion": " fourteen"}));
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    let data = write(&dir.join("train.jsonl"), &text);
    let eval_text = format!(
        "{}\n{}\n",
        json!({"prompt": long_prompt, "completion": " x"}),
        json!({"prompt": "E:", "completion": " alpha beta"})
    );
    let eval = write(&dir.join("eval.jsonl"), &eval_text);
    let out = dir.join("out");
    for sft_loss in ["nll", "jensen_shannon"] {
        let cfg = config(Kind::Sft, &data, &out.join(sft_loss), |c| {
            c.max_length = 12;
            c.per_device_batch_size = 2;
            c.max_steps = Some(3);
            c.eval_data = Some(eval.clone());
            c.eval_steps = 1;
            c.sft_loss = Some(sft_loss.into());
        });
        let o = run(&cfg);
        assert_eq!(o.train_report.n_dropped_empty_completion, 1);
        assert_eq!(o.eval_report.as_ref().unwrap().n_dropped_empty_completion, 1);
        let m = metrics(cfg.output_dir());
        assert_eq!(m.iter().filter(|l| l.contains_key("eval_loss")).count(), 3);
        for line in &m {
            for (k, v) in line {
                assert!(
                    v.as_f64().is_some_and(f64::is_finite),
                    "{sft_loss}: {k} = {v} in {line:?}"
                );
            }
        }
    }
    // An eval file of which nothing survives is an error, not a run without evaluation.
    let dead = write(
        &dir.join("dead.jsonl"),
        &format!("{}\n", json!({"prompt": long_prompt, "completion": " x"})),
    );
    let cfg = config(Kind::Sft, &data, &dir.join("dead-out"), |c| {
        c.max_length = 12;
        c.eval_data = Some(dead.clone());
    });
    let e = run_err(&cfg);
    assert!(e.contains("dead.jsonl") && e.contains("eval"), "{e}");
    assert!(!dir.join("dead-out").exists());
}

/// `max_length` cuts the rejected side as well as the chosen one: a rejected answer longer
/// than the model's 256 positions would fail the forward pass if it were not cut.
#[test]
fn max_length_limits_both_sides_of_a_pair_in_training() {
    let dir = TempDir::new("limits");
    let long: String = words(0, 300);
    let rows = [
        json!({"prompt": "A:", "chosen": " short", "rejected": long}),
        json!({"prompt": "B:", "chosen": long, "rejected": " short"}),
    ];
    let data = write(
        &dir.join("dpo.jsonl"),
        &rows.iter().map(|r| format!("{r}\n")).collect::<String>(),
    );
    let out = dir.join("out");
    let cfg = config(Kind::Dpo, &data, &out, |c| {
        c.max_length = 256;
        c.per_device_batch_size = 1;
        c.max_steps = Some(2);
    });
    let o = run(&cfg);
    assert_eq!(
        (o.train_report.n_chosen_truncated, o.train_report.n_rejected_truncated),
        (1, 1)
    );
    let tok = tokenizer();
    let short = |prompt: &str| tok.encode(&format!("{prompt} short<|endoftext|>")).unwrap().len();
    let m = metrics(&out);
    let total = num(&m[1], "num_tokens") as usize;
    assert_eq!(
        total,
        256 + short("A:") + 256 + short("B:"),
        "both long sides cut to 256"
    );
}

/// `max_samples` trains on the first N rows only (a quick run, or many epochs over a subset).
#[test]
fn max_samples_takes_the_first_rows() {
    let dir = TempDir::new("max-samples");
    let data = write(&dir.join("sft.jsonl"), &sft_jsonl(8));
    let out = dir.join("out");
    let cfg = config(Kind::Sft, &data, &out, |c| {
        c.per_device_batch_size = 1;
        c.num_epochs = 2.0;
        c.max_samples = Some(3);
    });
    let o = run(&cfg);
    assert_eq!((o.train_report.n_rows, o.summary.global_step), (3, 6));
    let m = metrics(&out);
    let first3: usize = sft_seqs(&data, 64)[..3].iter().map(TokenizedSeq::len).sum();
    assert_eq!(
        num(&m[2], "num_tokens"),
        first3 as f64,
        "one epoch = the first three rows"
    );
    assert_eq!(num(&m[5], "epoch"), 2.0);
    let mut zero = cfg.clone();
    zero.max_samples = Some(0);
    let e = format!("{:#}", zero.resolve(Kind::Sft).unwrap_err());
    assert!(e.starts_with("max_samples"), "{e}");
}

/// `eval_steps` without an eval split would silently never evaluate.
#[test]
fn eval_steps_without_an_eval_split_is_an_error() {
    let dir = TempDir::new("eval-steps");
    let data = write(&dir.join("sft.jsonl"), &sft_jsonl(4));
    let mut c = config(Kind::Sft, &data, &dir.join("out"), |_| {});
    c.eval_steps = 5;
    let e = format!("{:#}", c.resolve(Kind::Sft).unwrap_err());
    assert!(e.starts_with("eval_steps") && e.contains("eval_data"), "{e}");
}
