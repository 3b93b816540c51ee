//! Evaluating a policy of the study by sampling from it, where the true reward is known.
//!
//! - mean `r*` of samples (temperature 1, no nucleus: the policy's own distribution), and the
//!   fraction with a grammar error;
//! - `KL(π ‖ π_base) ≈ mean over samples of log π(y|x) − log π_base(y|x)` (sequence level, the
//!   Monte-Carlo estimate of the DPO paper's frontier plots; unbiased because y ~ π);
//! - win rate against another policy: sample `i` of each answers the same prompt, the higher
//!   `r*` wins, ties count one half;
//! - the implicit-reward ranking accuracy on held-out pairs ([`crate::analyze::ranking_accuracy`]).
//!
//! Sampling runs on the study's device: on CUDA each policy is uploaded in f32 and sampled with
//! the CUDA engine's KV cache (the same seeded sampler, so the samples are the CPU's up to f32
//! round-off in the logits). The scoring — the base model's log-probs of the samples for the KL
//! and the held-out pair scores — stays on the CPU engine: it is a few forwards of a small model,
//! and it keeps the KL's reference side and the ranking scores computed identically on every
//! device. The policy side of the KL is the sampler's own `log π(y)` (f32 on either device).

use super::task;
use crate::data::{read_records, tokenize_dpo, DpoExample, TokenizeOptions, TokenizedSeq, Tokenizer};
use crate::generate::{generate, SamplingOptions};
use crate::model::cuda::{CudaModel, Precision};
use crate::model::Model;
use crate::score::{score_pairs, score_sequences, SeqScore};
use crate::train::CpuEngine;
use crate::Device;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// Sequences per forward pass when scoring.
const SCORE_BATCH: usize = 64;

/// What sampling from one policy measured.
#[derive(Clone, Debug, Serialize)]
pub struct PolicyEval {
    /// Mean true reward of the samples.
    pub reward: f64,
    /// `KL(π ‖ π_base)` estimate (nats per response).
    pub kl: f64,
    /// Fraction of samples with at least one grammar error.
    pub error_rate: f64,
    /// Mean generated tokens (with `<eos>`).
    pub tokens: f64,
    /// `r*` of each sample, in prompt order (for win rates).
    #[serde(skip)]
    pub rewards: Vec<f64>,
}

/// Fraction of prompts where `a`'s sample beats `b`'s under `r*` (ties ½).
pub fn win_rate(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len()).max(1);
    let wins: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| match x.partial_cmp(y) {
            Some(std::cmp::Ordering::Greater) => 1.0,
            Some(std::cmp::Ordering::Equal) => 0.5,
            _ => 0.0,
        })
        .sum();
    wins / n as f64
}

/// Chosen/rejected completion log-probs of each held-out pair.
pub type PairScores = Vec<(SeqScore, SeqScore)>;

/// The fixed parts of an evaluation: the tokenizer, the base model, the prompts, the two
/// held-out pair sets (`[mixed, base-only]`, see [`super::data::DataFiles`]) and their base
/// scores.
pub struct Evaluator {
    tok: Tokenizer,
    base: CpuEngine,
    topics: Vec<usize>,
    prompts: Vec<Vec<u32>>,
    heldout: [Vec<DpoExample>; 2],
    base_pairs: [PairScores; 2],
    sampling: SamplingOptions,
    device: Device,
    eos: u32,
    pad: u32,
}

impl Evaluator {
    /// Loads the base model and tokenizer from `base_dir` and the held-out pair files
    /// `[mixed, base-only]`; `samples_per_topic` prompts per topic, sampled with `seed` on
    /// `device` (see the module docs for what runs where).
    pub fn new(
        base_dir: &Path,
        heldout: [&Path; 2],
        samples_per_topic: usize,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let tok = Tokenizer::from_dir(base_dir)?;
        let mut base = CpuEngine::load(base_dir)?;
        let eos = tok.eos().context("the study tokenizer has no eos token")?.id;
        let pad = tok.pad_id()?;
        let topics: Vec<usize> = (0..samples_per_topic * task::TOPICS.len())
            .map(|i| i % task::TOPICS.len())
            .collect();
        let prompts = topics
            .iter()
            .map(|&t| tok.encode(&task::prompt(t)))
            .collect::<Result<Vec<_>>>()?;
        let opts = TokenizeOptions {
            max_length: super::pipeline::MAX_LENGTH,
            ..Default::default()
        };
        let load = |p: &Path| -> Result<Vec<DpoExample>> {
            Ok(tokenize_dpo(&read_records(p)?, &tok, &opts)?.kept().cloned().collect())
        };
        let heldout = [load(heldout[0])?, load(heldout[1])?];
        let base_pairs = [
            scores_of(&mut base, &heldout[0], pad)?,
            scores_of(&mut base, &heldout[1], pad)?,
        ];
        Ok(Evaluator {
            tok,
            base,
            topics,
            prompts,
            heldout,
            base_pairs,
            sampling: SamplingOptions {
                temperature: 1.0,
                top_p: 1.0,
                max_new_tokens: task::MAX_RESPONSE_TOKENS + 4,
                seed,
            },
            device,
            eos,
            pad,
        })
    }

