//! irbridge as an embedded backend: the whole DPO loss side on buffers the caller owns.
//!
//! A trainer that already has its own model calls irbridge for what happens after the LM head:
//! logits `[rows, V]` for the chosen and rejected completions → per-token log-probs (fused
//! log-softmax + gather) → per-sequence sums over the completion mask → the DPO loss and its
//! metrics → d loss / d logits, written over the logits in place. Nothing here allocates a
//! `[rows, V]` buffer besides the caller's logits.
//!
//! The CPU path always runs; when a GPU is usable the same steps run on cudarc device buffers
//! and the two results are compared.
//!
//! `cargo run --release --example dpo_loss_side`

use anyhow::{anyhow, ensure, Result};
use cudarc::driver::CudaSlice;
use irbridge::device::{cuda_unavailable_reason, CudaDevice};
use irbridge::ops::logsoftmax::{self, CudaForwardOut, ForwardOut, IGNORE_INDEX};
use irbridge::ops::prefloss::PrefLossConfig;
use irbridge::ops::prefloss::{self, BatchMetrics, PairInputs, PairInputsCuda, PairOutputs, PairOutputsCuda};
use irbridge::ops::seqreduce::{self, Reduction, SeqReduceOut};

/// Pairs, completion length and vocabulary of the toy batch (V deliberately not a multiple of
/// any block size).
const PAIRS: usize = 2;
const SEQ: usize = 5;
const VOCAB: usize = 1003;

/// Row-major inputs of one batch: rows `0..PAIRS` are chosen, `PAIRS..2·PAIRS` rejected.
struct Inputs {
    logits: Vec<f32>,
    targets: Vec<i64>,
    mask: Vec<u8>,
    ref_logps: Vec<f32>,
}

fn toy_batch() -> Inputs {
    let rows = 2 * PAIRS * SEQ;
    // A deterministic, non-trivial pattern (no RNG needed for an example).
    let logits = (0..rows * VOCAB)
        .map(|i| ((i * 7919 % 1009) as f32 / 100.0).sin() * 4.0)
        .collect();
    let mut targets: Vec<i64> = (0..rows).map(|i| (i * 31 % VOCAB) as i64).collect();
    targets[SEQ - 1] = IGNORE_INDEX; // padding at the end of the first chosen row
    let mask = targets.iter().map(|&t| u8::from(t != IGNORE_INDEX)).collect();
    let ref_logps = vec![-35.0, -36.0, -34.5, -35.5]; // chosen 0, chosen 1, rejected 0, rejected 1
    Inputs {
        logits,
        targets,
        mask,
        ref_logps,
    }
}

/// Result of one pass: the batch metrics and d loss / d logits.
struct Pass {
    metrics: BatchMetrics,
    dlogits: Vec<f32>,
}

fn cpu_pass(cfg: &PrefLossConfig, x: &Inputs) -> Result<Pass> {
    let (seqs, rows) = (2 * PAIRS, 2 * PAIRS * SEQ);
    // 1. Per-token log-probs, reading the logits once.
    let (mut lse, mut logp) = (vec![0f32; rows], vec![0f32; rows]);
    let out = ForwardOut {
        lse: &mut lse,
        logp: &mut logp,
        entropy: None,
    };
    logsoftmax::forward_cpu(&x.logits, rows, VOCAB, &x.targets, out)?;
    // 2. Per-sequence sums over the completion mask.
    let (mut sums, mut counts, mut means) = (vec![0f32; seqs], vec![0i32; seqs], vec![0f32; seqs]);
    let out = SeqReduceOut {
        sums: &mut sums,
        counts: &mut counts,
        means: &mut means,
    };
    seqreduce::padded_forward_cpu(&logp, &x.mask, seqs, SEQ, out)?;
    // 3. The preference loss, per pair, with d loss / d policy log-probs.
    let inputs = PairInputs {
        policy_chosen: &sums[..PAIRS],
        policy_rejected: &sums[PAIRS..],
        ref_chosen: &x.ref_logps[..PAIRS],
        ref_rejected: &x.ref_logps[PAIRS..],
        chosen_counts: &counts[..PAIRS],
        rejected_counts: &counts[PAIRS..],
    };
    let mut o: [Vec<f32>; 7] = std::array::from_fn(|_| vec![0f32; PAIRS]);
    let [loss, dc, dr, rc, rr, mg, acc] = &mut o;
    prefloss::forward_cpu(
        cfg,
        &inputs,
        PairOutputs {
            loss,
            dpolicy_chosen: dc,
            dpolicy_rejected: dr,
            rewards_chosen: rc,
            rewards_rejected: rr,
            margins: mg,
            accuracies: acc,
        },
    )?;
    let metrics = BatchMetrics::from_pairs(&inputs, &o[0], &o[3], &o[4], &o[5], &o[6])?;
    // 4. Backward: the step loss is the mean over pairs, so each pair's gradient is scaled by 1/P;
    //    spread it over the sequence's tokens, then into the logits in place.
    let dseq: Vec<f32> = o[1].iter().chain(&o[2]).map(|g| g / PAIRS as f32).collect();
    let mut dlogp = vec![0f32; rows];
    seqreduce::padded_backward_cpu(&dseq, &counts, Reduction::Sum, &x.mask, seqs, SEQ, &mut dlogp)?;
    let mut dlogits = x.logits.clone();
    logsoftmax::backward_cpu(&mut dlogits, rows, VOCAB, &x.targets, &lse, &dlogp)?;
    Ok(Pass { metrics, dlogits })
}

