//! The study commands end to end through the binary: `demo` (deterministic, refuses to clobber a
//! folder that is not its own, rejects bad configs), `generate` and `analyze` on the fixture
//! checkpoints.

mod common;

use common::{arg, irbridge, temp_dir};

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "irbridge failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn one_line_error(out: &Output, mentions: &str) {
    assert!(!out.status.success(), "expected a failure");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "panic instead of an error: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(mentions), "{err}");
}

/// A grid small enough for CI (two arms, short stages) written as a demo config file.
fn tiny_config(dir: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "seeds": [3],
        "shape": {"hidden": 32, "layers": 1, "heads": 2, "kv_heads": 1, "intermediate": 64},
        "sizes": {"pretrain": 256, "demos": 32, "pairs": 64, "heldout_pairs": 32, "pair_expert_fraction": 0.5},
        "pretrain": {"steps": 40, "learning_rate": 3e-3, "batch_size": 16},
        "sft": {"steps": 8, "learning_rate": 1e-3, "batch_size": 8},
        "arms": [{"sft_loss": "nll", "lr_factor": 1.0}, {"sft_loss": "pearson_chi2", "lr_factor": 0.5}],
        "dpo": {"steps": 8, "learning_rate": 1e-4, "batch_size": 8},
        "samples_per_topic": 8,
    });
    let p = dir.join("tiny.json");
    std::fs::write(&p, cfg.to_string()).unwrap();
    p
}

