//! Parameters on the GPU: the fp32 master copy of every tensor (in [`ParamPlan`] order, so
//! gradients, moments and checkpoints line up by index with the CPU engine), plus, in bf16 mode,
//! a bf16 copy of each GEMM weight (see [`super::precision`]).

use super::precision::Precision;
use crate::device::CudaDevice;
use crate::model::params::{Block, Layout, ParamSpec, Tensors};
use anyhow::{Context, Result};
use cudarc::driver::CudaSlice;
use half::bf16;

/// The model's parameters on one GPU.
pub struct DeviceWeights {
    /// fp32 master of every parameter.
    pub(super) master: Vec<CudaSlice<f32>>,
    /// bf16 copies of the GEMM weights (`None` for other tensors, and for all in f32 mode).
    pub(super) half: Vec<Option<CudaSlice<bf16>>>,
}

/// The parameters cuBLAS reads: every linear/Conv1D weight and the LM head (the tied embedding
/// when the head is tied). Embedding tables are otherwise read in fp32 by the gather kernel.
pub fn gemm_weights(layout: &Layout) -> Vec<usize> {
    let mut out = Vec::new();
    for b in &layout.blocks {
        match b {
            Block::Gpt2(g) => {
                out.extend([
                    g.c_attn.weight,
                    g.attn_c_proj.weight,
                    g.c_fc.weight,
                    g.mlp_c_proj.weight,
                ]);
            }
            Block::Llama(l) => {
                out.extend([
                    l.q.weight,
                    l.k.weight,
                    l.v.weight,
                    l.o.weight,
                    l.gate.weight,
                    l.up.weight,
                    l.down.weight,
                ]);
            }
        }
    }
    out.push(layout.lm_head);
    out
}

impl DeviceWeights {
    /// Uploads `params` (bf16 copies rounded to nearest even on the host, as the AdamW kernel
    /// rounds them after every step).
    pub fn upload(dev: &CudaDevice, params: &Tensors, layout: &Layout, precision: Precision) -> Result<Self> {
        let s = dev.stream();
        let mut master = Vec::with_capacity(params.len());
        for (spec, data) in params.iter() {
            master.push(
                s.clone_htod(data)
                    .with_context(|| format!("uploading {} ({} floats)", spec.name, data.len()))?,
            );
        }
        let mut half: Vec<Option<CudaSlice<bf16>>> = (0..params.len()).map(|_| None).collect();
        if precision == Precision::Bf16 {
            for i in gemm_weights(layout) {
                if half[i].is_some() {
                    continue;
                }
                let h: Vec<bf16> = params.at(i).iter().map(|&x| bf16::from_f32(x)).collect();
                let spec = &params.specs()[i];
                half[i] = Some(
                    s.clone_htod(&h)
                        .with_context(|| format!("uploading the bf16 copy of {}", spec.name))?,
                );
            }
        }
        Ok(DeviceWeights { master, half })
    }

    /// The fp32 masters copied to the host, named and shaped by `specs`.
    pub fn download(&self, dev: &CudaDevice, specs: &[ParamSpec]) -> Result<Tensors> {
        download_all(dev, &self.master, specs)
    }

    /// Bytes held on the device.
    pub fn bytes(&self) -> usize {
        let m: usize = self.master.iter().map(|b| b.len() * 4).sum();
        let h: usize = self.half.iter().flatten().map(|b| b.len() * 2).sum();
        m + h
    }
}

/// Copies fp32 device tensors (one per spec) to a host [`Tensors`]; synchronises the stream.
pub fn download_all(dev: &CudaDevice, bufs: &[CudaSlice<f32>], specs: &[ParamSpec]) -> Result<Tensors> {
    let s = dev.stream();
    let mut data = Vec::with_capacity(bufs.len());
    for (b, spec) in bufs.iter().zip(specs) {
        data.push(s.clone_dtoh(b).with_context(|| format!("downloading {}", spec.name))?);
    }
    Ok(Tensors::from_parts(specs.to_vec(), data))
}
