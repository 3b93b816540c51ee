//! Sampling from a model with a KV cache: temperature, nucleus (top-p), a token budget and a seed.
//!
//! Every prompt draws from its own ChaCha stream (`seed`, stream = prompt index), so a prompt's
//! sample depends on the seed and its index only, not on which other prompts share the batch.
//! Besides the tokens, each sample carries `log π(y_t | ·)` of every generated token under the
//! model's *untempered* distribution: what a sample-based KL estimate or an implicit-reward
//! analysis needs, with no second forward pass.

use crate::model::{KvCache, Model};
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingOptions {
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Nucleus sampling: draw from the smallest set of tokens whose probability reaches `top_p`
    /// (1 disables it).
    pub top_p: f32,
    /// Tokens to generate at most per prompt (the stop token included).
    pub max_new_tokens: usize,
    /// Seed of the per-prompt random streams.
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions {
            temperature: 1.0,
            top_p: 1.0,
            max_new_tokens: 64,
            seed: 0,
        }
    }
}

impl SamplingOptions {
    /// Rejects settings that cannot sample, naming the option.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.temperature.is_finite() && self.temperature >= 0.0,
            "temperature: {} must be a finite number ≥ 0",
            self.temperature
        );
        ensure!(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p: {} must be in (0, 1]",
            self.top_p
        );
        ensure!(self.max_new_tokens > 0, "max_new_tokens: must be at least 1");
        Ok(())
    }
}

/// One sampled continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Generated token ids (ending with the stop token when `stopped`).
    pub tokens: Vec<u32>,
    /// `log π(token)` of each generated token under the untempered model distribution.
    pub logps: Vec<f32>,
    /// Whether generation ended on a stop token (rather than on the token budget).
    pub stopped: bool,
}

impl Sample {
    /// `Σ log π(y_t)` over the generated tokens (f64).
    pub fn logp(&self) -> f64 {
        self.logps.iter().map(|&x| x as f64).sum()
    }
}

/// What sampling needs from a model on some device: a KV cache, and an incremental forward that
/// appends tokens to it and hands back the next-token logits on the host.
pub trait Decoder {
    /// The per-layer key/value store for a batch of sequences.
    type Cache;
    /// Logits per row.
    fn vocab_size(&self) -> usize;
    /// An empty cache for `batch` sequences of up to `capacity` tokens each.
    fn new_cache(&self, batch: usize, capacity: usize) -> Result<Self::Cache>;
    /// Appends `tokens[b]` to sequence `b` (empty: unchanged); returns `[n, V]` logits, one row
    /// per sequence that received tokens, predicting the token after its last new one.
    fn extend(&self, cache: &mut Self::Cache, tokens: &[&[u32]]) -> Result<Vec<f32>>;
}

impl Decoder for Model {
    type Cache = KvCache;
    fn vocab_size(&self) -> usize {
        self.config().vocab_size
    }
    fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        self.new_kv_cache(batch, capacity)
    }
    fn extend(&self, cache: &mut KvCache, tokens: &[&[u32]]) -> Result<Vec<f32>> {
        Model::extend(self, cache, tokens)
    }
}

/// Samples a continuation of every prompt (all at once, one KV cache), stopping each at the first
/// token in `stop` or after `max_new_tokens`.
pub fn generate<D: Decoder>(
    model: &D,
    prompts: &[Vec<u32>],
    stop: &[u32],
    opts: &SamplingOptions,
) -> Result<Vec<Sample>> {
    opts.validate()?;
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        anyhow::bail!("prompt {i} is empty: generation needs at least one token to condition on");
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut cache = model.new_cache(prompts.len(), longest + opts.max_new_tokens)?;
    let vocab = model.vocab_size();
    let mut rngs: Vec<ChaCha8Rng> = (0..prompts.len())
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(opts.seed);
            r.set_stream(i as u64);
            r
        })
        .collect();
    let mut out = vec![
        Sample {
            tokens: Vec::new(),
            logps: Vec::new(),
            stopped: false,
        };
        prompts.len()
    ];
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    let mut probs = Vec::with_capacity(vocab);
    for _ in 0..opts.max_new_tokens {
        let active: Vec<usize> = (0..prompts.len()).filter(|&i| !feed[i].is_empty()).collect();
        if active.is_empty() {
            break;
        }
        let views: Vec<&[u32]> = feed.iter().map(Vec::as_slice).collect();
        let logits = model.extend(&mut cache, &views)?;
        for (row, &i) in logits.chunks_exact(vocab).zip(&active) {
            let (token, logp) = pick(row, opts, &mut rngs[i], &mut probs);
            let s = &mut out[i];
            s.tokens.push(token);
            s.logps.push(logp);
            s.stopped = stop.contains(&token);
            feed[i] = if s.stopped { Vec::new() } else { vec![token] };
        }
    }
    Ok(out)
}

/// Draws one token from a row of logits; returns it with its untempered log-probability.
fn pick(logits: &[f32], opts: &SamplingOptions, rng: &mut ChaCha8Rng, probs: &mut Vec<(u32, f64)>) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + logits.iter().map(|&x| (x as f64 - max).exp()).sum::<f64>().ln();
    let logp = |t: u32| (logits[t as usize] as f64 - lse) as f32;
    if opts.temperature == 0.0 {
        // First index of the maximum, as torch.argmax.
        let t = logits.iter().position(|&x| x as f64 == max).unwrap_or(0) as u32;
        return (t, logp(t));
    }
    let inv_t = 1.0 / opts.temperature as f64;
    probs.clear();
    probs.extend(
        logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x as f64 - max) * inv_t).exp())),
    );
    if opts.top_p < 1.0 {
        // Most likely first (ties by id, so the order is deterministic), then cut the tail.
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let total: f64 = probs.iter().map(|p| p.1).sum();
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                acc += p.1;
                acc >= opts.top_p as f64 * total
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.gen::<f64>() * total;
    for &(t, p) in probs.iter() {
        if u < p {
            return (t, logp(t));
        }
        u -= p;
    }
    // Rounding left u at the very end of the mass: the last kept token.
    let t = probs.last().map_or(0, |p| p.0);
    (t, logp(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_p_keeps_the_smallest_nucleus() {
        // p ∝ (0.5, 0.3, 0.15, 0.05): top_p 0.7 keeps tokens 0 and 1 only.
        let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let opts = SamplingOptions {
            top_p: 0.7,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut probs = Vec::new();
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            let (t, lp) = pick(&logits, &opts, &mut rng, &mut probs);
            seen[t as usize] += 1;
            assert!((lp - logits[t as usize]).abs() < 1e-6, "log-prob is untempered");
        }
        assert_eq!(seen[2] + seen[3], 0, "{seen:?}");
        let frac0 = seen[0] as f64 / 2000.0;
        assert!((frac0 - 0.625).abs() < 0.04, "renormalised 0.5/0.8, got {frac0}");
    }

    #[test]
    fn greedy_and_bad_options() {
        let logits = [1.0f32, 3.0, 3.0, -2.0];
        let opts = SamplingOptions {
            temperature: 0.0,
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(pick(&logits, &opts, &mut rng, &mut Vec::new()).0, 1);
        for bad in [
            SamplingOptions {
                temperature: -1.0,
                ..opts
            },
            SamplingOptions { top_p: 0.0, ..opts },
            SamplingOptions {
                max_new_tokens: 0,
                ..opts
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
