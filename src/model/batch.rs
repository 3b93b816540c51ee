//! A right-padded token batch and its packed form.
//!
//! Callers hand `[B, T]` ids with per-row lengths (right padding, positions `0..len−1`) and a
//! `[B, T]` target array (`targets[b,t]` is the id predicted at position `t`, or
//! [`IGNORE_INDEX`]). Backends never compute padding: they work on the packed rows (the valid
//! tokens of every sequence laid end to end), which [`Packing`] describes.

use crate::ops::logsoftmax::IGNORE_INDEX;
use anyhow::{ensure, Result};

/// Token ids, lengths and next-token targets of one micro-batch.
#[derive(Clone, Debug)]
pub struct Batch {
    ids: Vec<u32>,
    batch: usize,
    seq: usize,
    lengths: Vec<usize>,
    targets: Vec<i64>,
}

impl Batch {
    /// Validates and wraps a batch. `ids` and `targets` are `[batch, seq]` row-major;
    /// `lengths[b] ≤ seq`; a target at a padded position (`t ≥ lengths[b]`) is an error, since the
    /// model has no prediction there.
    pub fn new(ids: &[i64], batch: usize, seq: usize, lengths: &[usize], targets: &[i64]) -> Result<Self> {
        ensure!(
            ids.len() == batch * seq,
            "input_ids: expected {batch}×{seq} = {} entries, got {}",
            batch * seq,
            ids.len()
        );
        ensure!(
            targets.len() == batch * seq,
            "targets: expected {batch}×{seq} = {} entries, got {}",
            batch * seq,
            targets.len()
        );
        ensure!(
            lengths.len() == batch,
            "lengths: expected {batch} entries, got {}",
            lengths.len()
        );
        if let Some((b, &l)) = lengths.iter().enumerate().find(|(_, &l)| l > seq) {
            anyhow::bail!("lengths[{b}] = {l} exceeds the padded length {seq}");
        }
        let mut out = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            let (b, t) = (i / seq.max(1), i % seq.max(1));
            if t < lengths[b] {
                ensure!(
                    (0..=u32::MAX as i64).contains(&id),
                    "input_ids[{b},{t}] = {id} is not a token id"
                );
                out.push(id as u32);
            } else {
                // Padding is never read; keep whatever id the caller used, clamped to be valid.
                out.push(0);
            }
            let tg = targets[i];
            ensure!(
                tg == IGNORE_INDEX || tg >= 0,
                "targets[{b},{t}] = {tg} is negative and not the ignore index {IGNORE_INDEX}"
            );
            ensure!(
                tg == IGNORE_INDEX || t < lengths[b],
                "targets[{b},{t}] = {tg}: only positions t < lengths[{b}] = {} may have a target (others must be {IGNORE_INDEX})",
                lengths[b]
            );
        }
        Ok(Self {
            ids: out,
            batch,
            seq,
            lengths: lengths.to_vec(),
            targets: targets.to_vec(),
        })
    }

    /// A batch whose targets are every next token of each row: `targets[b,t] = ids[b,t+1]` for
    /// `t + 1 < lengths[b]` (the plain language-modelling objective).
    pub fn causal_lm(ids: &[i64], batch: usize, seq: usize, lengths: &[usize]) -> Result<Self> {
        ensure!(
            lengths.len() == batch,
            "lengths: expected {batch} entries, got {}",
            lengths.len()
        );
        ensure!(
            ids.len() == batch * seq,
            "input_ids: expected {batch}×{seq} = {} entries, got {}",
            batch * seq,
            ids.len()
        );
        let mut targets = vec![IGNORE_INDEX; batch * seq];
        for (b, &len) in lengths.iter().enumerate() {
            for t in 0..len.min(seq).saturating_sub(1) {
                targets[b * seq + t] = ids[b * seq + t + 1];
            }
        }
        Self::new(ids, batch, seq, lengths, &targets)
    }

    /// Lengths from a right-padded attention mask (`[batch, seq]`, 1 = token, 0 = pad); a mask
    /// with a 1 after a 0 is rejected (left or inner padding is not supported).
    pub fn lengths_from_mask(mask: &[i64], batch: usize, seq: usize) -> Result<Vec<usize>> {
        ensure!(
            mask.len() == batch * seq,
            "attention_mask: expected {batch}×{seq} = {} entries, got {}",
            batch * seq,
            mask.len()
        );
        (0..batch)
            .map(|b| {
                let row = &mask[b * seq..(b + 1) * seq];
                let len = row.iter().take_while(|&&m| m != 0).count();
                ensure!(
                    row[len..].iter().all(|&m| m == 0),
                    "attention_mask row {b} is not right-padded (a 1 follows a 0)"
                );
                Ok(len)
            })
            .collect()
    }

    /// Number of rows `B`.
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// Padded length `T`.
    pub fn seq(&self) -> usize {
        self.seq
    }
    /// Per-row token counts.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }
    /// `[B, T]` ids (0 at padded positions).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
    /// `[B, T]` targets, [`IGNORE_INDEX`] where there is none.
    pub fn targets(&self) -> &[i64] {
        &self.targets
    }
    /// Longest row.
    pub fn max_len(&self) -> usize {
        self.lengths.iter().copied().max().unwrap_or(0)
    }
}

/// The packed layout of a [`Batch`]: valid tokens of row `b` occupy packed rows
/// `offsets[b] .. offsets[b] + lengths[b]`.
#[derive(Clone, Debug, Default)]
pub struct Packing {
    /// Packed start of each batch row; `offsets[B]` = total tokens.
    pub offsets: Vec<usize>,
    /// Per packed row: its position in the sequence (`0..len−1`).
    pub pos: Vec<usize>,
    /// Per packed row: the token id.
    pub ids: Vec<u32>,
    /// Per packed row: first packed row of its sequence.
    pub seq_start: Vec<usize>,
    /// Per packed row: one past the last packed row of its sequence.
    pub seq_end: Vec<usize>,
    /// Packed rows that have a target, in order.
    pub target_rows: Vec<usize>,
    /// The target of each of `target_rows`.
    pub targets: Vec<i64>,
    /// For each of `target_rows`: its index `b·T + t` in the padded layout.
    pub padded_index: Vec<usize>,
}

impl Packing {
    /// Packs a batch.
    pub fn new(batch: &Batch) -> Self {
        let mut p = Packing {
            offsets: vec![0],
            ..Default::default()
        };
        for (b, &len) in batch.lengths.iter().enumerate() {
            let start = p.ids.len();
            for t in 0..len {
                let i = b * batch.seq + t;
                let row = p.ids.len();
                p.ids.push(batch.ids[i]);
                p.pos.push(t);
                p.seq_start.push(start);
                p.seq_end.push(start + len);
                if batch.targets[i] != IGNORE_INDEX {
                    p.target_rows.push(row);
                    p.targets.push(batch.targets[i]);
                    p.padded_index.push(i);
                }
            }
            p.offsets.push(p.ids.len());
        }
        p
    }

    /// Total valid tokens (packed rows).
    pub fn rows(&self) -> usize {
        self.ids.len()
    }
}
