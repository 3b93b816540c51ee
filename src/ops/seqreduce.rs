//! Per-sequence reduction of per-token values (log-probs, log-ratios) and its backward.
//!
//! Two layouts, because trainers use both:
//! - **padded** `[R, T]` values with a `u8` completion mask (`0` = skip, anything else = count the
//!   token). A byte mask was chosen over an f32 one because it is what tokenisation produces, it
//!   makes the counts exact integers, and it is 4× less memory traffic.
//! - **packed** `[N]` values with per-token `i32` segment ids into `S` segments (`−1` = skip, e.g.
//!   prompt or padding tokens). Segments need not be contiguous.
//!
//! Outputs per sequence: `sums` (f32), `counts` (i32) and `means = sum / max(count, 1)` (so an
//! all-masked row gives 0, never NaN). The CPU twin accumulates in f64 and rounds once; the CUDA
//! kernels accumulate in f32 with a fixed per-block tree, so they are deterministic run to run and
//! agree with the CPU to ~1e-5 relative. The backward broadcasts a per-sequence upstream gradient
//! (of the sums or of the means, see [`Reduction`]) back to the tokens under the mask.

use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig, PushKernelArg};
use rayon::prelude::*;

use crate::device::CudaDevice;

/// Which per-sequence output an upstream gradient refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduction {
    /// `d sum / d token = 1` for every counted token.
    Sum,
    /// `d mean / d token = 1 / max(count, 1)` for every counted token.
    Mean,
}

/// Per-sequence outputs of the forward reductions, written into caller-owned slices of length
/// R (padded) or S (packed).
pub struct SeqReduceOut<'a> {
    /// Sum of the counted token values.
    pub sums: &'a mut [f32],
    /// Number of counted tokens.
    pub counts: &'a mut [i32],
    /// `sum / max(count, 1)`.
    pub means: &'a mut [f32],
}

impl SeqReduceOut<'_> {
    fn check(&self, n: usize) -> Result<()> {
        ensure!(
            self.sums.len() == n,
            "sums: expected {n} entries, got {}",
            self.sums.len()
        );
        ensure!(
            self.counts.len() == n,
            "counts: expected {n} entries, got {}",
            self.counts.len()
        );
        ensure!(
            self.means.len() == n,
            "means: expected {n} entries, got {}",
            self.means.len()
        );
        Ok(())
    }

    fn write(&mut self, i: usize, sum: f64, count: usize) {
        self.sums[i] = sum as f32;
        self.counts[i] = count as i32;
        self.means[i] = (sum / count.max(1) as f64) as f32;
    }
}

/// Validates a padded `[rows, cols]` layout.
pub fn check_padded(values_len: usize, mask_len: usize, rows: usize, cols: usize) -> Result<()> {
    let n = rows.checked_mul(cols).filter(|&n| n <= i32::MAX as usize);
    let Some(n) = n else {
        bail!("values: {rows}×{cols} exceeds the i32 index range")
    };
    ensure!(
        values_len == n,
        "values: expected {rows}×{cols} = {n} elements, got {values_len}"
    );
    ensure!(
        mask_len == n,
        "mask: expected {rows}×{cols} = {n} elements, got {mask_len}"
    );
    Ok(())
}

/// Validates packed segment ids: every id is `−1` or in `[0, segments)`.
pub fn check_segment_ids(seg: &[i32], segments: usize) -> Result<()> {
    ensure!(
        seg.len() <= i32::MAX as usize,
        "segment_ids: {} tokens exceed the i32 index range",
        seg.len()
    );
    ensure!(
        segments <= i32::MAX as usize,
        "segments: {segments} exceeds the i32 range"
    );
    if let Some((i, &s)) = seg
        .iter()
        .enumerate()
        .find(|(_, &s)| s < -1 || s as i64 >= segments as i64)
    {
        bail!("segment_ids[{i}] = {s} is outside [0, {segments}) and is not the skip id −1");
    }
    Ok(())
}

/// Segment ids equivalent to a padded `[rows, cols]` mask: token `(r, t)` gets id `r` when
/// counted, else `−1`. Lets the packed-only ops accept padded batches.
pub fn segment_ids_from_mask(mask: &[u8], rows: usize, cols: usize) -> Result<Vec<i32>> {
    check_padded(mask.len(), mask.len(), rows, cols)?;
    Ok(mask
        .iter()
        .enumerate()
        .map(|(i, &m)| if m != 0 { (i / cols.max(1)) as i32 } else { -1 })
        .collect())
}

