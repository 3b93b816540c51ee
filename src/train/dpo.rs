//! The DPO trainer: every preference loss of [`crate::ops::prefloss`] (weighted combinations,
//! f-divergence scores, label smoothing) against a frozen reference.
//!
//! A micro-batch of `P` pairs is one `[2P, T]` forward (chosen rows, then rejected rows — TRL's
//! concatenated layout). Per row, the policy log-prob SUM over completion tokens (f64); the
//! reference sums come from a frozen reference engine on the same batch (default), or from a
//! cache computed once ([`RefSource::Cached`]). Reduction (REFERENCE §6): the step loss is the mean
//! of the per-pair losses over the whole window, so each pair's gradient is divided by the
//! window's pair count; the `sft` term uses the window's `P / Σ|y_w|`, so it is the token-mean
//! NLL of the window's chosen completions however the window is split.
//!
//! Metrics (TRL names, means over the window's pairs): `rewards/chosen` (β·r_w),
//! `rewards/rejected`, `rewards/margins`, `rewards/accuracies` (strict `>`), `logps/chosen`,
//! `logps/rejected` (policy sums), `logits/chosen` / `logits/rejected` (TRL's definition: the
//! mean logit over the vocabulary, averaged over that side's completion tokens), and over the
//! chosen completion tokens `entropy` and `mean_token_accuracy`.

use super::config::TrainConfig;
use super::data::{to_model_batch, StepPlan};
use super::engine::{Engine, TokenOutputs};
use super::trainer::{StepOut, Task};
use crate::data::{self, DpoExample, TokenizedSeq};
use crate::fsutil::write_atomic;
use crate::ops::logsoftmax::IGNORE_INDEX;
use crate::ops::prefloss::{pair_loss, Pair, PrefLossConfig};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// One tokenised preference pair.
#[derive(Clone, Debug)]
pub struct PairSeqs {
    /// Prompt + chosen completion.
    pub chosen: TokenizedSeq,
    /// Prompt + rejected completion.
    pub rejected: TokenizedSeq,
}

impl From<&DpoExample> for PairSeqs {
    fn from(e: &DpoExample) -> Self {
        PairSeqs {
            chosen: e.chosen.seq.clone(),
            rejected: e.rejected.seq.clone(),
        }
    }
}

/// Where the reference log-prob sums come from.
pub enum RefSource<E> {
    /// A frozen engine run on every micro-batch.
    Live(E),
    /// Precomputed `(chosen, rejected)` sums, for the train and eval pairs (in their order).
    Cached {
        /// Per training pair.
        train: Vec<(f64, f64)>,
        /// Per eval pair.
        eval: Vec<(f64, f64)>,
    },
}

/// The DPO side of the loop.
pub struct DpoTask<E> {
    loss: PrefLossConfig,
    pad_id: u32,
    batch_size: usize,
    plan: StepPlan,
    train: Vec<PairSeqs>,
    eval: Vec<PairSeqs>,
    reference: RefSource<E>,
}

/// Sums over the pairs of a window (or the eval split).
#[derive(Default)]
struct Sums {
    pairs: u64,
    loss: f64,
    rewards_chosen: f64,
    rewards_rejected: f64,
    accuracies: f64,
    logps_chosen: f64,
    logps_rejected: f64,
    logits_chosen: f64,
    logits_rejected: f64,
    chosen_tokens: u64,
    rejected_tokens: u64,
    entropy: f64,
    correct: u64,
    tokens: u64,
}

impl Sums {
    fn metrics(&self) -> Vec<(&'static str, f64)> {
        let p = self.pairs.max(1) as f64;
        let (c, r) = (self.chosen_tokens.max(1) as f64, self.rejected_tokens.max(1) as f64);
        vec![
            ("rewards/chosen", self.rewards_chosen / p),
            ("rewards/rejected", self.rewards_rejected / p),
            ("rewards/margins", (self.rewards_chosen - self.rewards_rejected) / p),
            ("rewards/accuracies", self.accuracies / p),
            ("logps/chosen", self.logps_chosen / p),
            ("logps/rejected", self.logps_rejected / p),
            ("logits/chosen", self.logits_chosen / c),
            ("logits/rejected", self.logits_rejected / r),
            ("entropy", self.entropy / c),
            ("mean_token_accuracy", self.correct as f64 / c),
        ]
    }
}

impl<E: Engine> DpoTask<E> {
    /// Builds the task.
    pub fn new(
        cfg: &TrainConfig,
        train: Vec<PairSeqs>,
        eval: Vec<PairSeqs>,
        pad_id: u32,
        reference: RefSource<E>,
    ) -> Result<Self> {
        let plan = StepPlan::new(
            train.len(),
            cfg.per_device_batch_size,
            cfg.gradient_accumulation_steps,
            cfg.seed,
        )?;
        if let RefSource::Cached { train: t, eval: e } = &reference {
            ensure!(
                t.len() == train.len() && e.len() == eval.len(),
                "reference cache: {} train / {} eval pairs, the data has {} / {}",
                t.len(),
                e.len(),
                train.len(),
                eval.len()
            );
        }
        Ok(DpoTask {
            loss: cfg.pref_loss()?,
            pad_id,
            batch_size: cfg.per_device_batch_size,
            plan,
            train,
            eval,
            reference,
        })
    }

