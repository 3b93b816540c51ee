//! The built-in task on disk: its tokenizer (built in code with the `tokenizers` crate), a model
//! configuration, and the datasets of one seed as JSONL in the formats every irbridge command
//! reads — so each stage of the study is an ordinary `irbridge train` run, and a user can rerun
//! any of them by hand on the files the demo leaves behind.

use super::task::{self, BASE, EOS, EXPERT, PAD, TOPICS, UNK};
use crate::fsutil::write_atomic;
use anyhow::{anyhow, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::AddedToken;

/// Writes `tokenizer.json` (word level, whitespace split, `<pad>`/`<eos>`/`<unk>` special) and a
/// `tokenizer_config.json` that transformers' `AutoTokenizer` loads unchanged.
pub fn write_tokenizer(dir: &Path) -> Result<()> {
    let vocab: ahash::AHashMap<String, u32> = task::vocabulary()
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), i as u32))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab)
        .unk_token(UNK.into())
        .build()
        .map_err(|e| anyhow!("building the task's word-level model: {e}"))?;
    let mut tok = tokenizers::Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(WhitespaceSplit));
    tok.add_special_tokens(&[
        AddedToken::from(PAD, true),
        AddedToken::from(EOS, true),
        AddedToken::from(UNK, true),
    ]);
    let text = tok
        .to_string(true)
        .map_err(|e| anyhow!("serialising the task tokenizer: {e}"))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    write_atomic(&dir.join("tokenizer.json"), text.as_bytes())?;
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 64,
    });
    write_atomic(
        &dir.join("tokenizer_config.json"),
        (serde_json::to_string_pretty(&config)? + "\n").as_bytes(),
    )
}

/// The shape of the study's model (a Llama-architecture transformer with GQA and tied
/// embeddings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelShape {
    /// Hidden width.
    pub hidden: usize,
    /// Blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// MLP width.
    pub intermediate: usize,
}

impl ModelShape {
    /// `config.json` for this shape over the task vocabulary (ids: `<pad>` 0, `<eos>` 1).
    pub fn config_json(&self) -> serde_json::Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": task::vocabulary().len(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.hidden / self.heads,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "tie_word_embeddings": true,
            "initializer_range": 0.02,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "bos_token_id": 1,
            "torch_dtype": "float32",
        })
    }
}

/// How many examples of each kind one seed's data has.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSizes {
    /// Base-distribution texts for pre-training.
    pub pretrain: usize,
    /// Expert demonstrations for SFT.
    pub demos: usize,
    /// Preference pairs for DPO.
    pub pairs: usize,
    /// Held-out pairs (labelled by the true reward) for the implicit-reward ranking accuracy.
    pub heldout_pairs: usize,
    /// Fraction of pair responses drawn from the expert distribution (the rest from the base):
    /// offline preference data mixes responses of models of different quality, as
    /// UltraFeedback-style datasets do.
    pub pair_expert_fraction: f64,
}

/// Paths of one seed's data files.
#[derive(Clone, Debug)]
pub struct DataFiles {
    /// `{"text"}` rows from the base distribution.
    pub pretrain: PathBuf,
    /// `{"prompt","completion"}` expert demonstrations.
    pub sft: PathBuf,
    /// `{"prompt","chosen","rejected"}` Bradley–Terry pairs.
    pub dpo: PathBuf,
    /// Held-out pairs from the same mixture as `dpo`, whose chosen side has the strictly higher
    /// true reward.
    pub heldout: PathBuf,
    /// Held-out pairs of two base responses (labelled the same way): the stricter ranking test,
    /// where "looks like a demonstration" says nothing and only the reward-relevant words differ.
    pub heldout_base: PathBuf,
}

fn completion(words: &[&str]) -> String {
    let mut s = String::new();
    for w in words {
        s.push(' ');
        s.push_str(w);
    }
    s
}

fn true_reward(topic: usize, words: &[&str]) -> f64 {
    let mut w = words.to_vec();
    w.push(EOS);
    task::reward(topic, &w).total
}

