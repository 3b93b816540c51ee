//! Token embedding gather (+ GPT-2 learned positions) and its deterministic scatter-add backward.
//!
//! Forward: `out[n, :] = wte[ids[n], :] (+ wpe[pos[n], :])` for the N = B·T tokens; tables are
//! fp32 `[rows, C]`, the output is stored as `T`. With right padding the positions are simply
//! `0..T−1` on every row (HF's default `position_ids`), but any per-token positions work.
//!
//! Backward: `dW[r, :] += Σ_{n: idx[n] = r} dout[n, :]`, called once with the token buckets for
//! `wte` and once with the position buckets for `wpe`. [`TokenBuckets`] groups the tokens of each
//! table row on the host (a counting sort; ids come from the host tokenizer anyway), so every row
//! is owned by one CUDA block: no atomics, bitwise reproducible, and the CPU twin sums in the same
//! order (ascending token index, then one add into `dW`). The gradient *accumulates* into `dW`
//! (zero it first), which also serves tied embeddings.

use super::support::{cfg, dim_i32, ensure_len, GpuElem};
use crate::device::CudaDevice;
use crate::dtype::Elem;
use anyhow::{ensure, Result};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, PushKernelArg};
use rayon::prelude::*;

/// The tokens of each used table row, grouped on the host for the deterministic backward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBuckets {
    /// Table rows that occur, ascending.
    pub rows: Vec<i32>,
    /// `tokens[offsets[r]..offsets[r+1]]` are the token indices of `rows[r]`; length `rows.len()+1`.
    pub offsets: Vec<i32>,
    /// Token indices (positions in `ids`), ascending within each bucket.
    pub tokens: Vec<i32>,
    /// Rows of the table the indices refer to (V for `wte`, n_positions for `wpe`).
    pub table_rows: usize,
}

impl TokenBuckets {
    /// Groups `idx` (token ids or positions) by table row; `name` labels errors.
    pub fn new(name: &str, idx: &[u32], table_rows: usize) -> Result<TokenBuckets> {
        check_indices(name, idx, table_rows)?;
        dim_i32(&format!("{name}: token count"), idx.len())?;
        let mut count = vec![0i32; table_rows + 1];
        for &i in idx {
            count[i as usize + 1] += 1;
        }
        for r in 0..table_rows {
            count[r + 1] += count[r];
        }
        let mut fill = count.clone();
        let mut sorted = vec![0i32; idx.len()];
        for (n, &i) in idx.iter().enumerate() {
            sorted[fill[i as usize] as usize] = n as i32;
            fill[i as usize] += 1;
        }
        let (mut rows, mut offsets) = (Vec::new(), vec![0i32]);
        for r in 0..table_rows {
            if count[r + 1] > count[r] {
                rows.push(r as i32);
                offsets.push(count[r + 1]);
            }
        }
        Ok(TokenBuckets {
            rows,
            offsets,
            tokens: sorted,
            table_rows,
        })
    }

