//! GPU benchmark of the fused log-softmax + gather kernels against a device-to-device copy of the
//! same bytes, measured in the same run (`cargo bench --bench gpu_bench [-- --json PATH]`).
//!
//! For [8192 × 50257] and [8192 × 128256] in bf16 and f32: fused forward (with and without
//! entropy), fused forward + in-place backward as two launches and as one launch, and the unfused
//! baseline (fp32 [R, V] log-prob tensor, gather, backward reading it). Median of `--iters`
//! (default 25) CUDA-event-timed runs after 3 warm-ups.
//!
//! Bytes counted (logical minimum of each op, the same for the fused and unfused forms so GB/s
//! compares speed directly; `N = R·V·sizeof(dtype)`): copy 2N (read + write); forward N (read
//! once); forward + backward 3N (forward read, backward read + write; the one-launch form's ideal
//! HBM traffic is 2N because its second read should hit L2). The unfused path actually moves
//! 2N + 4RV (forward: two reads, fp32 write) and + 4RV + N for the backward.
//!
//! Without a usable GPU it prints `skipped: no GPU (<reason>)` and exits 0.

mod gpu_common;

use anyhow::{Context, Result};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, ValidAsZeroBits};
use half::bf16;
use irbridge::device::CudaDevice;
use irbridge::ops::logsoftmax::{
    backward_cuda, forward_backward_cuda, forward_cuda, unfused_backward_cuda, unfused_forward_cuda, CudaElem,
    CudaForwardOut, IGNORE_INDEX,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde::Serialize;
use std::sync::Arc;

const SHAPES: [(usize, usize); 2] = [(8192, 50257), (8192, 128256)];
const WARMUP: usize = 3;
/// Distinct random rows uploaded and tiled over the logits (uploading 4 GB of fresh random
/// numbers would dominate the run; the kernels' speed does not depend on row contents).
const PATTERN_ROWS: usize = 16;

/// One row of the results table.
#[derive(Serialize)]
struct Row {
    shape: String,
    dtype: &'static str,
    op: &'static str,
    median_ms: f64,
    bytes: u64,
    gb_per_s: f64,
    fraction_of_copy_bw: f64,
    time_over_copy: f64,
}

#[derive(Serialize)]
struct Report {
    device: String,
    iters: usize,
    byte_counts: &'static str,
    rows: Vec<Row>,
}

fn main() {
    gpu_common::main_with("gpu_bench", 25, 20, run);
}

fn run(args: &gpu_common::Args) -> Result<()> {
    let dev = CudaDevice::get(0)?;
    let device = dev.name()?;
    println!("gpu_bench on {device}, median of {} runs", args.iters);
    let mut rows = Vec::new();
    for (r, v) in SHAPES {
        bench_shape::<bf16>(&dev, r, v, args.iters, &mut rows)?;
        bench_shape::<f32>(&dev, r, v, args.iters, &mut rows)?;
    }
    let report = Report {
        device,
        iters: args.iters,
        byte_counts: "N = R*V*sizeof: copy 2N, forward N, forward+backward 3N (fused and unfused alike)",
        rows,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    Ok(())
}

/// Median milliseconds of `iters` back-to-back runs of `f`, each between two CUDA events on the
/// stream. The runs are queued without waiting for each other (one synchronisation at the end),
/// so host launch latency never shows as idle GPU time inside a measurement.
fn time_ms(stream: &Arc<CudaStream>, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..WARMUP {
        f()?;
    }
    let event = || stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT));
    let mut events = vec![event()?];
    for _ in 0..iters {
        f()?;
        events.push(event()?);
    }
    stream.synchronize()?;
    let mut ms = events
        .windows(2)
        .map(|w| Ok(w[0].elapsed_ms(&w[1])? as f64))
        .collect::<Result<Vec<f64>>>()?;
    ms.sort_by(|a, b| a.total_cmp(b));
    Ok(ms[ms.len() / 2])
}

/// Fills `x` with `PATTERN_ROWS` random N(0, 3²) rows repeated.
fn fill_logits<T: CudaElem>(stream: &Arc<CudaStream>, x: &mut CudaSlice<T>, rows: usize, vocab: usize) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(17);
    let normal = Normal::new(0.0f32, 3.0)?;
    let pattern: Vec<T> = (0..PATTERN_ROWS * vocab)
        .map(|_| T::from_f32(normal.sample(&mut rng)))
        .collect();
    let mut r0 = 0;
    while r0 < rows {
        let n = PATTERN_ROWS.min(rows - r0);
        stream.memcpy_htod(&pattern[..n * vocab], &mut x.slice_mut(r0 * vocab..(r0 + n) * vocab))?;
        r0 += n;
    }
    Ok(())
}