    /// One micro-batch: forward, per-pair losses, and (with `scale`) the backward of
    /// `Σ_pairs loss · scale`.
    fn micro(
        &mut self,
        engine: &mut E,
        idx: &[usize],
        is_eval: bool,
        sft_scale: f64,
        scale: Option<f64>,
        sums: &mut Sums,
    ) -> Result<()> {
        let set = if is_eval { &self.eval } else { &self.train };
        let seqs: Vec<&TokenizedSeq> = idx
            .iter()
            .map(|&i| &set[i].chosen)
            .chain(idx.iter().map(|&i| &set[i].rejected))
            .collect();
        let db = data::Batch::from_seqs(&seqs, self.pad_id)?;
        let mb = to_model_batch(&db)?;
        let f = engine.forward(&mb)?;
        let policy = row_sums(f.logp(), &db.targets, db.batch_size, db.seq_len);
        let reference: Vec<(f64, f64)> = match &mut self.reference {
            RefSource::Live(r) => {
                let rf = r.forward(&mb)?;
                let s = row_sums(rf.logp(), &db.targets, db.batch_size, db.seq_len);
                let p = idx.len();
                (0..p).map(|k| (s[k], s[p + k])).collect()
            }
            RefSource::Cached { train, eval } => {
                let c = if is_eval { &*eval } else { &*train };
                idx.iter().map(|&i| c[i]).collect()
            }
        };
        let (p, t) = (idx.len(), db.seq_len);
        let beta = self.loss.beta;
        let mut dlogp = vec![0f32; db.batch_size * t];
        for k in 0..p {
            let pair = Pair {
                policy_chosen: policy[k],
                policy_rejected: policy[p + k],
                ref_chosen: reference[k].0,
                ref_rejected: reference[k].1,
                chosen_count: db.n_targets[k] as i32,
                rejected_count: db.n_targets[p + k] as i32,
            };
            let l = pair_loss(&self.loss, &pair, sft_scale);
            let (rc, rr) = (
                beta * (pair.policy_chosen - pair.ref_chosen),
                beta * (pair.policy_rejected - pair.ref_rejected),
            );
            sums.loss += l.loss;
            sums.rewards_chosen += rc;
            sums.rewards_rejected += rr;
            sums.accuracies += f64::from(u8::from(rc > rr));
            sums.logps_chosen += pair.policy_chosen;
            sums.logps_rejected += pair.policy_rejected;
            if let Some(s) = scale {
                for (row, d) in [(k, l.dpolicy_chosen), (p + k, l.dpolicy_rejected)] {
                    let g = (d * s) as f32;
                    for j in 0..t {
                        if db.targets[row * t + j] != IGNORE_INDEX {
                            dlogp[row * t + j] = g;
                        }
                    }
                }
            }
        }
        let (lm, ent, am) = (f.logit_mean(), f.entropy(), f.argmax());
        for row in 0..2 * p {
            for j in 0..t {
                let i = row * t + j;
                if db.targets[i] == IGNORE_INDEX {
                    continue;
                }
                if row < p {
                    sums.logits_chosen += lm[i] as f64;
                    sums.chosen_tokens += 1;
                    sums.entropy += ent[i] as f64;
                    sums.correct += u64::from(i64::from(am[i]) == db.targets[i]);
                } else {
                    sums.logits_rejected += lm[i] as f64;
                    sums.rejected_tokens += 1;
                }
            }
        }
        sums.pairs += p as u64;
        sums.tokens += db.lengths.iter().sum::<usize>() as u64;
        if scale.is_some() {
            engine.backward(&f, &dlogp)?;
        }
        Ok(())
    }
}

/// Per-row sums (f64) of `logp` over positions with a target.
fn row_sums(logp: &[f32], targets: &[i64], b: usize, t: usize) -> Vec<f64> {
    (0..b)
        .map(|r| {
            (0..t)
                .filter(|&j| targets[r * t + j] != IGNORE_INDEX)
                .map(|j| logp[r * t + j] as f64)
                .sum()
        })
        .collect()
}

/// `P / max(Σ|y_w|, 1)` over a set of pairs (the `sft` term's window factor).
fn window_sft_scale(pairs: &[&PairSeqs]) -> f64 {
    let total: usize = pairs.iter().map(|p| p.chosen.n_completion()).sum();
    pairs.len() as f64 / total.max(1) as f64
}

impl<E: Engine> Task<E> for DpoTask<E> {
    fn plan(&self) -> StepPlan {
        self.plan
    }