    /// Number of tokens the buckets cover.
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// [`TokenBuckets`] copied to the GPU for [`backward_cuda`].
pub struct DeviceBuckets {
    rows: CudaSlice<i32>,
    offsets: CudaSlice<i32>,
    tokens: CudaSlice<i32>,
    n_buckets: usize,
    num_tokens: usize,
    table_rows: usize,
}

impl DeviceBuckets {
    /// Uploads `b` on the device's stream.
    pub fn upload(dev: &CudaDevice, b: &TokenBuckets) -> Result<DeviceBuckets> {
        let s = dev.stream();
        // Empty host slices cannot be uploaded as zero-length allocations everywhere; pad by one.
        let pad = |v: &[i32]| if v.is_empty() { vec![0] } else { v.to_vec() };
        Ok(DeviceBuckets {
            rows: s.clone_htod(&pad(&b.rows))?,
            offsets: s.clone_htod(&b.offsets)?,
            tokens: s.clone_htod(&pad(&b.tokens))?,
            n_buckets: b.rows.len(),
            num_tokens: b.tokens.len(),
            table_rows: b.table_rows,
        })
    }
}

/// Per-token positions of a right-padded `[batch, seq]` batch: `0..seq` on every row, as HF
/// uses when no `position_ids` are given (valid tokens get `0..len`; padded ones are never read
/// by a loss). Feeds [`forward_cpu`] (GPT-2 `wpe`) and the rotary ops.
pub fn padded_positions(batch: usize, seq: usize) -> Vec<u32> {
    (0..batch * seq).map(|n| (n % seq.max(1)) as u32).collect()
}

fn check_indices(name: &str, idx: &[u32], rows: usize) -> Result<()> {
    if let Some((n, &i)) = idx.iter().enumerate().find(|(_, &i)| i as usize >= rows) {
        anyhow::bail!("{name}[{n}] = {i} is outside the table's {rows} rows");
    }
    Ok(())
}

fn check_forward(n_tokens: usize, wte_len: usize, c: usize, out_len: usize) -> Result<usize> {
    ensure!(c > 0, "wte: embedding width must be positive");
    ensure!(
        wte_len.is_multiple_of(c),
        "wte: {wte_len} elements is not a whole number of rows of {c}"
    );
    ensure_len("out", out_len, n_tokens * c)?;
    Ok(wte_len / c)
}

/// CPU twin of the forward. `pos` = (per-token positions, `wpe` `[P, C]`) for GPT-2.
pub fn forward_cpu<T: Elem>(
    ids: &[u32],
    wte: &[f32],
    pos: Option<(&[u32], &[f32])>,
    c: usize,
    out: &mut [T],
) -> Result<()> {
    let v = check_forward(ids.len(), wte.len(), c, out.len())?;
    check_indices("ids", ids, v)?;
    if let Some((p, wpe)) = pos {
        ensure_len("positions", p.len(), ids.len())?;
        ensure!(
            wpe.len().is_multiple_of(c),
            "wpe: {} elements is not a whole number of rows of {c}",
            wpe.len()
        );
        check_indices("positions", p, wpe.len() / c)?;
    }
    out.par_chunks_mut(c).enumerate().for_each(|(n, o)| {
        let e = &wte[ids[n] as usize * c..][..c];
        match pos {
            Some((p, wpe)) => {
                let w = &wpe[p[n] as usize * c..][..c];
                for ((o, &a), &b) in o.iter_mut().zip(e).zip(w) {
                    *o = T::from_f32(a + b);
                }
            }
            None => {
                for (o, &a) in o.iter_mut().zip(e) {
                    *o = T::from_f32(a);
                }
            }
        }
    });
    Ok(())
}

/// CPU twin of the backward: `dweight[r, :] += Σ dout[n, :]` over the tokens bucketed to row r.
pub fn backward_cpu<T: Elem>(dout: &[T], buckets: &TokenBuckets, c: usize, dweight: &mut [f32]) -> Result<()> {
    ensure!(c > 0, "dweight: embedding width must be positive");
    ensure_len("dout", dout.len(), buckets.num_tokens() * c)?;
    ensure_len("dweight", dweight.len(), buckets.table_rows * c)?;
    let mut slot = vec![usize::MAX; buckets.table_rows];
    for (k, &r) in buckets.rows.iter().enumerate() {
        slot[r as usize] = k;
    }
    dweight.par_chunks_mut(c).enumerate().for_each(|(r, g)| {
        let k = slot[r];
        if k == usize::MAX {
            return;
        }
        let toks = &buckets.tokens[buckets.offsets[k] as usize..buckets.offsets[k + 1] as usize];
        for (j, gj) in g.iter_mut().enumerate() {
            let mut acc = 0f32;
            for &t in toks {
                acc += dout[t as usize * c + j].to_f32();
            }
            *gj += acc;
        }
    });
    Ok(())
}

/// CUDA forward on caller-owned buffers. Ids/positions are not range-checked on the device (the
/// host validates them when it builds [`TokenBuckets`]); an out-of-range one yields a NaN row.
pub fn forward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    ids: &CudaView<u32>,
    wte: &CudaView<f32>,
    pos: Option<(&CudaView<u32>, &CudaView<f32>)>,
    c: usize,
    out: &mut CudaViewMut<T>,
) -> Result<()> {
    let n = ids.len();
    let v = check_forward(n, wte.len(), c, out.len())?;
    let (n_i, c_i, v_i) = (dim_i32("tokens", n)?, dim_i32("C", c)?, dim_i32("wte rows", v)?);
    if n == 0 {
        return Ok(());
    }
    let lc = cfg((n as u32, 1, 1), (256.min(c.next_multiple_of(32)) as u32, 1, 1));
    match pos {
        Some((p, wpe)) => {
            ensure_len("positions", p.len(), n)?;
            ensure!(
                wpe.len().is_multiple_of(c),
                "wpe: {} elements is not a whole number of rows of {c}",
                wpe.len()
            );
            let p_i = dim_i32("wpe rows", wpe.len() / c)?;
            let f = dev.function("embedding", &format!("embedding_forward_pos_{}", T::SUFFIX))?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(ids)
                .arg(wte)
                .arg(&v_i)
                .arg(p)
                .arg(wpe)
                .arg(&p_i)
                .arg(out)
                .arg(&n_i)
                .arg(&c_i);
            unsafe { b.launch(lc) }?;
        }
        None => {
            let f = dev.function("embedding", &format!("embedding_forward_{}", T::SUFFIX))?;
            let mut b = dev.stream().launch_builder(&f);
            b.arg(ids).arg(wte).arg(&v_i).arg(out).arg(&n_i).arg(&c_i);
            unsafe { b.launch(lc) }?;
        }
    }
    Ok(())
}

/// CUDA backward: accumulates into `dweight` `[table_rows, C]`, deterministic (see module docs).
pub fn backward_cuda<T: GpuElem>(
    dev: &CudaDevice,
    dout: &CudaView<T>,
    buckets: &DeviceBuckets,
    c: usize,
    dweight: &mut CudaViewMut<f32>,
) -> Result<()> {
    ensure!(c > 0, "dweight: embedding width must be positive");
    ensure_len("dout", dout.len(), buckets.num_tokens * c)?;
    ensure_len("dweight", dweight.len(), buckets.table_rows * c)?;
    if buckets.n_buckets == 0 {
        return Ok(());
    }
    let (nb, c_i) = (dim_i32("buckets", buckets.n_buckets)?, dim_i32("C", c)?);
    let f = dev.function("embedding", &format!("embedding_backward_{}", T::SUFFIX))?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(dout)
        .arg(&buckets.rows)
        .arg(&buckets.offsets)
        .arg(&buckets.tokens)
        .arg(&nb)
        .arg(&c_i)
        .arg(dweight);
    unsafe { b.launch(cfg((nb as u32, 1, 1), (256.min(c.next_multiple_of(32)) as u32, 1, 1))) }?;
    Ok(())
}
