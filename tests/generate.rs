//! KV-cached decoding and sampling: the cached forward reproduces the full forward's logits on
//! every fixture architecture (prefill, one token at a time, ragged batches, sliding window), and
//! sampling is reproducible and independent of batch composition — on the CPU engine, and on the
//! CUDA engine against the CPU one (GPU tests print `skipped: no GPU (<test>)` without a GPU).

mod common;

use irbridge::generate::{generate, Decoder, Sample, SamplingOptions};
use irbridge::model::cuda::{CudaModel, Precision};
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

/// Fails unless every `|got − want| / (1 + |want|) < tol`.
fn assert_logits_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b).abs() / (1.0 + b.abs())) as f64)
        .fold(0.0, f64::max);
    assert!(
        worst < tol,
        "{what}: cached logits differ from the full forward by {worst:e} (tolerance {tol:e})"
    );
}

/// The two sequences every cache check feeds.
fn seqs() -> [&'static [u32]; 2] {
    [&IDS, &IDS[2..9]]
}

/// Two sequences of different lengths, fed ragged: a 3-token prefill for one, 5 for the other,
/// then single tokens (and one step where only one sequence advances), each step's logits checked
/// against `full` (the CPU full forward of each sequence). Returns the cache for more checks.
fn check_decoder_matches_full<D: Decoder>(dec: &D, full: &[Vec<f32>], what: &str, tol: f64) -> D::Cache {
    let v = dec.vocab_size();
    let seqs = seqs();
    let mut cache = dec.new_cache(2, 16).unwrap();
    let mut fed = [0usize, 0];
    let plan: [[usize; 2]; 5] = [[3, 5], [1, 1], [1, 0], [2, 1], [3, 0]];
    for (step, adds) in plan.iter().enumerate() {
        let chunks: Vec<&[u32]> = (0..2).map(|b| &seqs[b][fed[b]..fed[b] + adds[b]]).collect();
        let logits = dec.extend(&mut cache, &chunks).unwrap();
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
                tol,
            );
            row += 1;
        }
        assert_eq!(row * v, logits.len(), "{what}: one logits row per advanced sequence");
    }
    cache
}

/// The CPU full-forward logits of [`seqs`].
fn full_of_seqs(model: &Model) -> Vec<Vec<f32>> {
    seqs().iter().map(|s| full_logits(model, s)).collect()
}

fn check_cached_matches_full(model: &Model, what: &str) {
    let cache = check_decoder_matches_full(model, &full_of_seqs(model), what, 2e-5);
    assert_eq!(cache.lens(), &[10, 7]);
}

#[test]
fn cached_forward_matches_full_forward_on_every_architecture() {
    for name in ["tiny-gpt2", "tiny-llama", "tiny-qwen2"] {
        let model = Model::load(&model_dir(name)).unwrap();
        check_cached_matches_full(&model, name);
    }
}

/// A copy of tiny-llama as a Mistral with a sliding window of 4 tokens, in a fresh folder.
fn windowed_llama(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("irbridge-gen-window-{tag}-{}", std::process::id()));
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
    dir
}

#[test]
fn cached_forward_respects_a_sliding_window() {
    let dir = windowed_llama("cpu");
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

// ---------------------------------------------------------------- the CUDA engine (GPU only)

const MODELS: [&str; 3] = ["tiny-gpt2", "tiny-llama", "tiny-qwen2"];

/// CUDA decode logits vs the CPU full forward: f32 is a round-off check (cuBLAS and the kernels
/// sum in other orders than the CPU); bf16 stores activations, GEMM weights and the cache in bf16
/// (~3 significant digits) through every layer.
fn gpu_tol(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-4,
        Precision::Bf16 => 6e-2,
    }
}

/// The cached CUDA forward reproduces the CPU full forward on every fixture architecture and a
/// Mistral-style sliding window, in f32 and bf16, with the default rows per pass and with 3 (so
/// the 8-row prefill takes three passes and the logits rows are gathered from two of them).
#[test]
fn gpu_cached_forward_matches_cpu_on_every_architecture() {
    if common::skip_without_gpu("gpu_cached_forward_matches_cpu_on_every_architecture") {
        return;
    }
    let window = windowed_llama("gpu");
    let mut models: Vec<(String, PathBuf)> = MODELS.iter().map(|n| (n.to_string(), model_dir(n))).collect();
    models.push(("mistral window 4".into(), window.clone()));
    for (name, dir) in &models {
        let model = Model::load(dir).unwrap();
        let full = full_of_seqs(&model);
        for precision in [Precision::F32, Precision::Bf16] {
            for rows in [None, Some(3)] {
                let mut cm = CudaModel::new(&model, 0, precision).unwrap();
                if let Some(r) = rows {
                    cm.set_decode_rows(r).unwrap();
                }
                let what = format!("{name} {precision} ({} rows a pass)", cm.decode_rows());
                let cache = check_decoder_matches_full(&cm, &full, &what, gpu_tol(precision));
                assert_eq!(cache.lens(), &[10, 7], "{what}");
                // By default a pass holds every slot (2 × 16, fewer than the default rows).
                assert_eq!(cache.rows_per_pass(), rows.unwrap_or(2 * 16), "{what}");
            }
        }
    }
    std::fs::remove_dir_all(&window).unwrap();
}