/// Draws one seed's datasets and writes them under `dir`. Each kind has its own random stream,
/// so changing one size leaves the other files unchanged.
pub fn write_datasets(dir: &Path, sizes: &DataSizes, seed: u64) -> Result<DataFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stream = |k: u64| {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        r.set_stream(k);
        r
    };
    let files = DataFiles {
        pretrain: dir.join("pretrain.jsonl"),
        sft: dir.join("sft.jsonl"),
        dpo: dir.join("dpo.jsonl"),
        heldout: dir.join("heldout_pairs.jsonl"),
        heldout_base: dir.join("heldout_base_pairs.jsonl"),
    };
    let mut rng = stream(1);
    let mut text = String::new();
    for i in 0..sizes.pretrain {
        let t = i % TOPICS.len();
        let row = json!({ "text": format!("{}{}", task::prompt(t), completion(&BASE.sample(&mut rng, t))) });
        writeln!(text, "{row}")?;
    }
    write_atomic(&files.pretrain, text.as_bytes())?;
    let mut rng = stream(2);
    let mut text = String::new();
    for i in 0..sizes.demos {
        let t = i % TOPICS.len();
        let row = json!({ "prompt": task::prompt(t), "completion": completion(&EXPERT.sample(&mut rng, t)) });
        writeln!(text, "{row}")?;
    }
    write_atomic(&files.sft, text.as_bytes())?;
    let f = sizes.pair_expert_fraction;
    write_atomic(&files.dpo, pairs(&mut stream(3), sizes.pairs, f, false)?.as_bytes())?;
    write_atomic(
        &files.heldout,
        pairs(&mut stream(4), sizes.heldout_pairs, f, true)?.as_bytes(),
    )?;
    write_atomic(
        &files.heldout_base,
        pairs(&mut stream(5), sizes.heldout_pairs, 0.0, true)?.as_bytes(),
    )?;
    Ok(files)
}

/// `n` pairs of distinct responses, each drawn from the expert distribution with probability
/// `expert` (else the base): labelled by Bradley–Terry on `r*` (`P(a ≻ b) = σ(r*(a) − r*(b))`),
/// or by the strictly higher `r*` (`deterministic`; ties are redrawn).
fn pairs(rng: &mut ChaCha8Rng, n: usize, expert: f64, deterministic: bool) -> Result<String> {
    let mut text = String::new();
    let draw = |rng: &mut ChaCha8Rng, t: usize| {
        let style = if rng.gen::<f64>() < expert { &EXPERT } else { &BASE };
        style.sample(rng, t)
    };
    let mut i = 0;
    while i < n {
        let t = i % TOPICS.len();
        let (a, b) = (draw(rng, t), draw(rng, t));
        let (ra, rb) = (true_reward(t, &a), true_reward(t, &b));
        if a == b || (deterministic && ra == rb) {
            continue;
        }
        let a_wins = if deterministic {
            ra > rb
        } else {
            rng.gen::<f64>() < 1.0 / (1.0 + (rb - ra).exp())
        };
        let (c, r) = if a_wins { (a, b) } else { (b, a) };
        let row = json!({ "prompt": task::prompt(t), "chosen": completion(&c), "rejected": completion(&r) });
        writeln!(text, "{row}")?;
        i += 1;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_records, tokenize_dpo, tokenize_sft, TokenizeOptions, Tokenizer};

    #[test]
    fn files_tokenise_through_the_data_layer() {
        let dir = std::env::temp_dir().join(format!("irbridge-study-data-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        write_tokenizer(&dir).unwrap();
        let sizes = DataSizes {
            pretrain: 8,
            demos: 8,
            pairs: 8,
            heldout_pairs: 8,
            pair_expert_fraction: 0.5,
        };
        let files = write_datasets(&dir, &sizes, 5).unwrap();
        let tok = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tok.pad_id().unwrap(), 0);
        let opts = TokenizeOptions {
            max_length: 64,
            ..Default::default()
        };
        let sft = tokenize_sft(&read_records(&files.sft).unwrap(), &tok, &opts).unwrap();
        assert_eq!(sft.kept().count(), 8);
        let first = &sft.kept().next().unwrap().info.seq;
        // `about sea` is the prompt (masked); the completion ends with one `<eos>` (id 1).
        assert_eq!(&first.completion_mask[..2], &[0, 0]);
        assert_eq!(first.input_ids.last(), Some(&1));
        assert_eq!(first.input_ids.iter().filter(|&&t| t == 1).count(), 1);
        assert!(!first.input_ids.contains(&2), "no <unk>");
        let pre = tokenize_sft(&read_records(&files.pretrain).unwrap(), &tok, &opts).unwrap();
        assert_eq!(pre.kept().count(), 8);
        for f in [&files.dpo, &files.heldout, &files.heldout_base] {
            let d = tokenize_dpo(&read_records(f).unwrap(), &tok, &opts).unwrap();
            assert_eq!(d.kept().count(), 8);
            assert_eq!(d.report.n_prompt_not_token_prefix, 0);
        }
        // Same seed, same bytes; another seed, other data.
        let again = dir.join("again");
        let files2 = write_datasets(&again, &sizes, 5).unwrap();
        assert_eq!(std::fs::read(&files.dpo).unwrap(), std::fs::read(&files2.dpo).unwrap());
        let other = write_datasets(&dir.join("other"), &sizes, 6).unwrap();
        assert_ne!(std::fs::read(&files.dpo).unwrap(), std::fs::read(&other.dpo).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
