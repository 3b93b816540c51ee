//! Shared plumbing for the layer ops: shape checks that name the tensor, the element types the
//! CUDA kernels are instantiated for, and launch-geometry helpers.

use crate::dtype::Elem;
use anyhow::{ensure, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig, ValidAsZeroBits};
use half::bf16;

/// A storage type with CUDA kernel instantiations: kernels are named `<op>_<SUFFIX>`
/// (`layernorm_forward_bf16`), so one launcher serves both dtypes.
pub trait GpuElem: Elem + DeviceRepr + ValidAsZeroBits {
    /// The kernel-name suffix (`"f32"` / `"bf16"`).
    const SUFFIX: &'static str;
}

impl GpuElem for f32 {
    const SUFFIX: &'static str = "f32";
}

impl GpuElem for bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Fails unless tensor `name` has exactly `want` elements.
pub fn ensure_len(name: &str, got: usize, want: usize) -> Result<()> {
    ensure!(got == want, "{name}: expected {want} elements, got {got}");
    Ok(())
}

/// A dimension as the `i32` the kernels take, failing (naming it) when it does not fit.
pub fn dim_i32(name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{name} = {v} exceeds the kernels' i32 range"))
}

/// `blocks` blocks of `threads` threads, no dynamic shared memory.
pub fn cfg(blocks: (u32, u32, u32), threads: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig {
        grid_dim: blocks,
        block_dim: threads,
        shared_mem_bytes: 0,
    }
}

/// A 1-D grid-stride launch over `n` elements: 256 threads a block, at most 65 536 blocks (the
/// kernels loop over the rest), at least one block so empty launches stay valid.
pub fn cfg_elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
    cfg((blocks, 1, 1), (256, 1, 1))
}
