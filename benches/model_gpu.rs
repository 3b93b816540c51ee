//! GPU forward + backward throughput (tokens/s) of the CUDA transformer engine on a GPT-2-124M-
//! shaped and a Llama-3.2-1B-shaped model, built from a config with random weights (no files),
//! in bf16 and f32 (`cargo bench --bench model_gpu [-- --json PATH] [--iters N]`).
//!
//! One step = `CudaModel::forward` (which copies the per-token outputs to the host) + `backward`
//! of the token-mean NLL on a full `[B, T]` batch of random ids, then a stream synchronisation;
//! the median wall time of `--iters` steps (default 10) after 2 warm-ups. `scripts/
//! model_gpu_baseline.py` runs the same shapes and objective with transformers/PyTorch.
//!
//! Without a usable GPU it prints `skipped: no GPU (<reason>)` and exits 0.

mod gpu_common;

use anyhow::{Context, Result};
use irbridge::model::cuda::{CudaModel, Precision};
use irbridge::model::{Batch, Model, ModelConfig, ParamPlan, Tensors};
use rayon::prelude::*;
use serde::Serialize;
use serde_json::json;
use std::time::Instant;

const WARMUP: usize = 2;

/// One benchmarked shape: a config as `config.json` would hold it, and the batch.
struct Shape {
    name: &'static str,
    config: serde_json::Value,
    batch: usize,
    seq: usize,
}

/// The two shapes (keep in sync with `scripts/model_gpu_baseline.py`).
fn shapes() -> Vec<Shape> {
    vec![
        Shape {
            name: "gpt2-124M",
            config: json!({
                "model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
                "n_layer": 12, "n_head": 12, "layer_norm_epsilon": 1e-5,
                "activation_function": "gelu_new"
            }),
            batch: 8,
            seq: 1024,
        },
        Shape {
            name: "llama-1B",
            config: json!({
                "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
                "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-5,
                "max_position_embeddings": 131072, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                "tie_word_embeddings": true, "hidden_act": "silu"
            }),
            batch: 8,
            seq: 1024,
        },
    ]
}

#[derive(Serialize)]
struct Row {
    model: String,
    dtype: String,
    batch: usize,
    seq: usize,
    tokens: usize,
    params: usize,
    median_ms: f64,
    tokens_per_s: f64,
    #[serde(rename = "impl")]
    implementation: &'static str,
}

#[derive(Serialize)]
struct Report {
    device: String,
    iters: usize,
    step: &'static str,
    rows: Vec<Row>,
}

fn main() {
    gpu_common::main_with("model_gpu", 10, 3, run);
}

/// Deterministic, fast, parallel random init: every tensor uniform with the std HF uses
/// (0.02) for matrices and embeddings, norm weights 1, biases 0. The values do not affect speed.
fn random_params(cfg: &ModelConfig) -> Tensors {
    let plan = ParamPlan::new(cfg);
    let mut t = Tensors::zeros(&plan.specs);
    let specs = plan.specs.clone();
    for (i, d) in t.data_mut().iter_mut().enumerate() {
        let spec = &specs[i];
        if spec.shape.len() == 1 {
            // Rank-1 tensors are norm weights (1) and biases (0).
            d.fill(if spec.name.ends_with(".weight") { 1.0 } else { 0.0 });
            continue;
        }
        let a = 0.02f32 * 3f32.sqrt();
        d.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
            let mut s = ((i as u64) << 32) ^ (c as u64) ^ 0x9e37_79b9_7f4a_7c15;
            for x in chunk.iter_mut() {
                // splitmix64 → uniform in [−a, a).
                s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                let u = (z >> 40) as f32 / (1u64 << 24) as f32;
                *x = (2.0 * u - 1.0) * a;
            }
        });
    }
    t
}

/// A full `[B, T]` batch of seeded random ids with next-token targets.
fn random_batch(vocab: usize, b: usize, t: usize) -> Result<Batch> {
    let mut s = 12345u64;
    let ids: Vec<i64> = (0..b * t)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as i64
        })
        .collect();
    Batch::causal_lm(&ids, b, t, &vec![t; b])
}

fn run(args: &gpu_common::Args) -> Result<()> {
    let mut rows = Vec::new();
    let mut device = String::new();
    for shape in shapes() {
        let cfg = ModelConfig::from_json(shape.config.clone()).with_context(|| shape.name.to_string())?;
        eprintln!("{}: building random weights", shape.name);
        let params = random_params(&cfg);
        let n_params: usize = params.iter().map(|(s, _)| s.numel()).sum();
        let model = Model::from_parts(cfg.clone(), params)?;
        let batch = random_batch(cfg.vocab_size, shape.batch, shape.seq)?;
        let n_targets = batch.targets().iter().filter(|&&x| x >= 0).count();
        let dlogp: Vec<f32> = batch
            .targets()
            .iter()
            .map(|&x| if x >= 0 { -1.0 / n_targets as f32 } else { 0.0 })
            .collect();
        for precision in [Precision::Bf16, Precision::F32] {
            let mut m = CudaModel::new(&model, 0, precision).with_context(|| format!("{} {precision}", shape.name))?;
            device = m.device().name()?;
            let stream = m.device().stream().clone();
            let mut times = Vec::with_capacity(args.iters);
            for i in 0..WARMUP + args.iters {
                let t0 = Instant::now();
                let f = m.forward(&batch)?;
                m.backward(&f, &dlogp)?;
                stream.synchronize()?;
                if i >= WARMUP {
                    times.push(t0.elapsed().as_secs_f64());
                }
                drop(f);
            }
            times.sort_by(|a, b| a.total_cmp(b));
            let med = times[times.len() / 2];
            let tokens = shape.batch * shape.seq;
            eprintln!("{} {precision}: {:.1} ms/step", shape.name, med * 1e3);
            rows.push(Row {
                model: shape.name.to_string(),
                dtype: precision.to_string(),
                batch: shape.batch,
                seq: shape.seq,
                tokens,
                params: n_params,
                median_ms: med * 1e3,
                tokens_per_s: tokens as f64 / med,
                implementation: "irbridge",
            });
        }
    }
    let report = Report {
        device,
        iters: args.iters,
        step: "forward (per-token outputs to host) + backward of the token-mean NLL, full [B, T] batch, synchronised",
        rows,
    };
    println!();
    println!("### irbridge CUDA engine, forward + backward on {}", report.device);
    println!();
    println!("| model | dtype | batch × seq | params | median ms | tokens/s |");
    println!("|---|---|---|---:|---:|---:|");
    for r in &report.rows {
        println!(
            "| {} | {} | {} × {} | {:.0}M | {:.1} | {:.0} |",
            r.model,
            r.dtype,
            r.batch,
            r.seq,
            r.params as f64 / 1e6,
            r.median_ms,
            r.tokens_per_s
        );
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    Ok(())
}