fn bench_shape<T: CudaElem + ValidAsZeroBits>(
    dev: &Arc<CudaDevice>,
    rows: usize,
    vocab: usize,
    iters: usize,
    out: &mut Vec<Row>,
) -> Result<()> {
    let s = dev.stream().clone();
    let n = rows * vocab;
    let nb = (n * std::mem::size_of::<T>()) as u64;
    let shape = format!("{rows}x{vocab}");
    eprintln!("{shape} {}: {:.2} GB of logits", T::NAME, nb as f64 / 1e9);

    let mut rng = StdRng::seed_from_u64(3);
    let targets: Vec<i64> = (0..rows)
        .map(|i| {
            if i % 20 == 19 {
                IGNORE_INDEX
            } else {
                rng.gen_range(0..vocab as i64)
            }
        })
        .collect();
    let d_t = s.clone_htod(&targets)?;
    let d_dlogp = s.clone_htod(&vec![-1.0f32 / rows as f32; rows])?;
    let mut lse: CudaSlice<f32> = s.alloc_zeros(rows)?;
    let mut logp: CudaSlice<f32> = s.alloc_zeros(rows)?;
    let mut ent: CudaSlice<f32> = s.alloc_zeros(rows)?;
    let mut x: CudaSlice<T> = s
        .alloc_zeros(n)
        .with_context(|| format!("allocating {shape} {} logits", T::NAME))?;
    fill_logits(&s, &mut x, rows, vocab)?;

    let copy_ms = {
        let mut dst: CudaSlice<T> = s.alloc_zeros(n).context("allocating the copy destination")?;
        time_ms(&s, iters, || Ok(s.memcpy_dtod(&x, &mut dst)?))?
    };
    let copy_gbs = 2.0 * nb as f64 / (copy_ms * 1e6);
    let mut push = |op: &'static str, ms: f64, bytes: u64| {
        let gbs = bytes as f64 / (ms * 1e6);
        out.push(Row {
            shape: shape.clone(),
            dtype: T::NAME,
            op,
            median_ms: ms,
            bytes,
            gb_per_s: gbs,
            fraction_of_copy_bw: gbs / copy_gbs,
            time_over_copy: ms / copy_ms,
        });
    };
    push("d2d copy (reference)", copy_ms, 2 * nb);

    let ms = time_ms(&s, iters, || {
        let o = CudaForwardOut {
            lse: lse.as_view_mut(),
            logp: logp.as_view_mut(),
            entropy: None,
        };
        forward_cuda(dev, &x.as_view(), rows, vocab, &d_t.as_view(), o)
    })?;
    push("fused fwd", ms, nb);
    let ms = time_ms(&s, iters, || {
        let o = CudaForwardOut {
            lse: lse.as_view_mut(),
            logp: logp.as_view_mut(),
            entropy: Some(ent.as_view_mut()),
        };
        forward_cuda(dev, &x.as_view(), rows, vocab, &d_t.as_view(), o)
    })?;
    push("fused fwd + entropy", ms, nb);

    // The in-place ops overwrite the logits with gradients; each series starts from fresh logits.
    fill_logits(&s, &mut x, rows, vocab)?;
    let ms = time_ms(&s, iters, || {
        let o = CudaForwardOut {
            lse: lse.as_view_mut(),
            logp: logp.as_view_mut(),
            entropy: None,
        };
        forward_cuda(dev, &x.as_view(), rows, vocab, &d_t.as_view(), o)?;
        backward_cuda(
            dev,
            &mut x.as_view_mut(),
            rows,
            vocab,
            &d_t.as_view(),
            &lse.as_view(),
            &d_dlogp.as_view(),
        )
    })?;
    push("fused fwd + bwd (2 launches)", ms, 3 * nb);

    fill_logits(&s, &mut x, rows, vocab)?;
    let ms = time_ms(&s, iters, || {
        let o = CudaForwardOut {
            lse: lse.as_view_mut(),
            logp: logp.as_view_mut(),
            entropy: None,
        };
        forward_backward_cuda(
            dev,
            &mut x.as_view_mut(),
            rows,
            vocab,
            &d_t.as_view(),
            &d_dlogp.as_view(),
            o,
        )
    })?;
    push("fused fwd+bwd (1 launch)", ms, 3 * nb);

    fill_logits(&s, &mut x, rows, vocab)?;
    {
        let mut full: CudaSlice<f32> = s
            .alloc_zeros(n)
            .with_context(|| format!("allocating the unfused fp32 {shape} tensor"))?;
        let ms = time_ms(&s, iters, || {
            let (mut l, mut p) = (lse.as_view_mut(), logp.as_view_mut());
            unfused_forward_cuda(
                dev,
                &x.as_view(),
                rows,
                vocab,
                &d_t.as_view(),
                &mut full.as_view_mut(),
                &mut l,
                &mut p,
            )
        })?;
        push("unfused fwd (baseline)", ms, nb);
        let ms = time_ms(&s, iters, || {
            let (mut l, mut p) = (lse.as_view_mut(), logp.as_view_mut());
            unfused_forward_cuda(
                dev,
                &x.as_view(),
                rows,
                vocab,
                &d_t.as_view(),
                &mut full.as_view_mut(),
                &mut l,
                &mut p,
            )?;
            unfused_backward_cuda(
                dev,
                &full.as_view(),
                rows,
                vocab,
                &d_t.as_view(),
                &d_dlogp.as_view(),
                &mut x.as_view_mut(),
            )
        })?;
        push("unfused fwd + bwd (baseline)", ms, 3 * nb);
    }
    s.synchronize()?;
    Ok(())
}

fn print_table(report: &Report) {
    println!();
    println!(
        "### irbridge log-softmax kernels on {} (median of {} runs)",
        report.device, report.iters
    );
    println!();
    println!("Bytes counted: {}.", report.byte_counts);
    println!();
    println!("| shape | dtype | op | median ms | GB counted | GB/s | × copy BW | time / copy |");
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for r in &report.rows {
        println!(
            "| {} | {} | {} | {:.3} | {:.2} | {:.0} | {:.2} | {:.2} |",
            r.shape,
            r.dtype,
            r.op,
            r.median_ms,
            r.bytes as f64 / 1e9,
            r.gb_per_s,
            r.fraction_of_copy_bw,
            r.time_over_copy
        );
    }
}