/// CPU twin of the padded forward; rows run in parallel.
pub fn padded_forward_cpu(
    values: &[f32],
    mask: &[u8],
    rows: usize,
    cols: usize,
    mut out: SeqReduceOut<'_>,
) -> Result<()> {
    check_padded(values.len(), mask.len(), rows, cols)?;
    out.check(rows)?;
    let stats: Vec<(f64, usize)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let (v, m) = (&values[r * cols..(r + 1) * cols], &mask[r * cols..(r + 1) * cols]);
            v.iter()
                .zip(m)
                .filter(|(_, &m)| m != 0)
                .fold((0f64, 0usize), |(s, c), (&x, _)| (s + x as f64, c + 1))
        })
        .collect();
    for (r, (s, c)) in stats.into_iter().enumerate() {
        out.write(r, s, c);
    }
    Ok(())
}

/// Tokens per parallel work item of the packed CPU reduction. Fixed (not tied to the thread
/// count) so the f64 partial sums are combined in the same order on every machine.
const PACKED_CHUNK: usize = 16 * 1024;

/// Per-segment f64 sums and counts of the packed layout (ids already validated).
pub(crate) fn packed_sums_f64(values: impl Fn(usize) -> f64 + Sync, seg: &[i32], segments: usize) -> Vec<(f64, usize)> {
    let partials: Vec<Vec<(f64, usize)>> = seg
        .par_chunks(PACKED_CHUNK)
        .enumerate()
        .map(|(c, ids)| {
            let mut acc = vec![(0f64, 0usize); segments];
            for (j, &s) in ids.iter().enumerate() {
                if s >= 0 {
                    let a = &mut acc[s as usize];
                    a.0 += values(c * PACKED_CHUNK + j);
                    a.1 += 1;
                }
            }
            acc
        })
        .collect();
    let mut total = vec![(0f64, 0usize); segments];
    for p in partials {
        for (t, (s, c)) in total.iter_mut().zip(p) {
            t.0 += s;
            t.1 += c;
        }
    }
    total
}

/// CPU twin of the packed forward: reduces `values[i]` into segment `seg[i]`.
pub fn packed_forward_cpu(values: &[f32], seg: &[i32], segments: usize, mut out: SeqReduceOut<'_>) -> Result<()> {
    ensure!(
        values.len() == seg.len(),
        "values: expected {} entries (one per segment id), got {}",
        seg.len(),
        values.len()
    );
    check_segment_ids(seg, segments)?;
    out.check(segments)?;
    for (s, (sum, c)) in packed_sums_f64(|i| values[i] as f64, seg, segments)
        .into_iter()
        .enumerate()
    {
        out.write(s, sum, c);
    }
    Ok(())
}

fn check_backward(grad: &[f32], counts: &[i32], n: usize) -> Result<()> {
    ensure!(
        grad.len() == n,
        "grad: expected {n} entries (one per sequence), got {}",
        grad.len()
    );
    ensure!(
        counts.len() == n,
        "counts: expected {n} entries (one per sequence), got {}",
        counts.len()
    );
    Ok(())
}

fn scale(g: f32, count: i32, reduction: Reduction) -> f32 {
    match reduction {
        Reduction::Sum => g,
        Reduction::Mean => g / count.max(1) as f32,
    }
}

/// CPU twin of the padded backward: `dvalues[r,t] = mask[r,t] ? grad[r]·(1 or 1/max(count_r,1)) : 0`.
/// `counts` are the forward's counts (only read for [`Reduction::Mean`]).
pub fn padded_backward_cpu(
    grad: &[f32],
    counts: &[i32],
    reduction: Reduction,
    mask: &[u8],
    rows: usize,
    cols: usize,
    dvalues: &mut [f32],
) -> Result<()> {
    check_padded(dvalues.len(), mask.len(), rows, cols)?;
    check_backward(grad, counts, rows)?;
    if cols == 0 {
        return Ok(());
    }
    dvalues
        .par_chunks_mut(cols)
        .zip(mask.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (d, m))| {
            let g = scale(grad[r], counts[r], reduction);
            for (di, &mi) in d.iter_mut().zip(m) {
                *di = if mi != 0 { g } else { 0.0 };
            }
        });
    Ok(())
}

