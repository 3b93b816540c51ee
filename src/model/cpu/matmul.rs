//! Strided f32 matrix views and the one GEMM entry point (the `gemm` crate, multi-threaded on the
//! rayon pool).
//!
//! Views carry explicit row/column strides so that transposes (`nn.Linear` weights are `[out,
//! in]`) and column blocks (GPT-2's fused `c_attn` is `[C, 3C]` with `q|k|v` columns) are free:
//! no weight is ever copied or transposed in memory.

/// Geometry of a matrix inside a flat buffer: element `(i, j)` lives at
/// `offset + i·rs + j·cs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// Index of element (0, 0).
    pub offset: usize,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Distance between consecutive rows.
    pub rs: usize,
    /// Distance between consecutive columns.
    pub cs: usize,
}

impl View {
    /// A contiguous row-major `[rows, cols]` matrix.
    pub fn row_major(rows: usize, cols: usize) -> Self {
        Self {
            offset: 0,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose (swaps shape and strides; no data moves).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Columns `start..start + len`.
    pub fn cols(self, start: usize, len: usize) -> Self {
        assert!(
            start + len <= self.cols,
            "column block {start}+{len} outside {} columns",
            self.cols
        );
        Self {
            offset: self.offset + start * self.cs,
            cols: len,
            ..self
        }
    }

    /// One past the largest index the view touches (0 for an empty view).
    fn extent(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            0
        } else {
            self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `dst (+)= a · b` where `a` is `[m, k]`, `b` is `[k, n]`, `dst` is `[m, n]`, each a [`View`] into
/// its buffer. With `accumulate` the product is added to `dst`, otherwise `dst` is overwritten.
///
/// Shapes and bounds are checked (a mismatch is a bug in the caller, hence a panic, not an error).
/// `dst` must not overlap `a` or `b`, which the borrow checker already guarantees.
pub fn gemm(dst: &mut [f32], dv: View, a: &[f32], av: View, b: &[f32], bv: View, accumulate: bool) {
    assert_eq!(
        av.cols, bv.rows,
        "gemm: inner dimensions {}×{} · {}×{}",
        av.rows, av.cols, bv.rows, bv.cols
    );
    assert_eq!((dv.rows, dv.cols), (av.rows, bv.cols), "gemm: destination shape");
    assert!(dv.extent() <= dst.len(), "gemm: destination view outside its buffer");
    assert!(av.extent() <= a.len(), "gemm: left view outside its buffer");
    assert!(bv.extent() <= b.len(), "gemm: right view outside its buffer");
    if dv.rows == 0 || dv.cols == 0 {
        return;
    }
    if av.cols == 0 {
        if !accumulate {
            for i in 0..dv.rows {
                for j in 0..dv.cols {
                    dst[dv.offset + i * dv.rs + j * dv.cs] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: every index the kernel touches is `offset + i·rs + j·cs` with i, j inside the view,
    // and the extents were checked against the buffer lengths above; `dst` is a unique borrow, so
    // it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            dv.rows,
            dv.cols,
            av.cols,
            dst.as_mut_ptr().add(dv.offset),
            dv.cs as isize,
            dv.rs as isize,
            accumulate,
            a.as_ptr().add(av.offset),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr().add(bv.offset),
            bv.cs as isize,
            bv.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}
