//! `irbridge generate`: sample continuations of prompts from any supported checkpoint, with a KV
//! cache (temperature, top-p, a token budget, a seed).

use super::DeviceArgs;
use anyhow::{ensure, Context, Result};
use clap::Args;
use irbridge::data::{ChatTemplate, Message, Tokenizer};
use irbridge::generate::{generate, SamplingOptions};
use irbridge::model::cuda::CudaModel;
use irbridge::model::Model;
use irbridge::Device;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Flags of `irbridge generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A prompt (repeat the flag for several).
    #[arg(long, required_unless_present = "prompts_file")]
    prompt: Vec<String>,
    /// A file with one prompt per line (blank lines skipped), in addition to --prompt.
    #[arg(long)]
    prompts_file: Option<PathBuf>,
    /// Wrap each prompt as a user message in the tokenizer's chat template (with the
    /// generation prompt), as for an instruction-tuned model.
    #[arg(long)]
    chat: bool,
    /// Samples per prompt.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Tokens to generate at most per sample.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Softmax temperature (0: greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Nucleus sampling mass (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling streams: sample k of the run (prompts in order, --num-samples each)
    /// draws from stream k, so a run is reproducible and one sample never depends on another's
    /// tokens (reordering the prompts reassigns the streams).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object per sample (prompt, text, token ids, per-token log-probs).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dev: DeviceArgs,
}

/// The ids generation stops on: the tokenizer's EOS and every `eos_token_id` of `config.json`
/// and `generation_config.json` (transformers stops on any of them).
fn stop_ids(dir: &Path, tok: &Tokenizer, model: &Model) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.eos().map(|e| e.id).into_iter().collect();
    let from_json = |v: &Value| -> Vec<u32> {
        match &v["eos_token_id"] {
            Value::Number(n) => n.as_u64().map(|x| x as u32).into_iter().collect(),
            Value::Array(a) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => Vec::new(),
        }
    };
    ids.extend(from_json(&model.config().raw));
    let gen = dir.join("generation_config.json");
    if let Some(v) = std::fs::read_to_string(gen)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        ids.extend(from_json(&v));
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

fn read_prompts(a: &GenerateArgs) -> Result<Vec<String>> {
    let mut prompts = a.prompt.clone();
    if let Some(p) = &a.prompts_file {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        prompts.extend(text.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
    }
    ensure!(
        !prompts.is_empty(),
        "no prompts: give --prompt TEXT or --prompts-file FILE"
    );
    Ok(prompts)
}

/// Runs `irbridge generate`.
pub fn run(a: &GenerateArgs) -> Result<()> {
    let device = a.dev.check_device()?;
    ensure!(a.num_samples > 0, "--num-samples: must be at least 1");
    let opts = SamplingOptions {
        temperature: a.temperature,
        top_p: a.top_p,
        max_new_tokens: a.max_new_tokens,
        seed: a.seed,
    };
    opts.validate()
        .map_err(|e| anyhow::anyhow!("--{}", e.to_string().replace('_', "-")))?;
    let prompts = read_prompts(a)?;
    let tok = Tokenizer::from_dir(&a.model)?;
    let model = Model::load(&a.model)?;
    let template = if a.chat {
        Some(ChatTemplate::from_tokenizer(&tok).with_context(|| format!("--chat: {}", a.model.display()))?)
    } else {
        None
    };
    let mut encoded = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let ids = match &template {
            Some(t) => {
                let msg = Message {
                    role: "user".into(),
                    content: p.clone(),
                };
                tok.encode_plain(&t.render(&[msg], true)?)?
            }
            None => tok.encode(p)?,
        };
        ensure!(!ids.is_empty(), "prompt {}: tokenises to nothing", i + 1);
        for _ in 0..a.num_samples {
            encoded.push((i, ids.clone()));
        }
    }
    let ids: Vec<Vec<u32>> = encoded.iter().map(|(_, ids)| ids.clone()).collect();
    let stop = stop_ids(&a.model, &tok, &model);
    let samples = match device {
        Device::Cpu => generate(&model, &ids, &stop, &opts)?,
        Device::Cuda(n) => {
            let gpu = CudaModel::new(&model, n, a.dev.dtype())?;
            drop(model);
            generate(&gpu, &ids, &stop, &opts)?
        }
    };
    for ((i, prompt_ids), s) in encoded.iter().zip(&samples) {
        // Decode prompt + sample and cut the decoded prompt off (as transformers' streamers do),
        // so word boundaries between the two survive for tokenizers without leading spaces.
        let joint: Vec<u32> = prompt_ids.iter().chain(&s.tokens).copied().collect();
        let (full, head) = (tok.decode(&joint)?, tok.decode(prompt_ids)?);
        let text = match full.strip_prefix(head.as_str()) {
            Some(rest) => rest.to_string(),
            None => tok.decode(&s.tokens)?,
        };
        if a.json {
            println!(
                "{}",
                json!({
                    "prompt": prompts[*i], "text": text, "token_ids": s.tokens,
                    "logps": s.logps, "logp": s.logp(), "stopped": s.stopped,
                })
            );
        } else {
            println!("{}{}", prompts[*i], text);
        }
    }
    Ok(())
}