/// CPU twin of the packed backward: `dvalues[i] = seg[i] ≥ 0 ? grad[seg[i]]·(1 or 1/max(count,1)) : 0`.
pub fn packed_backward_cpu(
    grad: &[f32],
    counts: &[i32],
    reduction: Reduction,
    seg: &[i32],
    segments: usize,
    dvalues: &mut [f32],
) -> Result<()> {
    check_segment_ids(seg, segments)?;
    check_backward(grad, counts, segments)?;
    ensure!(
        dvalues.len() == seg.len(),
        "dvalues: expected {} entries, got {}",
        seg.len(),
        dvalues.len()
    );
    dvalues.par_iter_mut().zip(seg.par_iter()).for_each(|(d, &s)| {
        *d = if s >= 0 {
            scale(grad[s as usize], counts[s as usize], reduction)
        } else {
            0.0
        };
    });
    Ok(())
}

/// Threads per block of the reduction kernels (`SEQ_BLOCK` in `kernels/seqreduce.cu`).
const BLOCK: u32 = 256;

fn elementwise_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK).max(1), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn check_outs_cuda(
    sums: &CudaViewMut<'_, f32>,
    counts: &CudaViewMut<'_, i32>,
    means: &CudaViewMut<'_, f32>,
    n: usize,
) -> Result<()> {
    ensure!(sums.len() == n, "sums: expected {n} entries, got {}", sums.len());
    ensure!(counts.len() == n, "counts: expected {n} entries, got {}", counts.len());
    ensure!(means.len() == n, "means: expected {n} entries, got {}", means.len());
    Ok(())
}

