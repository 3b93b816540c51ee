//! Between the data layer and the model: the one bridge from [`data::Batch`] to
//! [`model::Batch`], the train/eval split, and the seeded data order.
//!
//! Data order: epoch `e` visits the training examples in the permutation
//! [`epoch_order`]`(seed, e, n)` (Fisher–Yates driven by SplitMix64 — no dependency on a
//! platform RNG), cut into micro-batches of `per_device_batch_size` (the last one may be
//! smaller), grouped into optimizer steps of `gradient_accumulation_steps` micro-batches (the
//! last window of an epoch may be shorter). Everything is a pure function of (seed, step), so a
//! resumed run knows its position from the step count alone.

use crate::data;
use crate::model;
use anyhow::{ensure, Result};

/// The model's view of a padded data batch: ids, lengths, next-token targets.
pub fn to_model_batch(b: &data::Batch) -> Result<model::Batch> {
    let ids: Vec<i64> = b.input_ids.iter().map(|&x| i64::from(x)).collect();
    model::Batch::new(&ids, b.batch_size, b.seq_len, &b.lengths, &b.targets)
}

/// SplitMix64: tiny, seedable, and the same on every platform.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n ≥ 1), by rejection so there is no modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - u64::MAX % n;
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }
}

/// A seeded permutation of `0..n`.
pub fn permutation(seed: u64, n: usize) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed);
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

/// The order of epoch `epoch`: a permutation seeded by `(seed, epoch)`.
pub fn epoch_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    permutation(seed ^ epoch.wrapping_mul(0xD1B5_4A32_D192_ED03).wrapping_add(1), n)
}

/// Splits `0..n` into (train, eval) index lists: a seeded `ceil(fraction·n)` examples go to
/// eval, both lists keep the input order.
pub fn split_eval(seed: u64, n: usize, fraction: f64) -> (Vec<usize>, Vec<usize>) {
    let k = ((fraction * n as f64).ceil() as usize).min(n);
    let perm = permutation(seed ^ 0x5EED_E7A1, n);
    let mut is_eval = vec![false; n];
    perm[..k].iter().for_each(|&i| is_eval[i] = true);
    (0..n).partition(|&i| !is_eval[i])
}

/// How steps map onto examples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepPlan {
    /// Training examples (sequences or pairs).
    pub n_examples: usize,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Seed of the order.
    pub seed: u64,
}

impl StepPlan {
    /// Checks there is something to train on.
    pub fn new(n_examples: usize, batch_size: usize, grad_accum: usize, seed: u64) -> Result<Self> {
        ensure!(
            n_examples > 0,
            "no training examples left after tokenisation (see the data report)"
        );
        Ok(StepPlan {
            n_examples,
            batch_size,
            grad_accum,
            seed,
        })
    }

    /// Micro-batches per epoch.
    pub fn micro_per_epoch(&self) -> usize {
        self.n_examples.div_ceil(self.batch_size)
    }

    /// Optimizer steps per epoch (the last window may be short).
    pub fn steps_per_epoch(&self) -> u64 {
        self.micro_per_epoch().div_ceil(self.grad_accum) as u64
    }

    /// Total steps: `max_steps`, or `ceil(num_epochs · steps_per_epoch)`.
    pub fn total_steps(&self, max_steps: Option<u64>, num_epochs: f64) -> u64 {
        max_steps.unwrap_or_else(|| ((num_epochs * self.steps_per_epoch() as f64).ceil() as u64).max(1))
    }

    /// The micro-batches (example indices) of global step `step` (0-based).
    pub fn window(&self, step: u64) -> Vec<Vec<usize>> {
        let spe = self.steps_per_epoch();
        let (epoch, k) = (step / spe, (step % spe) as usize);
        let order = epoch_order(self.seed, epoch, self.n_examples);
        let micro: Vec<&[usize]> = order.chunks(self.batch_size).collect();
        let start = k * self.grad_accum;
        let end = (start + self.grad_accum).min(micro.len());
        micro[start..end].iter().map(|m| m.to_vec()).collect()
    }

    /// Fractional epoch after `steps` completed steps (as transformers logs it).
    pub fn epoch_at(&self, steps: u64) -> f64 {
        steps as f64 / self.steps_per_epoch() as f64
    }
}
