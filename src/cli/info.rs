//! `irbridge info`: the build's kernels and the devices this machine offers.

use anyhow::Result;
use irbridge::device::{cuda_unavailable_reason, CudaDevice};
use irbridge::kernels;

/// Prints the embedded kernel modules, the CUDA device (or why there is none) and the CPU threads.
pub fn run() -> Result<()> {
    println!("irbridge {}", env!("CARGO_PKG_VERSION"));
    match kernels::TOOLCHAIN {
        Some(tc) => {
            let names: Vec<&str> = kernels::KERNEL_IMAGES.iter().map(|k| k.name).collect();
            println!(
                "kernels: {} modules compiled with {tc}: {}",
                names.len(),
                names.join(", ")
            );
        }
        None => println!("kernels: none (built without a CUDA compiler; CPU engine only)"),
    }
    match cuda_unavailable_reason(0) {
        None => {
            let dev = CudaDevice::get(0)?;
            println!("cuda:0: {}", dev.name()?);
        }
        Some(why) => println!("cuda: unavailable ({why}); using the CPU"),
    }
    println!("cpu: {} threads", rayon::current_num_threads());
    Ok(())
}
