//! `irbridge plot` through the built binary: series per (run, key), null values skipped, and
//! one clear error line (file and line, or the missing key) with no chart written on bad input.

mod common;

use common::{irbridge, temp_dir};

use std::path::Path;
use std::process::Output;

/// Writes `run/metrics.jsonl` under `dir`.
fn metrics_file(dir: &Path, run: &str, text: &str) -> String {
    let d = dir.join(run);
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("metrics.jsonl");
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A trainer-like log: train lines every step, eval lines every other step, one null loss.
const RUN_A: &str = r#"{"step":1,"loss":2.5,"grad_norm":1.0}
{"step":2,"loss":2.0,"grad_norm":0.9}
{"step":2,"eval_loss":2.2}
{"step":3,"loss":null,"grad_norm":0.8}

{"step":4,"loss":1.5,"grad_norm":0.7}
{"step":4,"eval_loss":1.9}
"#;

const RUN_B: &str = r#"{"step":1,"loss":3.0}
{"step":2,"loss":2.8}
{"step":2,"eval_loss":2.9}
{"step":4,"eval_loss":2.7}
"#;

/// The `points` attribute of every polyline, as coordinate counts.
fn polyline_sizes(svg: &str) -> Vec<usize> {
    svg.split("<polyline")
        .skip(1)
        .map(|s| {
            let pts = s.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
            pts.split_whitespace().count()
        })
        .collect()
}

fn assert_one_error_line(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "stderr: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "`{}` should mention `{n}`", lines[0]);
    }
}

#[test]
fn plot_draws_one_series_per_run_and_key() {
    let dir = temp_dir("ok");
    let a = metrics_file(&dir, "sft", RUN_A);
    let b = metrics_file(&dir, "dpo", RUN_B);
    let out = dir.join("loss.svg");
    let o = out.display().to_string();
    let res = irbridge(&[
        "plot",
        "--metrics",
        &a,
        "--metrics",
        &b,
        "--keys",
        "loss,eval_loss",
        "--output",
        &o,
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
    for legend in ["sft: loss", "sft: eval_loss", "dpo: loss", "dpo: eval_loss"] {
        assert!(svg.contains(&format!(">{legend}</text>")), "legend entry {legend}");
    }
    // sft loss: 3 finite of 4 values (the null is skipped); eval lines 2 each; dpo loss 2.
    assert_eq!(polyline_sizes(&svg), [3, 2, 2, 2]);
    assert!(svg.contains(">loss, eval_loss vs step</text>"), "default title");

    // One file, one key, explicit labels and title; the x axis can be another key.
    let res = irbridge(&[
        "plot",
        "--metrics",
        &a,
        "--keys",
        "grad_norm",
        "--x",
        "loss",
        "--title",
        "norm",
        "--output",
        &o,
    ]);
    assert!(res.status.success(), "{}", String::from_utf8_lossy(&res.stderr));
    let svg = std::fs::read_to_string(&out).unwrap();
    assert!(svg.contains(">grad_norm</text>") && svg.contains(">norm</text>"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn plot_errors_name_the_file_line_or_key_and_write_nothing() {
    let dir = temp_dir("bad");
    let good = metrics_file(&dir, "good", RUN_A);
    let bad = metrics_file(&dir, "bad", "{\"step\":1,\"loss\":2.0}\n\n{\"step\":2,\"loss\":\n");
    let text = metrics_file(&dir, "text", "{\"step\":1,\"loss\":\"high\"}\n");
    let nostep = metrics_file(&dir, "nostep", "{\"loss\":1.0}\n");
    let none = dir.join("none.jsonl").display().to_string();
    let out = dir.join("x.svg");
    let o = out.display().to_string();
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--metrics", &good, "--metrics", &bad, "--keys", "loss"],
            vec!["bad/metrics.jsonl:3", "malformed JSON"],
        ),
        (
            vec!["--metrics", &good, "--keys", "loss,eval_los"],
            vec!["good/metrics.jsonl", "`eval_los`", "eval_loss"],
        ),
        (
            vec!["--metrics", &text, "--keys", "loss"],
            vec!["text/metrics.jsonl:1", "`loss`", "not a number"],
        ),
        (
            vec!["--metrics", &nostep, "--keys", "loss"],
            vec!["nostep/metrics.jsonl:1", "`step`"],
        ),
        (
            vec!["--metrics", &good, "--keys", "loss", "--labels", "a,b"],
            vec!["--labels"],
        ),
        (vec!["--metrics", &none, "--keys", "loss"], vec!["none.jsonl"]),
    ];
    for (args, needles) in cases {
        let mut all = vec!["plot"];
        all.extend(args);
        all.extend(["--output", &o]);
        assert_one_error_line(&irbridge(&all), &needles);
        assert!(!out.exists(), "a chart was written despite the error");
    }
    let png = dir.join("x.png").display().to_string();
    assert_one_error_line(
        &irbridge(&["plot", "--metrics", &good, "--keys", "loss", "--output", &png]),
        &["x.png", "SVG"],
    );
    std::fs::remove_dir_all(dir).unwrap();
}
