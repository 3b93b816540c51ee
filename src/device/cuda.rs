//! The CUDA side of the device layer: one context + stream per GPU ordinal, shared process-wide,
//! with the embedded kernel modules loaded once per context and cached.

use crate::kernels;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Why CUDA device `ordinal` cannot be used, or `None` when it can. Never panics: cudarc panics
/// when the driver library is missing, so its presence is checked before any driver call.
pub fn cuda_unavailable_reason(ordinal: usize) -> Option<String> {
    if kernels::TOOLCHAIN.is_none() {
        return Some(
            "this irbridge build embeds no CUDA kernels (no CUDA compiler at build time; run \
             scripts/install-cuda-toolchain and rebuild)"
                .into(),
        );
    }
    // SAFETY: only probes for the shared library with dlopen.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some("no CUDA driver library (libcuda.so) found".into());
    }
    match CudaContext::device_count() {
        Ok(n) if (ordinal as i32) < n => None,
        Ok(n) => Some(format!("the driver reports {n} CUDA device(s)")),
        Err(e) => Some(format!("the CUDA driver failed to initialise: {e}")),
    }
}

/// Why cuBLAS (which the CUDA transformer engine's matrix products need) cannot be loaded, or
/// `None` when it can. cudarc loads `libcublas` on first use and panics when it is missing, so the
/// engine asks this first. The library is looked up as `libcublas.so` / `libcublas.so.12` on the
/// dynamic loader's path (`LD_LIBRARY_PATH`).
pub fn cublas_unavailable_reason() -> Option<String> {
    // SAFETY: only probes for the shared library with dlopen.
    if unsafe { cudarc::cublas::sys::is_culib_present() } {
        None
    } else {
        Some(
            "libcublas (CUDA 12) was not found on the dynamic loader's path; add its directory \
             (e.g. site-packages/nvidia/cublas/lib) to LD_LIBRARY_PATH"
                .into(),
        )
    }
}

/// A CUDA GPU: context, the stream every irbridge op launches on, and the kernel-module cache.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    use_cubin: bool,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("use_cubin", &self.use_cubin)
            .finish()
    }
}

static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();

impl CudaDevice {
    /// The process-wide handle for GPU `ordinal`, created on first use.
    pub fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        let map = DEVICES.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = map.lock().map_err(|_| anyhow!("CUDA device cache poisoned"))?;
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        if let Some(why) = cuda_unavailable_reason(ordinal) {
            bail!("CUDA device {ordinal} unavailable: {why}");
        }
        let ctx = CudaContext::new(ordinal).with_context(|| format!("creating a context on CUDA device {ordinal}"))?;
        let (major, minor) = ctx.compute_capability()?;
        if major < 8 {
            bail!("CUDA device {ordinal} has compute capability {major}.{minor}; irbridge kernels need 8.0 or newer");
        }
        let stream = ctx.default_stream();
        let dev = Arc::new(CudaDevice {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            use_cubin: (major, minor) == (9, 0),
        });
        map.insert(ordinal, dev.clone());
        Ok(dev)
    }

    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The stream all irbridge work on this device is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The GPU's name as the driver reports it.
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// Kernel `function` from the embedded module `module` (a `kernels/<module>.cu` stem).
    /// The module is loaded into this context on first use (sm_90 cubin on Hopper, PTX elsewhere).
    pub fn function(&self, module: &'static str, function: &str) -> Result<CudaFunction> {
        let m = {
            let mut cache = self.modules.lock().map_err(|_| anyhow!("CUDA module cache poisoned"))?;
            match cache.get(module) {
                Some(m) => m.clone(),
                None => {
                    let image = kernels::image(module)
                        .ok_or_else(|| anyhow!("kernel module `{module}` is not embedded in this build"))?;
                    let ptx = if self.use_cubin {
                        Ptx::from_binary(image.cubin_sm90.to_vec())
                    } else {
                        Ptx::from_src(image.ptx)
                    };
                    let m = self
                        .ctx
                        .load_module(ptx)
                        .with_context(|| format!("loading kernel module `{module}`"))?;
                    cache.insert(module, m.clone());
                    m
                }
            }
        };
        m.load_function(function)
            .with_context(|| format!("kernel `{function}` not found in module `{module}`"))
    }
}
