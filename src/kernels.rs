//! The CUDA kernel images that `build.rs` compiled from `kernels/*.cu` and embedded here.
//!
//! Each image carries portable PTX (compute_80, JIT-compiled by the driver on Ampere and newer)
//! and an sm_90 cubin (loaded without JIT on Hopper). A build without a CUDA compiler embeds none:
//! [`TOOLCHAIN`] is then `None` and asking for a CUDA device fails with a clear error.

/// One compiled `kernels/<name>.cu`.
#[derive(Debug, Clone, Copy)]
pub struct KernelImage {
    /// The file stem, e.g. `"logsoftmax"`; also the module name used by [`crate::device::CudaDevice`].
    pub name: &'static str,
    /// PTX text for `compute_80`.
    pub ptx: &'static str,
    /// Cubin for `sm_90`.
    pub cubin_sm90: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernel_images.rs"));

/// The embedded image of `kernels/<name>.cu`, if this build has one.
pub fn image(name: &str) -> Option<&'static KernelImage> {
    KERNEL_IMAGES.iter().find(|k| k.name == name)
}
