//! One micro-batch as the CUDA engine lays it out, planned on the host before anything is
//! allocated on the device.
//!
//! The attention kernels take right-padded `[B, T, H, D]` rows, so the engine keeps the padded
//! layout, trimmed to the longest row: `Tm = max(lengths)` columns, `N = B·Tm` rows, row
//! `n = b·Tm + t`. Padded rows carry id 0 at position 0 (always inside the tables), so their
//! activations are finite; their gradients are exactly zero (no target, and the attention kernels
//! zero every padded query and key), so they add nothing to any parameter gradient.
//!
//! Only rows with a target reach the LM head: `target_rows` (ascending, distinct) index the
//! `[N, C]` hidden states, and `padded_index` maps each back to `b·T + t` of the caller's `[B, T]`
//! layout. [`ActivationBytes`] is the memory plan: every buffer the forward saves and the backward
//! needs, counted before any allocation, so a batch that cannot fit fails with a plain error.

use super::precision::Precision;
use crate::device::CudaDevice;
use crate::model::batch::Batch;
use crate::model::config::{Arch, ModelConfig};
use crate::ops::logsoftmax::IGNORE_INDEX;
use crate::ops::rows;
use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;

/// Host-side geometry of one batch.
#[derive(Clone, Debug)]
pub struct BatchPlan {
    /// Rows `B`.
    pub batch: usize,
    /// The caller's padded length `T`.
    pub seq: usize,
    /// Trimmed length `Tm` (the longest row).
    pub tm: usize,
    /// Token ids, `[B, Tm]` (0 on padding).
    pub ids: Vec<u32>,
    /// Positions, `[B, Tm]`: `t` for real tokens, 0 on padding.
    pub pos: Vec<u32>,
    /// Per-row lengths.
    pub lengths: Vec<u32>,
    /// Rows `b·Tm + t` that have a target, ascending.
    pub target_rows: Vec<u32>,
    /// The target of each target row.
    pub targets: Vec<i64>,
    /// `b·T + t` of each target row (the caller's layout).
    pub padded_index: Vec<usize>,
}

impl BatchPlan {
    /// Lays out `batch` (already validated against the model).
    pub fn new(batch: &Batch) -> Result<BatchPlan> {
        let (b_n, t_n) = (batch.batch(), batch.seq());
        let tm = batch.max_len();
        let n = b_n * tm;
        u32::try_from(n).context("batch: more rows than a u32 row index can address")?;
        let (mut ids, mut pos) = (vec![0u32; n], vec![0u32; n]);
        let (mut target_rows, mut targets, mut padded_index) = (Vec::new(), Vec::new(), Vec::new());
        for (b, &len) in batch.lengths().iter().enumerate() {
            for t in 0..len {
                let (row, src) = (b * tm + t, b * t_n + t);
                ids[row] = batch.ids()[src];
                pos[row] = t as u32;
                let tg = batch.targets()[src];
                if tg != IGNORE_INDEX {
                    target_rows.push(row as u32);
                    targets.push(tg);
                    padded_index.push(src);
                }
            }
        }
        // Ascending by construction; the row kernels rely on range and distinctness.
        rows::check_indices("target rows", &target_rows, n, true)?;
        Ok(BatchPlan {
            batch: b_n,
            seq: t_n,
            tm,
            ids,
            pos,
            lengths: batch.lengths().iter().map(|&l| l as u32).collect(),
            target_rows,
            targets,
            padded_index,
        })
    }

    /// Rows `N = B·Tm`.
    pub fn rows(&self) -> usize {
        self.batch * self.tm
    }

    /// Rows with a target `R`.
    pub fn num_targets(&self) -> usize {
        self.target_rows.len()
    }
}

/// The batch's index tensors on the device.
pub struct DeviceBatch {
    /// `[N]` token ids.
    pub ids: CudaSlice<u32>,
    /// `[N]` positions.
    pub pos: CudaSlice<u32>,
    /// `[B]` lengths.
    pub lengths: CudaSlice<u32>,
    /// `[R]` target rows.
    pub target_rows: CudaSlice<u32>,
    /// `[R]` targets.
    pub targets: CudaSlice<i64>,
}

impl DeviceBatch {
    /// Uploads a plan with at least one target (so no buffer is empty).
    pub fn upload(dev: &CudaDevice, p: &BatchPlan) -> Result<DeviceBatch> {
        let s = dev.stream();
        Ok(DeviceBatch {
            ids: s.clone_htod(&p.ids).context("uploading input_ids")?,
            pos: s.clone_htod(&p.pos).context("uploading positions")?,
            lengths: s.clone_htod(&p.lengths).context("uploading lengths")?,
            target_rows: s.clone_htod(&p.target_rows).context("uploading target rows")?,
            targets: s.clone_htod(&p.targets).context("uploading targets")?,
        })
    }
}

/// The memory plan of one batch, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActivationBytes {
    /// Saved by the forward for the backward (kept while the forward value lives).
    pub saved: usize,
    /// Transient working set of the backward (block scratch and one head chunk).
    pub backward: usize,
}

impl ActivationBytes {
    /// Counts every buffer the engine allocates for `p` (see `acts.rs` and `backward.rs`).
    pub fn of(cfg: &ModelConfig, p: &BatchPlan, precision: Precision, chunk: usize) -> ActivationBytes {
        let a = precision.act_bytes();
        let (n, r, l) = (p.rows(), p.num_targets(), cfg.num_layers);
        let (c, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let ln = usize::from(cfg.arch == Arch::Gpt2);
        let swiglu = usize::from(cfg.arch == Arch::Llama);
        let stats = 4 * n * (1 + ln); // rstd (+ mean) per norm
        let per_layer = a * n * (c + qd + 2 * kvd + qd + c + c + i + swiglu * i + i)
            + 2 * stats
            + 4 * p.batch * cfg.num_heads * p.tm;
        let trunk = a * n * c * (l + 2) + stats + l * per_layer;
        let head = a * r * c + 4 * r * 5 + a * chunk.min(r.max(1)) * v;
        let scratch = a * n * (4 * c + 2 * qd + 2 * kvd + 3 * i) + 4 * p.batch * cfg.num_heads * p.tm;
        ActivationBytes {
            saved: trunk + head,
            backward: scratch + a * (r * c + chunk.min(r.max(1)) * v),
        }
    }

    /// Fails with a plain message when `need` bytes are more than the device has free. The
    /// stream is synchronised first: buffers freed asynchronously go back to the driver at a
    /// synchronisation, and would otherwise not count as free yet.
    pub fn ensure_fits(dev: &CudaDevice, need: usize, what: &str) -> Result<()> {
        dev.stream()
            .synchronize()
            .context("synchronising before the memory check")?;
        let (free, _total) = dev.context().mem_get_info().context("querying free GPU memory")?;
        anyhow::ensure!(
            need <= free,
            "{what} needs {:.2} GiB on the GPU but {:.2} GiB are free; lower the batch size or \
             max_length, or use bf16",
            need as f64 / (1u64 << 30) as f64,
            free as f64 / (1u64 << 30) as f64
        );
        Ok(())
    }
}
