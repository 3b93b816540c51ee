//! Writing a checkpoint in the Hugging Face layout, atomically.
//!
//! The directory is assembled under a temporary name next to the target (same filesystem), every
//! file is fsynced, then the directory is renamed into place; an interrupted save leaves either the
//! previous checkpoint or none, never a half-written one that a resume would trust.

use super::config::ModelConfig;
use super::params::Tensors;
use super::weights::SINGLE_FILE;
use anyhow::{ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::fsutil::{sync_dir, temp_sibling, write_synced};

/// Tokenizer and generation files copied verbatim from the source checkpoint when present.
pub const TOKENIZER_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
];

/// Writes `out/` = `model.safetensors` (F32, HF names; a tied LM head is not written),
/// `config.json` (the source JSON with the dtype set to float32), and the [`TOKENIZER_FILES`]
/// found in `source_dir`. An existing `out/` is replaced.
pub fn save_pretrained(cfg: &ModelConfig, params: &Tensors, source_dir: Option<&Path>, out: &Path) -> Result<()> {
    ensure!(out.file_name().is_some(), "{}: not a directory name", out.display());
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = temp_sibling(out);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let written = write_all(cfg, params, source_dir, &tmp);
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // A directory cannot be renamed over a non-empty one: move the old one aside first, so the
    // window without a checkpoint is two renames long, and the old copy is deleted only after.
    let old = temp_sibling(out);
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old).with_context(|| format!("moving the previous {} aside", out.display()))?;
    }
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    sync_dir(&parent)?;
    if had_old {
        let removed = if old.is_dir() {
            std::fs::remove_dir_all(&old)
        } else {
            std::fs::remove_file(&old)
        };
        removed.with_context(|| format!("removing {}", old.display()))?;
    }
    Ok(())
}

fn write_all(cfg: &ModelConfig, params: &Tensors, source_dir: Option<&Path>, dir: &Path) -> Result<()> {
    write_synced(&dir.join(SINGLE_FILE), &serialize(params)?)?;
    write_synced(&dir.join("config.json"), config_json(cfg)?.as_bytes())?;
    if let Some(src) = source_dir {
        for f in TOKENIZER_FILES {
            let from = src.join(f);
            if from.is_file() {
                let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
                write_synced(&dir.join(f), &bytes)?;
            }
        }
    }
    sync_dir(dir)
}

/// safetensors bytes of every parameter as F32 with `{"format": "pt"}` metadata (transformers
/// refuses files without it).
fn serialize(params: &Tensors) -> Result<Vec<u8>> {
    // f32 → little-endian bytes; on little-endian targets this is the in-memory representation.
    let bytes: Vec<(String, Vec<u8>)> = params
        .iter()
        .map(|(s, d)| (s.name.clone(), d.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for ((name, b), (spec, _)) in bytes.iter().zip(params.iter()) {
        let view = TensorView::new(Dtype::F32, spec.shape.clone(), b).with_context(|| format!("tensor {name:?}"))?;
        views.push((name.clone(), view));
    }
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(meta)).context("serializing model.safetensors")
}

/// The source `config.json`, with the dtype keys rewritten to `float32` since that is what the
/// weights are saved as.
fn config_json(cfg: &ModelConfig) -> Result<String> {
    let mut json = cfg.raw.clone();
    let obj = json.as_object_mut().context("config.json: expected a JSON object")?;
    for key in ["dtype", "torch_dtype"] {
        if obj.contains_key(key) {
            obj.insert(key.into(), Value::String("float32".into()));
        }
    }
    ensure!(obj.contains_key("model_type"), "config.json: no model_type to save");
    Ok(serde_json::to_string_pretty(&json)? + "\n")
}
