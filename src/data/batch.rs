//! Right-padded batches with next-token targets.
//!
//! Layout is row-major `[B, T]`, `T` = the longest sequence. Padding uses the pad id (EOS when the
//! tokenizer has no pad token); every mask comes from the lengths, never from comparing ids with
//! the pad id, because EOS is a real, trained token. Targets are aligned for next-token
//! prediction: `targets[b,t] = ids[b,t+1]` where `completion_mask[b,t+1] == 1`, else
//! [`IGNORE_INDEX`] (−100), so the last column and all padding are ignored and a final EOS is
//! trained even when pad == eos.
//!
//! A DPO batch of `P` pairs has `B = 2P` rows: the `P` chosen sequences first, then the `P`
//! rejected ones in the same order (row `p` and row `P + p` are one pair), which is TRL's
//! `concatenated_forward` layout.

use super::tokenize::{DpoExample, TokenizedSeq};
use crate::ops::logsoftmax::IGNORE_INDEX;
use anyhow::{ensure, Result};

/// A padded batch; every `[B, T]` field is row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Rows `B`.
    pub batch_size: usize,
    /// Padded length `T`.
    pub seq_len: usize,
    /// `[B, T]` token ids, right-padded with the pad id.
    pub input_ids: Vec<u32>,
    /// `[B, T]` 1 for real tokens, 0 for padding (from the lengths).
    pub attention_mask: Vec<u8>,
    /// `[B, T]` completion mask, 0 on padding.
    pub completion_mask: Vec<u8>,
    /// `[B, T]` next-token targets or −100.
    pub targets: Vec<i64>,
    /// `[B]` real tokens per row.
    pub lengths: Vec<usize>,
    /// `[B]` trained tokens per row (targets that are not −100).
    pub n_targets: Vec<usize>,
}

impl Batch {
    /// Pads `seqs` into one batch. Errors on an empty list, an empty sequence, or a mask whose
    /// length differs from its ids.
    pub fn from_seqs(seqs: &[&TokenizedSeq], pad_id: u32) -> Result<Self> {
        ensure!(!seqs.is_empty(), "batch: no sequences");
        for (i, s) in seqs.iter().enumerate() {
            ensure!(!s.is_empty(), "batch: sequence {i} is empty");
            ensure!(
                s.completion_mask.len() == s.input_ids.len(),
                "batch: sequence {i}: completion_mask has {} entries, input_ids {}",
                s.completion_mask.len(),
                s.input_ids.len()
            );
        }
        let b = seqs.len();
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut batch = Batch {
            batch_size: b,
            seq_len: t,
            input_ids: vec![pad_id; b * t],
            attention_mask: vec![0; b * t],
            completion_mask: vec![0; b * t],
            targets: vec![IGNORE_INDEX; b * t],
            lengths: Vec::with_capacity(b),
            n_targets: Vec::with_capacity(b),
        };
        for (row, s) in seqs.iter().enumerate() {
            let base = row * t;
            let n = s.len();
            batch.input_ids[base..base + n].copy_from_slice(&s.input_ids);
            batch.attention_mask[base..base + n].fill(1);
            batch.completion_mask[base..base + n].copy_from_slice(&s.completion_mask);
            let mut trained = 0;
            for pos in 0..n - 1 {
                if s.completion_mask[pos + 1] == 1 {
                    batch.targets[base + pos] = i64::from(s.input_ids[pos + 1]);
                    trained += 1;
                }
            }
            batch.lengths.push(n);
            batch.n_targets.push(trained);
        }
        Ok(batch)
    }

    /// Pads DPO pairs: chosen rows `0..P`, then rejected rows `P..2P` in the same order.
    pub fn from_pairs(pairs: &[&DpoExample], pad_id: u32) -> Result<Self> {
        ensure!(!pairs.is_empty(), "batch: no pairs");
        let seqs: Vec<&TokenizedSeq> = pairs
            .iter()
            .map(|p| &p.chosen.seq)
            .chain(pairs.iter().map(|p| &p.rejected.seq))
            .collect();
        Self::from_seqs(&seqs, pad_id)
    }

    /// Total trained tokens in the batch.
    pub fn total_targets(&self) -> usize {
        self.n_targets.iter().sum()
    }
}
