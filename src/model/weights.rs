//! Reading Hugging Face safetensors checkpoints (single file or sharded index) into f32 tensors
//! named and shaped as [`ParamPlan`] says.
//!
//! Every mismatch is an error naming the file and the tensor: a silently transposed or truncated
//! weight would train without complaint and produce garbage.

use super::params::{ParamPlan, Tensors};
use anyhow::{bail, ensure, Context, Result};
use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Sharded checkpoint index name.
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// Loads every tensor of `plan` from `dir` (`model.safetensors`, else the sharded index),
/// converting F32/BF16/F16 storage to f32.
///
/// Checkpoint tensors the plan does not use (a redundant tied `lm_head.weight`, GPT-2 `attn.bias`
/// mask buffers, rotary caches) are ignored. GPT-2 files written without the `transformer.`
/// prefix (the original OpenAI conversions) are accepted.
pub fn load_tensors(dir: &Path, plan: &ParamPlan) -> Result<Tensors> {
    let files = checkpoint_files(dir)?;
    let mut data: Vec<Option<Vec<f32>>> = vec![None; plan.specs.len()];
    for file in &files {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let st = SafeTensors::deserialize(&bytes).with_context(|| format!("parsing {}", file.display()))?;
        let names: HashMap<String, String> = st
            .names()
            .into_iter()
            .map(|n| (canonical_name(n), n.to_string()))
            .collect();
        for (i, spec) in plan.specs.iter().enumerate() {
            let Some(stored) = names.get(&spec.name) else {
                continue;
            };
            let view = st
                .tensor(stored)
                .with_context(|| format!("{}: tensor {stored:?}", file.display()))?;
            ensure!(
                view.shape() == spec.shape.as_slice(),
                "{}: tensor {:?} has shape {:?}, but config.json implies {:?}",
                file.display(),
                stored,
                view.shape(),
                spec.shape
            );
            let values =
                to_f32(view.dtype(), view.data()).with_context(|| format!("{}: tensor {stored:?}", file.display()))?;
            data[i] = Some(values);
        }
    }
    let mut out = Vec::with_capacity(data.len());
    for (spec, d) in plan.specs.iter().zip(data) {
        match d {
            Some(v) => out.push(v),
            None => bail!(
                "{}: missing tensor {:?} (shape {:?}) required by config.json",
                files
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                spec.name,
                spec.shape
            ),
        }
    }
    Ok(Tensors::from_parts(plan.specs.clone(), out))
}

/// The safetensors files of a checkpoint directory, single file first.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SHARD_INDEX);
    ensure!(
        index.is_file(),
        "{}: neither {SINGLE_FILE} nor {SHARD_INDEX} found",
        dir.display()
    );
    let text = std::fs::read_to_string(&index).with_context(|| format!("reading {}", index.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
    // BTreeMap: each shard once, in a stable order.
    let mut shards = BTreeMap::new();
    for (tensor, file) in map {
        let f = file
            .as_str()
            .with_context(|| format!("{}: weight_map[{tensor:?}] is not a string", index.display()))?;
        ensure!(
            !f.contains('/') && !f.contains('\\'),
            "{}: shard name {f:?} must be a file in the same directory",
            index.display()
        );
        shards.insert(f.to_owned(), ());
    }
    Ok(shards.into_keys().map(|f| dir.join(f)).collect())
}

/// Maps old GPT-2 names (`h.0.attn.c_attn.weight`, `wte.weight`, `ln_f.bias`) to the
/// `transformer.`-prefixed names transformers writes today.
fn canonical_name(stored: &str) -> String {
    let bare = ["wte.", "wpe.", "h.", "ln_f."];
    if bare.iter().any(|p| stored.starts_with(p)) {
        format!("transformer.{stored}")
    } else {
        stored.to_owned()
    }
}

/// Little-endian F32 / BF16 / F16 bytes → f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        d => bail!("stored as {d:?}; only F32, BF16 and F16 weights are supported"),
    })
}
