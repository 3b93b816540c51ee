//! Where computation runs: the CPU (always) or a CUDA GPU (when a driver, a device and embedded
//! kernels are all present).
//!
//! This is the crate's only backend seam: ops take a [`Device`]-specific buffer type (`&[T]` on
//! the CPU, cudarc slices on CUDA) and each op module has a CPU twin and a CUDA launcher with the
//! same semantics.

mod cuda;

pub use cuda::{cublas_unavailable_reason, cuda_unavailable_reason, CudaDevice};

use anyhow::{bail, Result};
use std::fmt;
use std::str::FromStr;

/// A compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host CPU (multi-threaded with rayon).
    Cpu,
    /// CUDA device with the given ordinal.
    Cuda(usize),
}

impl Device {
    /// CUDA device 0 when it is usable, else the CPU. Never panics, even without a driver.
    pub fn auto() -> Device {
        if cuda_unavailable_reason(0).is_none() {
            Device::Cuda(0)
        } else {
            Device::Cpu
        }
    }

    /// Checks that the device can be used, with a plain error saying why not.
    pub fn ensure_available(self) -> Result<Device> {
        if let Device::Cuda(n) = self {
            if let Some(why) = cuda_unavailable_reason(n) {
                bail!("CUDA device {n} requested but unavailable: {why}");
            }
        }
        Ok(self)
    }

    /// True for [`Device::Cuda`].
    pub fn is_cuda(self) -> bool {
        matches!(self, Device::Cuda(_))
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = anyhow::Error;

    /// Accepts `cpu`, `cuda`, `cuda:N` and `auto`.
    fn from_str(s: &str) -> Result<Device> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "auto" => Ok(Device::auto()),
            "cuda" | "gpu" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Device::Cuda(n)),
                _ => bail!("unknown device `{s}` (expected cpu, cuda, cuda:N or auto)"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_names() {
        assert_eq!("cpu".parse::<Device>().unwrap(), Device::Cpu);
        assert_eq!("cuda".parse::<Device>().unwrap(), Device::Cuda(0));
        assert_eq!("CUDA:3".parse::<Device>().unwrap(), Device::Cuda(3));
        assert!("tpu".parse::<Device>().is_err());
        assert!("cuda:x".parse::<Device>().is_err());
    }

    #[test]
    fn auto_never_panics_and_cpu_is_always_available() {
        let d = Device::auto();
        assert!(d.ensure_available().is_ok());
        assert!(Device::Cpu.ensure_available().is_ok());
    }
}