/// CUDA padded forward on caller-owned device buffers (one block per row, f32 tree sums).
#[allow(clippy::too_many_arguments)]
pub fn padded_forward_cuda(
    dev: &CudaDevice,
    values: &CudaView<'_, f32>,
    mask: &CudaView<'_, u8>,
    rows: usize,
    cols: usize,
    sums: &mut CudaViewMut<'_, f32>,
    counts: &mut CudaViewMut<'_, i32>,
    means: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check_padded(values.len(), mask.len(), rows, cols)?;
    check_outs_cuda(sums, counts, means, rows)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.function("seqreduce", "seq_padded_forward")?;
    let (r, c) = (rows as i32, cols as i32);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(values).arg(mask).arg(&r).arg(&c).arg(sums).arg(counts).arg(means);
    // SAFETY: argument list matches the kernel signature; lengths were checked above.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// Computes every segment's first/last token index into `lo`/`hi` (length `segments` each) on
/// the GPU; segments without tokens get `lo = n`, `hi = −1`. Shared with the sequence-level
/// f-divergence kernels.
pub(crate) fn segment_ranges_cuda(
    dev: &CudaDevice,
    seg: &CudaView<'_, i32>,
    segments: usize,
    lo: &mut CudaViewMut<'_, i32>,
    hi: &mut CudaViewMut<'_, i32>,
) -> Result<()> {
    ensure!(
        seg.len() <= i32::MAX as usize,
        "segment_ids: {} tokens exceed the i32 index range",
        seg.len()
    );
    ensure!(
        segments <= i32::MAX as usize,
        "segments: {segments} exceeds the i32 range"
    );
    let (n, s) = (seg.len() as i32, segments as i32);
    let init = dev.function("seqreduce", "seg_range_init")?;
    let mut b = dev.stream().launch_builder(&init);
    b.arg(&s).arg(&n).arg(&mut *lo).arg(&mut *hi);
    // SAFETY: lo/hi hold `segments` entries (allocated by the callers in this crate).
    unsafe { b.launch(elementwise_cfg(segments)) }?;
    if seg.is_empty() {
        return Ok(());
    }
    let ranges = dev.function("seqreduce", "seg_ranges")?;
    let mut b = dev.stream().launch_builder(&ranges);
    b.arg(seg).arg(&n).arg(&s).arg(lo).arg(hi);
    // SAFETY: as above; ids outside [0, segments) are skipped by the kernel.
    unsafe { b.launch(elementwise_cfg(seg.len())) }?;
    Ok(())
}

/// CUDA packed forward on caller-owned device buffers. Segment ids are not validated on the
/// device (that would need a synchronising copy): ids outside `[−1, S)` are skipped, where
/// [`packed_forward_cpu`] returns an error. Allocates a `2·S` i32 scratch for the segment ranges.
#[allow(clippy::too_many_arguments)]
pub fn packed_forward_cuda(
    dev: &CudaDevice,
    values: &CudaView<'_, f32>,
    seg: &CudaView<'_, i32>,
    segments: usize,
    sums: &mut CudaViewMut<'_, f32>,
    counts: &mut CudaViewMut<'_, i32>,
    means: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    ensure!(
        values.len() == seg.len(),
        "values: expected {} entries (one per segment id), got {}",
        seg.len(),
        values.len()
    );
    check_outs_cuda(sums, counts, means, segments)?;
    if segments == 0 {
        return Ok(());
    }
    let mut lo = dev.stream().alloc_zeros::<i32>(segments)?;
    let mut hi = dev.stream().alloc_zeros::<i32>(segments)?;
    segment_ranges_cuda(dev, seg, segments, &mut lo.as_view_mut(), &mut hi.as_view_mut())?;
    let f = dev.function("seqreduce", "seq_packed_forward")?;
    let s = segments as i32;
    let cfg = LaunchConfig {
        grid_dim: (segments as u32, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(values)
        .arg(seg)
        .arg(&s)
        .arg(&lo)
        .arg(&hi)
        .arg(sums)
        .arg(counts)
        .arg(means);
    // SAFETY: argument list matches the kernel; each block reads only [lo, hi] of its segment.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// CUDA twin of [`padded_backward_cpu`].
#[allow(clippy::too_many_arguments)]
pub fn padded_backward_cuda(
    dev: &CudaDevice,
    grad: &CudaView<'_, f32>,
    counts: &CudaView<'_, i32>,
    reduction: Reduction,
    mask: &CudaView<'_, u8>,
    rows: usize,
    cols: usize,
    dvalues: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    check_padded(dvalues.len(), mask.len(), rows, cols)?;
    ensure!(
        grad.len() == rows,
        "grad: expected {rows} entries (one per sequence), got {}",
        grad.len()
    );
    ensure!(
        counts.len() == rows,
        "counts: expected {rows} entries (one per sequence), got {}",
        counts.len()
    );
    if rows * cols == 0 {
        return Ok(());
    }
    let f = dev.function("seqreduce", "seq_padded_backward")?;
    let (r, c, mean) = (rows as i32, cols as i32, (reduction == Reduction::Mean) as i32);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(grad)
        .arg(counts)
        .arg(&mean)
        .arg(mask)
        .arg(&r)
        .arg(&c)
        .arg(dvalues);
    // SAFETY: argument list matches the kernel signature; lengths were checked above.
    unsafe { b.launch(elementwise_cfg(rows * cols)) }?;
    Ok(())
}

/// CUDA twin of [`packed_backward_cpu`] (ids outside `[−1, S)` give 0, see [`packed_forward_cuda`]).
#[allow(clippy::too_many_arguments)]
pub fn packed_backward_cuda(
    dev: &CudaDevice,
    grad: &CudaView<'_, f32>,
    counts: &CudaView<'_, i32>,
    reduction: Reduction,
    seg: &CudaView<'_, i32>,
    segments: usize,
    dvalues: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    ensure!(
        grad.len() == segments,
        "grad: expected {segments} entries (one per sequence), got {}",
        grad.len()
    );
    ensure!(
        counts.len() == segments,
        "counts: expected {segments} entries (one per sequence), got {}",
        counts.len()
    );
    ensure!(
        dvalues.len() == seg.len(),
        "dvalues: expected {} entries, got {}",
        seg.len(),
        dvalues.len()
    );
    ensure!(
        seg.len() <= i32::MAX as usize,
        "segment_ids: {} tokens exceed the i32 index range",
        seg.len()
    );
    if seg.is_empty() {
        return Ok(());
    }
    let f = dev.function("seqreduce", "seq_packed_backward")?;
    let (n, s, mean) = (seg.len() as i32, segments as i32, (reduction == Reduction::Mean) as i32);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(grad).arg(counts).arg(&mean).arg(seg).arg(&n).arg(&s).arg(dvalues);
    // SAFETY: argument list matches the kernel signature; lengths were checked above.
    unsafe { b.launch(elementwise_cfg(seg.len())) }?;
    Ok(())
}