    /// The base model.
    pub fn base(&self) -> &Model {
        self.base.model()
    }

    /// The held-out pairs from the training mixture.
    pub fn heldout(&self) -> &[DpoExample] {
        &self.heldout[0]
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tok
    }

    /// Scores of both held-out pair sets `[mixed, base-only]` under `model`.
    pub fn pair_scores(&self, model: &mut CpuEngine) -> Result<[PairScores; 2]> {
        Ok([
            scores_of(model, &self.heldout[0], self.pad)?,
            scores_of(model, &self.heldout[1], self.pad)?,
        ])
    }

    /// Both held-out sets' scores under the base model.
    pub fn base_pair_scores(&self) -> &[PairScores; 2] {
        &self.base_pairs
    }

    /// Samples from `policy` on the evaluator's device and measures it (KL against the base
    /// model, scored on the CPU).
    pub fn policy(&mut self, policy: &Model) -> Result<PolicyEval> {
        let stop = [self.eos];
        let samples = match self.device {
            Device::Cpu => generate(policy, &self.prompts, &stop, &self.sampling)?,
            Device::Cuda(n) => {
                let gpu = CudaModel::new(policy, n, Precision::F32).context("uploading the policy to sample it")?;
                generate(&gpu, &self.prompts, &stop, &self.sampling)?
            }
        };
        let mut rewards = Vec::with_capacity(samples.len());
        let (mut errors, mut tokens) = (0usize, 0usize);
        let mut seqs = Vec::with_capacity(samples.len());
        for ((s, &topic), prompt) in samples.iter().zip(&self.topics).zip(&self.prompts) {
            let words: Vec<String> = s
                .tokens
                .iter()
                .map(|&id| self.tok.id_to_token(id).unwrap_or_default())
                .collect();
            let refs: Vec<&str> = words.iter().map(String::as_str).collect();
            let r = task::reward(topic, &refs);
            rewards.push(r.total);
            errors += usize::from(r.errors > 0);
            tokens += s.tokens.len();
            seqs.push(TokenizedSeq {
                input_ids: prompt.iter().chain(&s.tokens).copied().collect(),
                completion_mask: std::iter::repeat_n(0, prompt.len())
                    .chain(std::iter::repeat_n(1, s.tokens.len()))
                    .collect(),
            });
        }
        let refs: Vec<&TokenizedSeq> = seqs.iter().collect();
        let base = score_sequences(&mut self.base, &refs, self.pad, SCORE_BATCH, &mut |_| {})?;
        let n = samples.len() as f64;
        let kl = samples.iter().zip(&base).map(|(s, b)| s.logp() - b.logp).sum::<f64>() / n;
        Ok(PolicyEval {
            reward: rewards.iter().sum::<f64>() / n,
            kl,
            error_rate: errors as f64 / n,
            tokens: tokens as f64 / n,
            rewards,
        })
    }
}

fn scores_of(model: &mut CpuEngine, pairs: &[DpoExample], pad: u32) -> Result<PairScores> {
    let refs: Vec<&DpoExample> = pairs.iter().collect();
    score_pairs(model, &refs, pad, SCORE_BATCH, &mut |_| {})
}

#[cfg(test)]
mod tests {
    use super::win_rate;

    #[test]
    fn win_rate_counts_ties_half() {
        assert_eq!(
            win_rate(&[1.0, 2.0, 3.0, 0.0], &[0.0, 2.0, 4.0, -1.0]),
            (1.0 + 0.5 + 0.0 + 1.0) / 4.0
        );
        assert_eq!(win_rate(&[1.0], &[1.0]), 0.5);
    }
}