    fn train_window(&mut self, engine: &mut E, window: &[Vec<usize>]) -> Result<StepOut> {
        let all: Vec<&PairSeqs> = window.iter().flatten().map(|&i| &self.train[i]).collect();
        ensure!(!all.is_empty(), "the window has no pairs");
        let sft_scale = window_sft_scale(&all);
        let scale = 1.0 / all.len() as f64;
        let mut sums = Sums::default();
        for micro in window {
            self.micro(engine, micro, false, sft_scale, Some(scale), &mut sums)?;
        }
        Ok(StepOut {
            loss: sums.loss * scale,
            metrics: sums.metrics(),
            tokens: sums.tokens,
        })
    }

    fn has_eval(&self) -> bool {
        !self.eval.is_empty()
    }

    fn evaluate(&mut self, engine: &mut E) -> Result<Vec<(String, f64)>> {
        let idx: Vec<usize> = (0..self.eval.len()).collect();
        let all: Vec<&PairSeqs> = self.eval.iter().collect();
        let sft_scale = window_sft_scale(&all);
        let mut sums = Sums::default();
        for chunk in idx.chunks(self.batch_size) {
            self.micro(engine, chunk, true, sft_scale, None, &mut sums)?;
        }
        let mut out = vec![("loss".to_string(), sums.loss / sums.pairs.max(1) as f64)];
        out.extend(sums.metrics().into_iter().map(|(k, v)| (k.to_string(), v)));
        Ok(out)
    }
}

/// The reference-log-prob cache file: `output_dir/ref_logps-<hash>.json`, the hash covering the
/// reference model's files, the data files and `max_length`, so a cache is only reused for the
/// exact same inputs (e.g. on resume). Sums are stored as f64 bit patterns (exact).
#[derive(Serialize, Deserialize)]
struct RefCacheFile {
    key: String,
    train: Vec<(u64, u64)>,
    eval: Vec<(u64, u64)>,
}

/// The cache key: SHA-256 over the reference model's `config.json` and weight files, the data
/// files and `max_length`.
pub fn ref_cache_key(ref_model: &Path, data_files: &[&Path], max_length: usize) -> Result<String> {
    let mut h = Sha256::new();
    h.update(b"irbridge ref_logps v1\0");
    let mut files: Vec<PathBuf> = std::fs::read_dir(ref_model)
        .with_context(|| format!("listing {}", ref_model.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let n = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            n == "config.json" || n.ends_with(".safetensors") || n.ends_with(".safetensors.index.json")
        })
        .collect();
    files.sort();
    for p in files.iter().map(PathBuf::as_path).chain(data_files.iter().copied()) {
        let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
        h.update(
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    h.update((max_length as u64).to_le_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Reference (chosen, rejected) sequence log-probs, one entry per pair.
pub type RefLogps = Vec<(f64, f64)>;

/// Loads the cached reference sums for `key` from `out`, or computes them with `reference`
/// (one pass, dataset order, `batch_size` pairs at a time) and writes the cache.
/// Returns the train and eval reference log-probs and whether they came from the cache.
pub fn cached_reference<E: Engine>(
    reference: &mut E,
    out: &Path,
    key: &str,
    train: &[PairSeqs],
    eval: &[PairSeqs],
    batch_size: usize,
    pad_id: u32,
) -> Result<(RefLogps, RefLogps, bool)> {
    let path = out.join(format!("ref_logps-{}.json", &key[..16]));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let f: RefCacheFile =
            serde_json::from_str(&text).with_context(|| format!("{}: corrupt cache", path.display()))?;
        if f.key == key && f.train.len() == train.len() && f.eval.len() == eval.len() {
            let un = |v: Vec<(u64, u64)>| {
                v.into_iter()
                    .map(|(a, b)| (f64::from_bits(a), f64::from_bits(b)))
                    .collect()
            };
            return Ok((un(f.train), un(f.eval), true));
        }
    }
    let mut sums_of = |set: &[PairSeqs]| -> Result<Vec<(f64, f64)>> {
        let mut v = Vec::with_capacity(set.len());
        for chunk in set.chunks(batch_size) {
            let seqs: Vec<&TokenizedSeq> = chunk
                .iter()
                .map(|p| &p.chosen)
                .chain(chunk.iter().map(|p| &p.rejected))
                .collect();
            let db = data::Batch::from_seqs(&seqs, pad_id)?;
            let f = reference.forward(&to_model_batch(&db)?)?;
            let s = row_sums(f.logp(), &db.targets, db.batch_size, db.seq_len);
            let p = chunk.len();
            v.extend((0..p).map(|k| (s[k], s[p + k])));
        }
        Ok(v)
    };
    let (t, e) = (sums_of(train)?, sums_of(eval)?);
    let bits = |v: &[(f64, f64)]| v.iter().map(|(a, b)| (a.to_bits(), b.to_bits())).collect();
    let file = RefCacheFile {
        key: key.to_string(),
        train: bits(&t),
        eval: bits(&e),
    };
    write_atomic(&path, serde_json::to_string(&file)?.as_bytes())?;
    Ok((t, e, false))
}
