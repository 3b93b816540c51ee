//! The CUDA engine's precision policy, in one place: master weights, gradients and AdamW moments
//! are always fp32; activations, logits and the weight matrices cuBLAS reads are stored as the
//! activation type — f32, or bf16 with every product and reduction accumulated in f32.
//!
//! In bf16 mode each matrix that feeds a GEMM (every linear weight and the LM head) has a bf16
//! copy next to its fp32 master; the fused AdamW kernel refreshes the copy in the same pass that
//! updates the master. Embedding tables, norm weights and biases are read in fp32 by their kernels
//! and have no copy.

use super::gemm::GemmElem;
use super::weights::DeviceWeights;
use crate::ops::logsoftmax::CudaElem;
use crate::ops::support::GpuElem;
use anyhow::{bail, Context, Result};
use cudarc::driver::CudaView;
use half::bf16;
use std::fmt;
use std::str::FromStr;

/// Storage type of activations and GEMM operands on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// Everything fp32 (cuBLAS without TF32): the mode for parity checks against the CPU.
    #[default]
    F32,
    /// bf16 activations and weight copies, fp32 accumulation, fp32 master weights.
    Bf16,
}

impl Precision {
    /// `f32` / `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Bytes per stored activation element.
    pub fn act_bytes(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;

    /// Accepts `f32` (`fp32`, `float32`) and `bf16` (`bfloat16`).
    fn from_str(s: &str) -> Result<Precision> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::Bf16),
            other => bail!("unknown dtype `{other}` (expected f32 or bf16)"),
        }
    }
}

/// An activation storage type: the kernels are instantiated for it ([`GpuElem`], [`CudaElem`]),
/// cuBLAS reads it ([`GemmElem`]), and it knows where its copy of a GEMM weight lives.
pub trait Act: GpuElem + CudaElem + GemmElem {
    /// The precision this type implements.
    const PRECISION: Precision;

    /// The matrix `index` as cuBLAS should read it in this precision.
    fn matrix(w: &DeviceWeights, index: usize) -> Result<CudaView<'_, Self>>;
}

impl Act for f32 {
    const PRECISION: Precision = Precision::F32;

    fn matrix(w: &DeviceWeights, index: usize) -> Result<CudaView<'_, f32>> {
        Ok(w.master[index].as_view())
    }
}

impl Act for bf16 {
    const PRECISION: Precision = Precision::Bf16;

    fn matrix(w: &DeviceWeights, index: usize) -> Result<CudaView<'_, bf16>> {
        w.half[index]
            .as_ref()
            .map(|h| h.as_view())
            .with_context(|| format!("parameter {index} has no bf16 copy (it is not a GEMM weight)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dtype_names() {
        assert_eq!("bf16".parse::<Precision>().unwrap(), Precision::Bf16);
        assert_eq!("Float32".parse::<Precision>().unwrap(), Precision::F32);
        assert!("f16".parse::<Precision>().is_err());
        assert_eq!(Precision::default().to_string(), "f32");
    }
}
