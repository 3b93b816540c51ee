//! KV-cached decoding and sampling: the cached forward reproduces the full forward's logits on
//! every fixture architecture (prefill, one token at a time, ragged batches, sliding window), and
//! sampling is reproducible and independent of batch composition.

mod common;

use irbridge::generate::{generate, SamplingOptions};
use irbridge::model::{Batch, Model};
use std::path::PathBuf;

fn model_dir(name: &str) -> PathBuf {
    common::fixtures().join("models").join(name)
}

const IDS: [u32; 10] = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13];

/// Full-forward logits `[len, V]` of one sequence.
fn full_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let wide: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    let batch = Batch::causal_lm(&wide, 1, ids.len(), &[ids.len()]).unwrap();
    model.forward_logits(&batch).unwrap()
}

fn assert_logits_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b).abs() / (1.0 + b.abs())) as f64)
        .fold(0.0, f64::max);
    assert!(
        worst < 2e-5,
        "{what}: cached logits differ from the full forward by {worst:e}"
    );
}

/// Two sequences of different lengths, fed ragged: a 3-token prefill for one, 5 for the other,
/// then single tokens (and one step where only one sequence advances), checked at every step.
fn check_cached_matches_full(model: &Model, what: &str) {
    let v = model.config().vocab_size;
    let seqs: [&[u32]; 2] = [&IDS, &IDS[2..9]];
    let full: Vec<Vec<f32>> = seqs.iter().map(|s| full_logits(model, s)).collect();
    let mut cache = model.new_kv_cache(2, 16).unwrap();
    let mut fed = [0usize, 0];
    let plan: [[usize; 2]; 5] = [[3, 5], [1, 1], [1, 0], [2, 1], [3, 0]];
    for (step, adds) in plan.iter().enumerate() {
        let chunks: Vec<&[u32]> = (0..2).map(|b| &seqs[b][fed[b]..fed[b] + adds[b]]).collect();
        let logits = model.extend(&mut cache, &chunks).unwrap();
        let mut row = 0;
        for b in 0..2 {
            if adds[b] == 0 {
                continue;
            }
            fed[b] += adds[b];
            let t = fed[b] - 1;
            assert_logits_close(
                &format!("{what} step {step} sequence {b} position {t}"),
                &logits[row * v..(row + 1) * v],
                &full[b][t * v..(t + 1) * v],
            );
            row += 1;
        }
        assert_eq!(row * v, logits.len(), "{what}: one logits row per advanced sequence");
    }
    assert_eq!(cache.lens(), &[10, 7]);
}

#[test]
fn cached_forward_matches_full_forward_on_every_architecture() {
    for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2"] {
        let model = Model::load(&model_dir(name)).unwrap();
        check_cached_matches_full(&model, name);
    }
}

#[test]
fn cached_forward_respects_a_sliding_window() {
    let dir = std::env::temp_dir().join(format!("irbridge-gen-window-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(model_dir("tiny-llama").join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&text).unwrap();
    cfg["model_type"] = "mistral".into();
    cfg["sliding_window"] = 4.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        model_dir("tiny-llama").join("model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let model = Model::load(&dir).unwrap();
    check_cached_matches_full(&model, "mistral window 4");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn cache_errors_are_values() {
    let model = Model::load(&model_dir("tiny-gpt2")).unwrap();
    let err = model.new_kv_cache(1, 10_000).unwrap_err().to_string();
    assert!(err.contains("learned positions"), "{err}");
    let mut cache = model.new_kv_cache(1, 4).unwrap();
    let err = model.extend(&mut cache, &[&IDS[..5]]).unwrap_err().to_string();
    assert!(err.contains("capacity"), "{err}");
    let err = model.extend(&mut cache, &[&[60_000]]).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let err = model
        .extend(&mut cache, &[&IDS[..1], &IDS[..1]])
        .unwrap_err()
        .to_string();
    assert!(err.contains("2 sequences"), "{err}");
    let err = generate(&model, &[vec![]], &[], &SamplingOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("empty"), "{err}");
}

#[test]
fn sampling_is_seeded_and_independent_of_the_batch() {
    let model = Model::load(&model_dir("tiny-llama")).unwrap();
    let prompts = vec![IDS[..3].to_vec(), IDS[4..6].to_vec(), IDS[..1].to_vec()];
    let opts = SamplingOptions {
        temperature: 0.9,
        top_p: 0.95,
        max_new_tokens: 6,
        seed: 7,
    };
    let a = generate(&model, &prompts, &[], &opts).unwrap();
    let b = generate(&model, &prompts, &[], &opts).unwrap();
    assert_eq!(a, b, "same seed, same samples");
    assert!(a.iter().all(|s| s.tokens.len() == 6 && !s.stopped));
    // The first prompt alone draws the same sample as inside the batch (stream = its index).
    let alone = generate(&model, &prompts[..1], &[], &opts).unwrap();
    assert_eq!(alone[0].tokens, a[0].tokens);
    let other = generate(&model, &prompts, &[], &SamplingOptions { seed: 8, ..opts }).unwrap();
    assert_ne!(a, other, "another seed draws other samples");
    // The reported log-probs are the model's own: rescore prompt + sample with a full forward.
    let v = model.config().vocab_size;
    let seq: Vec<u32> = prompts[0].iter().chain(&a[0].tokens).copied().collect();
    let logits = full_logits(&model, &seq);
    for (i, (&tok, &lp)) in a[0].tokens.iter().zip(&a[0].logps).enumerate() {
        let row = &logits[(prompts[0].len() + i - 1) * v..][..v];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
        let want = row[tok as usize] as f64 - lse;
        assert!((lp as f64 - want).abs() < 1e-4, "token {i}: logp {lp} vs {want}");
    }
}

#[test]
fn generation_stops_on_the_stop_token() {
    let model = Model::load(&model_dir("tiny-gpt2")).unwrap();
    let greedy = SamplingOptions {
        temperature: 0.0,
        max_new_tokens: 5,
        ..Default::default()
    };
    let free = generate(&model, &[IDS[..4].to_vec()], &[], &greedy).unwrap();
    // Make the second greedy token the stop token: generation must end right there.
    let stop = free[0].tokens[1];
    let first_stop = free[0].tokens.iter().position(|&t| t == stop).unwrap();
    let stopped = generate(&model, &[IDS[..4].to_vec()], &[stop], &greedy).unwrap();
    assert!(stopped[0].stopped);
    assert_eq!(stopped[0].tokens, free[0].tokens[..=first_stop]);
}
