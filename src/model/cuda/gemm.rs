//! Every matrix product of the CUDA engine, through one cuBLAS entry point (`cublasGemmEx` with
//! `CUBLAS_COMPUTE_32F`), written in row-major terms.
//!
//! cuBLAS is column-major; a row-major `[r, c]` matrix with row stride `ld` is the column-major
//! `[c, r]` matrix with leading dimension `ld`. So the row-major product `C = op(A)·op(B)` is
//! issued as the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLAS's first operand is `B`, its second is
//! `A`, `M = n`, `N = m`, and each operand's "transposed" flag carries over unchanged. Strided
//! [`MatLayout`]s make `nn.Linear`'s `[out, in]` weights (a transposed read) and GPT-2's fused
//! `c_attn` (a column block of a `[C, 3C]` Conv1D weight, row stride `3C`) free: no weight is ever
//! copied or transposed in memory.
//!
//! Precision: inputs `f32`·`f32` or `bf16`·`bf16`, the output the same type (activations) or f32
//! (weight gradients, accumulated with β = 1 into the fp32 gradient buffers); cuBLAS accumulates
//! in f32 in every case. `CUBLAS_COMPUTE_32F` never uses TF32 (that needs `_FAST_TF32` or the
//! TF32 math mode, which this handle never sets), so the f32 mode is true fp32.

use crate::device::CudaDevice;
use anyhow::{bail, ensure, Context, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};
use cudarc::cublas::{result as cublas_result, CudaBlas};
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut};
use half::bf16;
use std::sync::Arc;

/// Element types cuBLAS reads and writes for the engine.
pub trait GemmElem: Copy + 'static {
    /// The cuBLAS data type.
    const DATA_TYPE: cudaDataType_t;
}

impl GemmElem for f32 {
    const DATA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_32F;
}

impl GemmElem for bf16 {
    const DATA_TYPE: cudaDataType_t = cudaDataType_t::CUDA_R_16BF;
}

/// A row-major matrix inside a device view: `rows × cols` as stored, row stride `ld`, read
/// transposed when `trans` (so the logical matrix is `cols × rows`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatLayout {
    /// Stored rows.
    pub rows: usize,
    /// Stored columns.
    pub cols: usize,
    /// Distance between consecutive stored rows (≥ `cols`).
    pub ld: usize,
    /// Read as the transpose.
    pub trans: bool,
}

impl MatLayout {
    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn rm(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            ld: cols,
            trans: false,
        }
    }

    /// `cols` columns of a row-major matrix whose rows are `ld` apart (the view starts at the
    /// block's first column).
    pub fn block(rows: usize, cols: usize, ld: usize) -> Self {
        Self {
            rows,
            cols,
            ld,
            trans: false,
        }
    }

    /// The same storage read transposed.
    pub fn t(self) -> Self {
        Self {
            trans: !self.trans,
            ..self
        }
    }

    /// Logical `(rows, cols)`.
    fn logical(&self) -> (usize, usize) {
        if self.trans {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Elements from the first to one past the last touched.
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.ld + self.cols
        }
    }

    fn check(&self, what: &str, operand: &str, len: usize) -> Result<()> {
        ensure!(
            self.ld >= self.cols.max(1),
            "{what}: {operand} has row stride {} < {} columns",
            self.ld,
            self.cols
        );
        ensure!(
            self.extent() <= len,
            "{what}: {operand} [{} × {}, stride {}] needs {} elements, its buffer has {len}",
            self.rows,
            self.cols,
            self.ld,
            self.extent()
        );
        Ok(())
    }

    fn op(&self) -> cublasOperation_t {
        if self.trans {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        }
    }
}

fn int(what: &str, name: &str, v: usize) -> Result<i32> {
    i32::try_from(v).with_context(|| format!("{what}: {name} = {v} exceeds cuBLAS's i32 range"))
}

/// The engine's cuBLAS handle, bound to the device's stream (so products are ordered with the
/// custom kernels without any synchronisation).
pub struct Blas {
    blas: CudaBlas,
    dev: Arc<CudaDevice>,
}

