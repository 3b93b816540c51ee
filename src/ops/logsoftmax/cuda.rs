//! CUDA launchers for `kernels/logsoftmax.cu`, on caller-owned cudarc buffers.
//!
//! Same semantics and the same length checks as the CPU twins, with one documented difference:
//! targets stay on the device, so they are not range-checked on the host; the kernels treat a
//! target outside `[0, V)` exactly like [`IGNORE_INDEX`](super::IGNORE_INDEX) (logp 0, gradient
//! row 0) and never address memory outside the row.
//!
//! All launches are queued on [`CudaDevice::stream`]; nothing here synchronises.

use super::{check_lengths, check_rows};
use crate::device::CudaDevice;
use crate::dtype::Elem;
use anyhow::{ensure, Context, Result};
use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use half::bf16;

const MODULE: &str = "logsoftmax";
/// Threads per row for the forward, the backward and the unfused baseline.
const ROW_THREADS: u32 = 512;
/// Threads per row for the one-launch forward + backward: one 1024-thread block per SM (64
/// registers each) keeps few rows in flight, so that the bytes the second sweep re-reads are
/// likely still in L2 (132 bf16 rows of 128256 are 34 MB; f32 rows of that length are twice
/// that and may not fit: to be measured on the GPU).
const FUSED_THREADS: u32 = 1024;

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
}

/// Logit storage types the kernels are compiled for (f32 and bf16); maps the type to the kernel
/// name suffix. Sealed: the set is fixed by the instantiations in the `.cu` file.
pub trait CudaElem: Elem + DeviceRepr + sealed::Sealed {
    /// Kernel name suffix, e.g. `"bf16"` in `logsoftmax_fwd_bf16`.
    const KERNEL_SUFFIX: &'static str;
}

impl CudaElem for f32 {
    const KERNEL_SUFFIX: &'static str = "f32";
}

impl CudaElem for bf16 {
    const KERNEL_SUFFIX: &'static str = "bf16";
}

/// Per-row outputs of the CUDA forward, as caller-owned device views of R floats each.
pub struct CudaForwardOut<'a> {
    /// `log Σ exp(x)` per row.
    pub lse: CudaViewMut<'a, f32>,
    /// Target log-prob per row (0 for ignored or out-of-range targets).
    pub logp: CudaViewMut<'a, f32>,
    /// Softmax entropy per row, when wanted (the kernel without entropy skips its arithmetic).
    pub entropy: Option<CudaViewMut<'a, f32>>,
}

impl CudaForwardOut<'_> {
    fn check(&self, rows: usize) -> Result<()> {
        check_rows("lse", self.lse.len(), rows)?;
        check_rows("logp", self.logp.len(), rows)?;
        if let Some(e) = &self.entropy {
            check_rows("entropy", e.len(), rows)?;
        }
        Ok(())
    }
}

/// Checks the shapes every launcher shares and returns `(grid rows, V as i32)`.
fn launch_dims(logits_len: usize, rows: usize, vocab: usize, targets_len: usize) -> Result<(u32, i32)> {
    check_lengths(logits_len, rows, vocab, targets_len)?;
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .with_context(|| format!("logits: {rows} rows exceed the CUDA grid limit"))?;
    let v = i32::try_from(vocab).with_context(|| format!("logits: vocabulary size {vocab} exceeds i32"))?;
    Ok((grid, v))
}

fn row_config(rows: u32, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Fused forward on the GPU: `lse`, `logp` and optionally `entropy` for `[rows × vocab]` logits,
/// reading the logits once. Targets outside `[0, V)` count as ignored (see the module docs).
pub fn forward_cuda<T: CudaElem>(
    dev: &CudaDevice,
    logits: &CudaView<'_, T>,
    rows: usize,
    vocab: usize,
    targets: &CudaView<'_, i64>,
    out: CudaForwardOut<'_>,
) -> Result<()> {
    let (grid, v) = launch_dims(logits.len(), rows, vocab, targets.len())?;
    out.check(rows)?;
    if rows == 0 {
        return Ok(());
    }
    let CudaForwardOut {
        mut lse,
        mut logp,
        entropy,
    } = out;
    let suffix = T::KERNEL_SUFFIX;
    let cfg = row_config(grid, ROW_THREADS);
    match entropy {
        Some(mut entropy) => {
            let f = dev.function(MODULE, &format!("logsoftmax_fwd_entropy_{suffix}"))?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(logits)
                .arg(targets)
                .arg(&mut lse)
                .arg(&mut logp)
                .arg(&mut entropy)
                .arg(&v);
            // SAFETY: argument order and types match the kernel; lengths were checked above.
            unsafe { b.launch(cfg) }?;
        }
        None => {
            let f = dev.function(MODULE, &format!("logsoftmax_fwd_{suffix}"))?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(logits).arg(targets).arg(&mut lse).arg(&mut logp).arg(&v);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }?;
        }
    }
    Ok(())
}