/// The CUDA cache refuses what the CPU cache refuses, with the same words, before touching the
/// device (the cache is unchanged after each error); a cache only serves the model that made it.
#[test]
fn gpu_cache_errors_are_values() {
    if common::skip_without_gpu("gpu_cache_errors_are_values") {
        return;
    }
    let model = Model::load(&model_dir("tiny-gpt2")).unwrap();
    let cm = CudaModel::new(&model, 0, Precision::F32).unwrap();
    let err = cm.new_kv_cache(1, 10_000).unwrap_err().to_string();
    assert!(err.contains("learned positions"), "{err}");
    let mut cache = cm.new_kv_cache(1, 4).unwrap();
    let err = cm.extend(&mut cache, &[&IDS[..5]]).unwrap_err().to_string();
    assert!(err.contains("capacity"), "{err}");
    let err = cm.extend(&mut cache, &[&[60_000]]).unwrap_err().to_string();
    assert!(err.contains("outside the vocabulary"), "{err}");
    let err = cm.extend(&mut cache, &[&IDS[..1], &IDS[..1]]).unwrap_err().to_string();
    assert!(err.contains("2 sequences"), "{err}");
    assert_eq!(cache.lens(), &[0]);
    assert!(cm.extend(&mut cache, &[&[]]).unwrap().is_empty());
    let other = CudaModel::new(&model, 0, Precision::F32).unwrap();
    let err = other.extend(&mut cache, &[&IDS[..1]]).unwrap_err().to_string();
    assert!(err.contains("another CudaModel"), "{err}");
    // Still usable by its own model, and it predicts what the CPU predicts.
    let logits = cm.extend(&mut cache, &[&IDS[..4]]).unwrap();
    let want = full_logits(&model, &IDS[..4]);
    let v = model.config().vocab_size;
    assert_logits_close("after errors", &logits, &want[3 * v..], gpu_tol(Precision::F32));
    assert_eq!(cache.lens(), &[4]);
}

/// Samples of the same prompts and options on the CPU and the CUDA engine agree token for token,
/// with the same log-probs (to 1e-4). A greedy pick may legitimately differ where the CPU's two
/// candidates' logits are within f32 round-off (1e-4): that sample is compared up to there.
fn assert_same_samples(model: &Model, prompts: &[Vec<u32>], cpu: &[Sample], gpu: &[Sample], greedy: bool, what: &str) {
    assert_eq!(cpu.len(), gpu.len(), "{what}: samples");
    let v = model.config().vocab_size;
    for (p, (c, g)) in cpu.iter().zip(gpu).enumerate() {
        let same = c.tokens.iter().zip(&g.tokens).take_while(|(a, b)| a == b).count();
        for i in 0..same {
            assert!(
                (c.logps[i] - g.logps[i]).abs() < 1e-4,
                "{what}: prompt {p} token {i} logp {} vs {}",
                c.logps[i],
                g.logps[i]
            );
        }
        if same == c.tokens.len() && c.tokens.len() == g.tokens.len() {
            assert_eq!(c.stopped, g.stopped, "{what}: prompt {p}");
            continue;
        }
        assert!(
            greedy,
            "{what}: prompt {p}: sampled {:?} on CUDA, {:?} on the CPU",
            g.tokens, c.tokens
        );
        let prefix: Vec<u32> = prompts[p].iter().chain(&c.tokens[..same]).copied().collect();
        let logits = full_logits(model, &prefix);
        let row = &logits[(prefix.len() - 1) * v..];
        let gap = (row[c.tokens[same] as usize] - row[g.tokens[same] as usize]).abs();
        assert!(
            gap < 1e-4,
            "{what}: prompt {p} token {same}: CUDA picked {} and the CPU {}, {gap:e} apart",
            g.tokens[same],
            c.tokens[same]
        );
    }
}

/// `generate` on the CUDA engine (f32) reproduces the CPU engine's samples: greedy, and seeded
/// temperature + nucleus sampling over a batch of prompts of different lengths.
#[test]
fn gpu_sampling_reproduces_the_cpu_samples() {
    if common::skip_without_gpu("gpu_sampling_reproduces_the_cpu_samples") {
        return;
    }
    let prompts = vec![IDS[..3].to_vec(), IDS[4..6].to_vec(), IDS[..1].to_vec()];
    let greedy = SamplingOptions {
        temperature: 0.0,
        max_new_tokens: 5,
        ..Default::default()
    };
    let sampled = SamplingOptions {
        temperature: 0.9,
        top_p: 0.95,
        max_new_tokens: 6,
        seed: 7,
    };
    for name in MODELS {
        let model = Model::load(&model_dir(name)).unwrap();
        let cm = CudaModel::new(&model, 0, Precision::F32).unwrap();
        for (opts, is_greedy) in [(greedy, true), (sampled, false)] {
            let cpu = generate(&model, &prompts, &[], &opts).unwrap();
            let gpu = generate(&cm, &prompts, &[], &opts).unwrap();
            let what = format!("{name} temperature {}", opts.temperature);
            assert_same_samples(&model, &prompts, &cpu, &gpu, is_greedy, &what);
        }
    }
}