fn cuda_pass(dev: &CudaDevice, cfg: &PrefLossConfig, x: &Inputs) -> Result<Pass> {
    let (seqs, rows) = (2 * PAIRS, 2 * PAIRS * SEQ);
    let s = dev.stream();
    // The caller's device buffers (a host trainer would already have these on the GPU).
    let mut logits = s.clone_htod(&x.logits)?;
    let targets = s.clone_htod(&x.targets)?;
    let mask = s.clone_htod(&x.mask)?;
    let (mut lse, mut logp) = (s.alloc_zeros::<f32>(rows)?, s.alloc_zeros::<f32>(rows)?);
    let out = CudaForwardOut {
        lse: lse.as_view_mut(),
        logp: logp.as_view_mut(),
        entropy: None,
    };
    logsoftmax::forward_cuda(dev, &logits.as_view(), rows, VOCAB, &targets.as_view(), out)?;
    let (mut sums, mut counts, mut means) = (
        s.alloc_zeros::<f32>(seqs)?,
        s.alloc_zeros::<i32>(seqs)?,
        s.alloc_zeros(seqs)?,
    );
    seqreduce::padded_forward_cuda(
        dev,
        &logp.as_view(),
        &mask.as_view(),
        seqs,
        SEQ,
        &mut sums.as_view_mut(),
        &mut counts.as_view_mut(),
        &mut means.as_view_mut(),
    )?;
    let refs = s.clone_htod(&x.ref_logps)?;
    let o: Vec<CudaSlice<f32>> = (0..7).map(|_| s.alloc_zeros::<f32>(PAIRS)).collect::<Result<_, _>>()?;
    let mut o: [CudaSlice<f32>; 7] = o.try_into().map_err(|_| anyhow!("seven per-pair outputs"))?;
    let mut views = o.each_mut().map(|b| b.as_view_mut());
    let [loss, dc, dr, rc, rr, mg, acc] = &mut views;
    let inputs = PairInputsCuda {
        policy_chosen: &sums.slice(..PAIRS),
        policy_rejected: &sums.slice(PAIRS..),
        ref_chosen: &refs.slice(..PAIRS),
        ref_rejected: &refs.slice(PAIRS..),
        chosen_counts: &counts.slice(..PAIRS),
        rejected_counts: &counts.slice(PAIRS..),
    };
    let out = PairOutputsCuda {
        loss,
        dpolicy_chosen: dc,
        dpolicy_rejected: dr,
        rewards_chosen: rc,
        rewards_rejected: rr,
        margins: mg,
        accuracies: acc,
    };
    prefloss::forward_cuda(dev, cfg, &inputs, out)?;
    // Metrics are host-side means of the per-pair outputs.
    let host: Vec<Vec<f32>> = o.iter().map(|b| s.clone_dtoh(b)).collect::<Result<_, _>>()?;
    let (hsums, hcounts) = (s.clone_dtoh(&sums)?, s.clone_dtoh(&counts)?);
    let inputs_h = PairInputs {
        policy_chosen: &hsums[..PAIRS],
        policy_rejected: &hsums[PAIRS..],
        ref_chosen: &x.ref_logps[..PAIRS],
        ref_rejected: &x.ref_logps[PAIRS..],
        chosen_counts: &hcounts[..PAIRS],
        rejected_counts: &hcounts[PAIRS..],
    };
    let metrics = BatchMetrics::from_pairs(&inputs_h, &host[0], &host[3], &host[4], &host[5], &host[6])?;
    let dseq: Vec<f32> = host[1].iter().chain(&host[2]).map(|g| g / PAIRS as f32).collect();
    let dseq = s.clone_htod(&dseq)?;
    let mut dlogp = s.alloc_zeros::<f32>(rows)?;
    seqreduce::padded_backward_cuda(
        dev,
        &dseq.as_view(),
        &counts.as_view(),
        Reduction::Sum,
        &mask.as_view(),
        seqs,
        SEQ,
        &mut dlogp.as_view_mut(),
    )?;
    logsoftmax::backward_cuda(
        dev,
        &mut logits.as_view_mut(),
        rows,
        VOCAB,
        &targets.as_view(),
        &lse.as_view(),
        &dlogp.as_view(),
    )?;
    Ok(Pass {
        metrics,
        dlogits: s.clone_dtoh(&logits)?,
    })
}

fn main() -> Result<()> {
    let cfg = PrefLossConfig::default(); // TRL defaults: sigmoid loss, β = 0.1
    let x = toy_batch();
    let cpu = cpu_pass(&cfg, &x)?;
    println!("CPU:  {:?}", cpu.metrics);
    match cuda_unavailable_reason(0) {
        Some(why) => println!("CUDA: skipped, no usable GPU ({why})"),
        None => {
            let dev = CudaDevice::get(0)?;
            let gpu = cuda_pass(&dev, &cfg, &x)?;
            println!("CUDA: {:?}", gpu.metrics);
            let worst = cpu
                .dlogits
                .iter()
                .zip(&gpu.dlogits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!("max |dlogits CPU − CUDA| = {worst:.3e}");
            ensure!(worst < 1e-6, "CPU and CUDA gradients disagree by {worst}");
        }
    }
    Ok(())
}
