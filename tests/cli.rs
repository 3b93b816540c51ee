//! The `logps` and `eval` commands end to end, through the built binary, against the TRL
//! goldens on real data (fixtures README §6), and their behaviour on bad input.

mod common;

use common::{arg, assert_clean_error, irbridge, temp_dir};

use serde_json::Value;
use std::process::Output;

fn expected(name: &str) -> Value {
    let p = common::fixtures().join("e2e").join(name);
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn lines(out: &Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "irbridge failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn logps_reproduces_the_dpo_goldens_row_by_row() {
    let f = common::fixtures();
    let data = arg(&f.join("e2e/dpo_input.jsonl"));
    let want = expected("dpo_expected.json");
    for (model, key) in [("tiny-gpt2", "policy"), ("tiny-llama", "ref")] {
        let out = irbridge(&[
            "logps",
            "--model",
            &arg(&f.join("models").join(model)),
            "--data",
            &data,
            "--max-length",
            "256",
        ]);
        let got = lines(&out);
        let rows = want["rows"].as_array().unwrap();
        assert_eq!(got.len(), rows.len(), "one line per input row");
        for (g, w) in got.iter().zip(rows) {
            if w["dropped"].as_bool().unwrap() {
                assert_eq!(g["dropped"], "prompt ≥ max_length", "{}", w["source"]);
                continue;
            }
            for side in ["chosen", "rejected"] {
                let lp = g[format!("{side}_logps")].as_f64().unwrap();
                let want_lp = w[format!("{key}_{side}_logps")].as_f64().unwrap();
                assert!(
                    (lp - want_lp).abs() < 2e-3,
                    "{model} {} {side}: {lp} vs {want_lp}",
                    w["source"]
                );
                assert_eq!(g[format!("{side}_tokens")], w[format!("{side}_count")]);
            }
        }
    }
}

#[test]
fn logps_reproduces_the_sft_goldens_and_writes_the_output_file() {
    let f = common::fixtures();
    let dir = temp_dir("sft");
    let out_file = dir.join("logps.jsonl");
    let out = irbridge(&[
        "logps",
        "--model",
        &arg(&f.join("models/tiny-gpt2")),
        "--data",
        &arg(&f.join("e2e/sft_input.jsonl")),
        "--max-length",
        "256",
        "--output",
        &arg(&out_file),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.is_empty(), "--output keeps stdout empty");
    let got: Vec<Value> = std::fs::read_to_string(&out_file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want = expected("sft_expected.json");
    let rows = want["rows"].as_array().unwrap();
    assert_eq!(got.len(), rows.len());
    let (mut sum, mut tokens) = (0.0, 0u64);
    for (g, w) in got.iter().zip(rows) {
        let lp = g["completion_logps"].as_f64().unwrap();
        assert!(
            (lp - w["completion_logps"].as_f64().unwrap()).abs() < 2e-3,
            "{}",
            w["source"]
        );
        assert_eq!(g["completion_tokens"], w["count"]);
        sum += lp;
        tokens += g["completion_tokens"].as_u64().unwrap();
    }
    let agg = &want["aggregate"];
    assert_eq!(tokens, agg["total_tokens"].as_u64().unwrap());
    assert!((-sum / tokens as f64 - agg["token_mean_nll"].as_f64().unwrap()).abs() < 1e-5);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn eval_reproduces_the_dpo_aggregate() {
    let f = common::fixtures();
    let out = irbridge(&[
        "eval",
        "--policy",
        &arg(&f.join("models/tiny-gpt2")),
        "--ref",
        &arg(&f.join("models/tiny-llama")),
        "--data",
        &arg(&f.join("e2e/dpo_input.jsonl")),
        "--max-length",
        "256",
        "--beta",
        "0.1",
        "--loss-type",
        "sigmoid",
    ]);
    let got = &lines(&out)[0];
    let want = &expected("dpo_expected.json")["aggregate"];
    assert_eq!(got["n_pairs"], want["n_kept"]);
    assert_eq!(got["n_dropped"], want["n_dropped"]);
    for (k, w) in [
        ("loss", "loss_mean"),
        ("rewards/chosen", "rewards/chosen"),
        ("rewards/rejected", "rewards/rejected"),
        ("rewards/margins", "rewards/margins"),
        ("rewards/accuracies", "rewards/accuracies"),
        ("logps/chosen", "logps/chosen"),
        ("logps/rejected", "logps/rejected"),
    ] {
        let (g, w) = (got[k].as_f64().unwrap(), want[w].as_f64().unwrap());
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{k}: {g} vs {w}");
    }
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let f = common::fixtures();
    let model = arg(&f.join("models/tiny-gpt2"));
    let dir = temp_dir("bad");
    let bad = dir.join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\",\n",
    )
    .unwrap();
    let out_file = dir.join("out.jsonl");
    let out = irbridge(&[
        "logps",
        "--model",
        &model,
        "--data",
        &arg(&bad),
        "--max-length",
        "256",
        "--output",
        &arg(&out_file),
    ]);
    assert_clean_error(&out, "bad.jsonl:2");
    assert!(!out_file.exists(), "no output after an error");

    let missing = dir.join("no-such-model");
    let out = irbridge(&["logps", "--model", &arg(&missing), "--data", &arg(&bad)]);
    assert_clean_error(&out, "no such model folder");

    // The output would overwrite the input, or cannot be a file: refused before any scoring.
    let data = dir.join("rows.jsonl");
    std::fs::write(&data, "{\"prompt\": \"a\", \"completion\": \" b\"}\n").unwrap();
    let logps_to = |output: &std::path::Path| {
        irbridge(&[
            "logps",
            "--model",
            &model,
            "--data",
            &arg(&data),
            "--max-length",
            "64",
            "--output",
            &arg(output),
        ])
    };
    assert_clean_error(&logps_to(&data), "is the --data file");
    assert_eq!(
        std::fs::read_to_string(&data).unwrap(),
        "{\"prompt\": \"a\", \"completion\": \" b\"}\n"
    );
    assert_clean_error(&logps_to(&data.join("x.jsonl")), "is not a folder");
    assert_clean_error(&logps_to(&dir), "is a folder");

    let sft = arg(&f.join("e2e/sft_input.jsonl"));
    let out = irbridge(&[
        "eval",
        "--policy",
        &model,
        "--ref",
        &model,
        "--data",
        &sft,
        "--max-length",
        "256",
    ]);
    assert_clean_error(&out, "preference rows");

    let dpo = arg(&f.join("e2e/dpo_input.jsonl"));
    let out = irbridge(&[
        "eval",
        "--policy",
        &model,
        "--ref",
        &model,
        "--data",
        &dpo,
        "--loss-type",
        "nope",
    ]);
    assert_clean_error(&out, "nope");

    // Models of different vocabularies cannot be compared.
    let out = irbridge(&[
        "eval",
        "--policy",
        &model,
        "--ref",
        &arg(&dir.join("small")),
        "--data",
        &dpo,
    ]);
    assert_clean_error(&out, "no such model folder");
    let small = dir.join("small");
    let cfg = irbridge::model::ModelConfig::from_json(
        irbridge::study::data::ModelShape {
            hidden: 16,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            intermediate: 32,
        }
        .config_json(),
    )
    .unwrap();
    irbridge::model::Model::init_random(cfg, 1)
        .unwrap()
        .save(&small)
        .unwrap();
    let out = irbridge(&[
        "eval",
        "--policy",
        &model,
        "--ref",
        &arg(&small),
        "--data",
        &dpo,
        "--max-length",
        "256",
    ]);
    assert_clean_error(&out, "must share a tokenizer");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A max length beyond GPT-2's learned positions is refused before any scoring, naming the flag
/// and the limit (the default 1024 exceeds tiny-gpt2's 256).
#[test]
fn max_length_beyond_learned_positions_names_the_flag() {
    let model = common::fixtures().join("models/tiny-gpt2");
    let data = common::fixtures().join("e2e/dpo_input.jsonl");
    let out = irbridge(&["logps", "--model", &arg(&model), "--data", &arg(&data)]);
    assert_clean_error(&out, "pass --max-length 256 or less");
}

/// `--per-token` adds each row's completion log-probs token by token: as many as the row's
/// completion tokens, summing to its completion log-prob, on both sides of a pair; without the
/// flag the lines are unchanged.
#[test]
fn logps_per_token_sums_to_the_sequence_logp() {
    let f = common::fixtures();
    let model = arg(&f.join("models/tiny-gpt2"));
    for (data, prefixes) in [
        ("e2e/sft_input.jsonl", &["completion"][..]),
        ("e2e/dpo_input.jsonl", &["chosen", "rejected"][..]),
    ] {
        let data = arg(&f.join(data));
        let plain = lines(&irbridge(&[
            "logps",
            "--model",
            &model,
            "--data",
            &data,
            "--max-length",
            "256",
        ]));
        let got = lines(&irbridge(&[
            "logps",
            "--model",
            &model,
            "--data",
            &data,
            "--max-length",
            "256",
            "--per-token",
        ]));
        assert_eq!(got.len(), plain.len());
        let mut checked = 0;
        for (g, p) in got.iter().zip(&plain) {
            if g.get("dropped").is_some() {
                assert_eq!(g, p);
                continue;
            }
            for side in prefixes {
                let toks: Vec<f64> = g[format!("{side}_token_logps")]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect();
                assert_eq!(toks.len() as u64, g[format!("{side}_tokens")].as_u64().unwrap());
                let sum: f64 = toks.iter().sum();
                let want = g[format!("{side}_logps")].as_f64().unwrap();
                assert!((sum - want).abs() <= 1e-9 * want.abs(), "{side}: {sum} vs {want}");
                assert_eq!(g[format!("{side}_logps")], p[format!("{side}_logps")]);
                assert!(p.get(format!("{side}_token_logps")).is_none());
                checked += 1;
            }
        }
        assert!(checked > 0);
    }
}