/// In-place backward on the GPU: `logits` becomes `dlogp[r]·(1[v == t_r] − exp(x − lse[r]))`,
/// rows with ignored or out-of-range targets become 0.
pub fn backward_cuda<T: CudaElem>(
    dev: &CudaDevice,
    logits: &mut CudaViewMut<'_, T>,
    rows: usize,
    vocab: usize,
    targets: &CudaView<'_, i64>,
    lse: &CudaView<'_, f32>,
    dlogp: &CudaView<'_, f32>,
) -> Result<()> {
    let (grid, v) = launch_dims(logits.len(), rows, vocab, targets.len())?;
    check_rows("lse", lse.len(), rows)?;
    check_rows("dlogp", dlogp.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.function(MODULE, &format!("logsoftmax_bwd_{}", T::KERNEL_SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(logits).arg(targets).arg(lse).arg(dlogp).arg(&v);
    // SAFETY: argument order and types match the kernel; lengths were checked above.
    unsafe { b.launch(row_config(grid, ROW_THREADS)) }?;
    Ok(())
}

/// Forward + in-place backward in one launch, for when `dlogp` is known before the forward:
/// fills `out` as [`forward_cuda`] does and overwrites the logits as [`backward_cuda`] does.
pub fn forward_backward_cuda<T: CudaElem>(
    dev: &CudaDevice,
    logits: &mut CudaViewMut<'_, T>,
    rows: usize,
    vocab: usize,
    targets: &CudaView<'_, i64>,
    dlogp: &CudaView<'_, f32>,
    out: CudaForwardOut<'_>,
) -> Result<()> {
    let (grid, v) = launch_dims(logits.len(), rows, vocab, targets.len())?;
    check_rows("dlogp", dlogp.len(), rows)?;
    out.check(rows)?;
    if rows == 0 {
        return Ok(());
    }
    let CudaForwardOut {
        mut lse,
        mut logp,
        entropy,
    } = out;
    let suffix = T::KERNEL_SUFFIX;
    let cfg = row_config(grid, FUSED_THREADS);
    match entropy {
        Some(mut entropy) => {
            let f = dev.function(MODULE, &format!("logsoftmax_fwd_bwd_entropy_{suffix}"))?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(logits)
                .arg(targets)
                .arg(dlogp)
                .arg(&mut lse)
                .arg(&mut logp)
                .arg(&mut entropy)
                .arg(&v);
            // SAFETY: argument order and types match the kernel; lengths were checked above.
            unsafe { b.launch(cfg) }?;
        }
        None => {
            let f = dev.function(MODULE, &format!("logsoftmax_fwd_bwd_{suffix}"))?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(logits)
                .arg(targets)
                .arg(dlogp)
                .arg(&mut lse)
                .arg(&mut logp)
                .arg(&v);
            // SAFETY: as above.
            unsafe { b.launch(cfg) }?;
        }
    }
    Ok(())
}

/// **Benchmark baseline only**: the unfused forward eager frameworks run — a log-softmax that
/// writes the fp32 `[rows × vocab]` tensor `logp_full` (reading the logits twice), then a gather
/// into `logp`. Also writes `lse`. Use [`forward_cuda`] for real work.
#[allow(clippy::too_many_arguments)]
pub fn unfused_forward_cuda<T: CudaElem>(
    dev: &CudaDevice,
    logits: &CudaView<'_, T>,
    rows: usize,
    vocab: usize,
    targets: &CudaView<'_, i64>,
    logp_full: &mut CudaViewMut<'_, f32>,
    lse: &mut CudaViewMut<'_, f32>,
    logp: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (grid, v) = launch_dims(logits.len(), rows, vocab, targets.len())?;
    ensure!(
        logp_full.len() == logits.len(),
        "logp_full: expected {} elements (same as logits), got {}",
        logits.len(),
        logp_full.len()
    );
    check_rows("lse", lse.len(), rows)?;
    check_rows("logp", logp.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.function(MODULE, &format!("logsoftmax_unfused_fwd_{}", T::KERNEL_SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(logits).arg(&mut *logp_full).arg(lse).arg(&v);
    // SAFETY: argument order and types match the kernel; lengths were checked above.
    unsafe { b.launch(row_config(grid, ROW_THREADS)) }?;

    let g = dev.function(MODULE, "logsoftmax_unfused_gather")?;
    let r = grid as i32;
    let mut b = dev.stream().launch_builder(&g);
    let full = logp_full.as_view();
    b.arg(&full).arg(targets).arg(logp).arg(&r).arg(&v);
    let cfg = LaunchConfig {
        grid_dim: (grid.div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above; one thread per row, guarded by R in the kernel.
    unsafe { b.launch(cfg) }?;
    Ok(())
}

/// **Benchmark baseline only**: the unfused backward — reads the fp32 `logp_full` tensor written
/// by [`unfused_forward_cuda`] and writes `grad = dlogp·(1[v == t] − exp(logp_full))` (may be the
/// logits buffer). Use [`backward_cuda`] for real work.
pub fn unfused_backward_cuda<T: CudaElem>(
    dev: &CudaDevice,
    logp_full: &CudaView<'_, f32>,
    rows: usize,
    vocab: usize,
    targets: &CudaView<'_, i64>,
    dlogp: &CudaView<'_, f32>,
    grad: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let (grid, v) = launch_dims(logp_full.len(), rows, vocab, targets.len())?;
    ensure!(
        grad.len() == logp_full.len(),
        "grad: expected {} elements (same as logp_full), got {}",
        logp_full.len(),
        grad.len()
    );
    check_rows("dlogp", dlogp.len(), rows)?;
    if rows == 0 {
        return Ok(());
    }
    let f = dev.function(MODULE, &format!("logsoftmax_unfused_bwd_{}", T::KERNEL_SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(logp_full).arg(targets).arg(dlogp).arg(grad).arg(&v);
    // SAFETY: argument order and types match the kernel; lengths were checked above.
    unsafe { b.launch(row_config(grid, ROW_THREADS)) }?;
    Ok(())
}