impl Blas {
    /// Creates a handle on `dev`'s stream. Fails with a plain error when libcublas cannot be
    /// loaded (cudarc would panic at the first call instead).
    pub fn new(dev: Arc<CudaDevice>) -> Result<Self> {
        if let Some(why) = crate::device::cublas_unavailable_reason() {
            bail!("cuBLAS unavailable: {why}");
        }
        let blas = CudaBlas::new(dev.stream().clone()).context("creating the cuBLAS handle")?;
        Ok(Blas { blas, dev })
    }

    /// `C (+)= op(A)·op(B)` in row-major terms (see the module docs): `A` is logically `[m, k]`,
    /// `B` `[k, n]`, `C` `[m, n]` (never transposed). With `accumulate`, `C += A·B` (β = 1),
    /// otherwise `C = A·B`. `what` names the product in errors (e.g. `layer 3 q_proj forward`).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul<TA: GemmElem, TB: GemmElem, TC: GemmElem>(
        &self,
        what: &str,
        c: &mut CudaViewMut<TC>,
        cl: MatLayout,
        a: &CudaView<TA>,
        al: MatLayout,
        b: &CudaView<TB>,
        bl: MatLayout,
        accumulate: bool,
    ) -> Result<()> {
        ensure!(
            TA::DATA_TYPE == TB::DATA_TYPE,
            "{what}: operands of different types ({:?}, {:?})",
            TA::DATA_TYPE,
            TB::DATA_TYPE
        );
        ensure!(
            TC::DATA_TYPE == TA::DATA_TYPE || TC::DATA_TYPE == cudaDataType_t::CUDA_R_32F,
            "{what}: output type {:?} for {:?} inputs (only the same type or f32 is supported)",
            TC::DATA_TYPE,
            TA::DATA_TYPE
        );
        ensure!(!cl.trans, "{what}: the output cannot be transposed");
        let ((m, k), (k2, n)) = (al.logical(), bl.logical());
        ensure!(k == k2, "{what}: inner dimensions disagree ({m}×{k} · {k2}×{n})");
        ensure!(
            (cl.rows, cl.cols) == (m, n),
            "{what}: output is {}×{}, the product is {m}×{n}",
            cl.rows,
            cl.cols
        );
        al.check(what, "left operand", a.len())?;
        bl.check(what, "right operand", b.len())?;
        cl.check(what, "output", c.len())?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        if k == 0 {
            ensure!(accumulate, "{what}: empty inner dimension with an overwritten output");
            return Ok(());
        }
        let (mi, ni, ki) = (int(what, "m", m)?, int(what, "n", n)?, int(what, "k", k)?);
        let (lda, ldb, ldc) = (
            int(what, "ld", bl.ld)?,
            int(what, "ld", al.ld)?,
            int(what, "ld", cl.ld)?,
        );
        let alpha = 1f32;
        let beta = if accumulate { 1f32 } else { 0f32 };
        // cuBLAS runs in the calling thread's current context; tests and callers may use the
        // model from several threads.
        self.dev
            .context()
            .bind_to_thread()
            .context("binding the CUDA context")?;
        let stream = self.dev.stream();
        let (pa, _ra) = a.device_ptr(stream);
        let (pb, _rb) = b.device_ptr(stream);
        let (pc, _rc) = c.device_ptr_mut(stream);
        // SAFETY: the handle is bound to `stream`; the extents of all three matrices were checked
        // against their views above; alpha/beta are host f32 scalars, as CUBLAS_COMPUTE_32F with
        // the default host pointer mode requires; the record guards outlive the call.
        unsafe {
            cublas_result::gemm_ex(
                *self.blas.handle(),
                bl.op(),
                al.op(),
                ni,
                mi,
                ki,
                (&alpha) as *const f32 as *const _,
                pb as *const _,
                TB::DATA_TYPE,
                lda,
                pa as *const _,
                TA::DATA_TYPE,
                ldb,
                (&beta) as *const f32 as *const _,
                pc as *mut _,
                TC::DATA_TYPE,
                ldc,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .with_context(|| format!("{what}: cublasGemmEx ({m}×{k} · {k}×{n})"))?;
        Ok(())
    }
}