/// results.json without the run folders (which name the output directory).
fn results_without_paths(dir: &Path) -> Value {
    let text = std::fs::read_to_string(dir.join("results.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    for r in v["runs"].as_array_mut().unwrap() {
        let o = r.as_object_mut().unwrap();
        o.remove("sft_dir");
        o.remove("dpo_dir");
    }
    v
}

#[test]
fn demo_is_deterministic_and_writes_its_outputs() {
    let tmp = temp_dir("demo");
    let cfg = tiny_config(&tmp);
    let (a, b) = (tmp.join("a"), tmp.join("b"));
    let out_a = ok(&irbridge(&["demo", "--config", &arg(&cfg), "--output-dir", &arg(&a)]));
    assert!(
        out_a.contains("| SFT arm |") && out_a.contains("pearson_chi2, lr×0.5"),
        "{out_a}"
    );
    for f in [
        "results.json",
        "results.md",
        "reward_vs_kl.svg",
        "sft_loss.svg",
        "dpo_loss.svg",
        "dpo_accuracy.svg",
        "implicit_rewards.html",
        "study.json",
        "seed-3/dpo-nll-lr1/final/model.safetensors",
        "seed-3/data/dpo.jsonl",
        "seed-3/data/heldout_base_pairs.jsonl",
    ] {
        assert!(a.join(f).is_file(), "{f} missing");
    }
    // Every top-level entry is one a rerun knows to replace.
    for e in std::fs::read_dir(&a).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            name == "study.json" || irbridge::study::is_study_output(&name),
            "{name} is written by the demo but a rerun would not remove it"
        );
    }
    // Twice into another folder, the second time over the first demo: same table, same numbers;
    // what the user added to the folder survives the rerun.
    ok(&irbridge(&["demo", "--config", &arg(&cfg), "--output-dir", &arg(&b)]));
    std::fs::write(b.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir_all(b.join("myplots")).unwrap();
    ok(&irbridge(&["demo", "--config", &arg(&cfg), "--output-dir", &arg(&b)]));
    assert_eq!(std::fs::read_to_string(b.join("notes.txt")).unwrap(), "mine");
    assert!(b.join("myplots").is_dir());
    let md = |d: &Path| std::fs::read_to_string(d.join("results.md")).unwrap();
    assert_eq!(md(&a), md(&b));
    assert_eq!(results_without_paths(&a), results_without_paths(&b));
    // The saved study.json reruns the same study.
    let c = tmp.join("c");
    ok(&irbridge(&[
        "demo",
        "--config",
        &arg(&a.join("study.json")),
        "--output-dir",
        &arg(&c),
    ]));
    assert_eq!(md(&a), md(&c));
    // Sanity of what was measured: DPO at step 0 is ln 2 with policy == reference.
    let metrics = std::fs::read_to_string(a.join("seed-3/dpo-nll-lr1/metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 1);
    let v = results_without_paths(&a);
    let base = &v["baselines"][0]["base"];
    assert!(base["kl"].as_f64().unwrap().abs() < 1e-3, "KL(base ‖ base) ≈ 0: {base}");
    for r in v["runs"].as_array().unwrap() {
        let w = r["win_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w), "win rate {w}");
        for k in ["sft_ranking", "dpo_ranking"] {
            let both = r[k].as_array().unwrap();
            assert_eq!(both.len(), 2, "{k}: mixed and base-only pairs");
            for x in both {
                assert!((0.0..=1.0).contains(&x.as_f64().unwrap()), "{k} = {x}");
            }
        }
    }
    assert_eq!(
        v["runs"][0]["win_rate"].as_f64(),
        Some(0.5),
        "the default arm against itself"
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn demo_refuses_foreign_folders_and_bad_configs() {
    let tmp = temp_dir("demo-bad");
    let foreign = tmp.join("mine");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    one_line_error(
        &irbridge(&["demo", "--output-dir", &arg(&foreign)]),
        "not an earlier demo",
    );
    assert!(foreign.join("notes.txt").is_file(), "nothing was removed");
    let bad = tmp.join("bad.json");
    std::fs::write(&bad, "{\n  \"seeds\": [1],\n  \"sft_lr\": 3\n}\n").unwrap();
    one_line_error(
        &irbridge(&["demo", "--config", &arg(&bad), "--output-dir", &arg(&tmp.join("x"))]),
        "bad.json:3",
    );
    std::fs::write(&bad, "{\"arms\": [{\"sft_loss\": \"kl\", \"lr_factor\": 1}]}").unwrap();
    one_line_error(
        &irbridge(&["demo", "--config", &arg(&bad), "--output-dir", &arg(&tmp.join("x"))]),
        "arms[0].sft_loss",
    );
    std::fs::write(&bad, "{\"seeds\": [4, 4]}").unwrap();
    one_line_error(
        &irbridge(&["demo", "--config", &arg(&bad), "--output-dir", &arg(&tmp.join("x"))]),
        "listed twice",
    );
    std::fs::write(&bad, "{\"seeds\": []}").unwrap();
    one_line_error(
        &irbridge(&["demo", "--config", &arg(&bad), "--output-dir", &arg(&tmp.join("x"))]),
        "seeds",
    );
    assert!(!tmp.join("x").exists(), "a bad config writes nothing");
    std::fs::remove_dir_all(&tmp).unwrap();
}

fn model(name: &str) -> String {
    arg(&common::fixtures().join("models").join(name))
}

#[test]
fn generate_samples_reproducibly_and_rejects_bad_flags() {
    let m = model("tiny-llama");
    let args = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "Once upon a time",
        "--prompt",
        "The",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "5",
        "--seed",
        "4",
        "--json",
    ];
    let a = ok(&irbridge(&args));
    assert_eq!(a, ok(&irbridge(&args)), "same seed, same samples");
    let rows: Vec<Value> = a.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert_eq!(r["token_ids"].as_array().unwrap().len(), 5);
        let sum: f64 = r["logps"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).sum();
        assert!((sum - r["logp"].as_f64().unwrap()).abs() < 1e-4);
    }
    assert_eq!(rows[0]["prompt"], "Once upon a time");
    let greedy = [
        "generate",
        "--model",
        &m,
        "--prompt",
        "Hello",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
    ];
    assert!(ok(&irbridge(&greedy)).starts_with("Hello"));
    one_line_error(
        &irbridge(&["generate", "--model", &m, "--prompt", "x", "--top-p", "1.5"]),
        "--top-p",
    );
    one_line_error(
        &irbridge(&[
            "generate",
            "--model",
            &model("tiny-gpt2"),
            "--prompt",
            "x",
            "--max-new-tokens",
            "5000",
        ]),
        "learned positions",
    );
    one_line_error(
        &irbridge(&["generate", "--model", "/nonexistent", "--prompt", "x"]),
        "nonexistent",
    );
}

#[test]
fn analyze_reports_token_rewards_and_ranking() {
    let tmp = temp_dir("analyze");
    let data = arg(&common::fixtures().join("e2e/dpo_input.jsonl"));
    let (gpt2, llama) = (model("tiny-gpt2"), model("tiny-llama"));
    let run = |policy: &str, reference: &str, out: &Path| {
        let o = irbridge(&[
            "analyze",
            "--model",
            policy,
            "--ref",
            reference,
            "--data",
            &data,
            "--max-length",
            "128",
            "--output-dir",
            &arg(out),
        ]);
        serde_json::from_str::<Value>(ok(&o).trim()).unwrap()
    };
    // A model against itself: every implicit reward is exactly 0, so no pair is ranked right.
    let same = run(&gpt2, &gpt2, &tmp.join("same"));
    assert_eq!(same["ranking_accuracy"].as_f64(), Some(0.0));
    assert_eq!(same["rewards/margins"].as_f64(), Some(0.0));
    let lines = std::fs::read_to_string(tmp.join("same/token_rewards.jsonl")).unwrap();
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    let toks = first["chosen_tokens"].as_array().unwrap();
    assert_eq!(toks.len(), first["chosen_token_rewards"].as_array().unwrap().len());
    assert!(first["chosen_token_rewards"]
        .as_array()
        .unwrap()
        .iter()
        .all(|x| x.as_f64() == Some(0.0)));
    // Two different models: the sums are the token rewards' sums, and the page shows them.
    let diff = run(&llama, &gpt2, &tmp.join("diff"));
    let n = diff["pairs"].as_u64().unwrap() as usize;
    let lines = std::fs::read_to_string(tmp.join("diff/token_rewards.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), n);
    let mut right = 0;
    for l in lines.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        let sum: f64 = v["chosen_token_rewards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((sum - v["chosen_reward"].as_f64().unwrap()).abs() < 1e-3);
        right += usize::from(v["chosen_ranked_higher"].as_bool().unwrap());
    }
    assert!((diff["ranking_accuracy"].as_f64().unwrap() - right as f64 / n as f64).abs() < 1e-12);
    let html = std::fs::read_to_string(tmp.join("diff/implicit_rewards.html")).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("chosen ranked higher") || html.contains("rejected ranked higher"));
    // SFT rows: one reward per completion.
    let sft = irbridge(&[
        "analyze",
        "--model",
        &llama,
        "--ref",
        &gpt2,
        "--data",
        &arg(&common::fixtures().join("e2e/sft_input.jsonl")),
        "--max-length",
        "128",
        "--output-dir",
        &arg(&tmp.join("sft")),
    ]);
    let v: Value = serde_json::from_str(ok(&sft).trim()).unwrap();
    assert!(v["sequences"].as_u64().unwrap() > 0);
    one_line_error(
        &irbridge(&[
            "analyze", "--model", &gpt2, "--ref", &gpt2, "--data", &data, "--beta", "0",
        ]),
        "--beta",
    );
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn token_pieces_concatenate_to_the_decoded_text() {
    use irbridge::analyze::token_pieces;
    use irbridge::data::Tokenizer;
    let gpt2 = Tokenizer::from_dir(&common::fixtures().join("models/tiny-gpt2")).unwrap();
    let text = "Hi! I'd like a naïve café — 日本語 too.\nNext line";
    let ids = gpt2.encode(text).unwrap();
    let pieces = token_pieces(&gpt2, &ids).unwrap();
    assert_eq!(pieces.len(), ids.len());
    assert_eq!(pieces.concat(), gpt2.decode(&ids).unwrap());
    assert_eq!(pieces.concat(), text);
    // The word-level study tokenizer puts its spaces between tokens, not inside them.
    let tmp = temp_dir("pieces");
    irbridge::study::data::write_tokenizer(&tmp).unwrap();
    let words = Tokenizer::from_dir(&tmp).unwrap();
    let ids = words.encode("about sea the bright wave<eos>").unwrap();
    let pieces = token_pieces(&words, &ids).unwrap();
    assert_eq!(pieces, ["about", " sea", " the", " bright", " wave", " <eos>"]);
    std::fs::remove_dir_all(&tmp).unwrap();
}
