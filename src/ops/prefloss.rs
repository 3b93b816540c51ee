//! Preference (DPO-family) losses per pair with their gradients, rewards and batch metrics
//! (REFERENCE.md §3–§5, TRL v1.9 `loss_type` / `f_divergence_type` semantics).
//!
//! Inputs per pair: the policy and reference log-prob SUMS of the chosen and rejected completions
//! and their token counts. Per pair: `r = policy − ref` (raw log-ratio), `s = score(r)` (the
//! f-divergence score of §4), `Δ = s_w − s_l`. The loss of a pair is `Σ_k weight_k·loss_k` over the
//! configured terms, and its gradients are taken w.r.t. the two POLICY sums (the reference is a
//! constant). Rewards, margins and accuracies always use the raw log-ratios (`β·r`).
//!
//! Precision: the CPU twin is generic over f32/f64 inputs and outputs ([`Real`]) and does all of
//! its math in f64, so with f64 inputs it reproduces the f64 goldens to ~1e-12. The CUDA kernel
//! also does the per-pair math in f64 (pairs are few; f64 keeps `policy − ref` of sums near −500
//! and the `exp`s of the scores exact) and reads/writes f32.
//!
//! Stability: `logσ(x) = −softplus(−x)` with `softplus(x) = max(x,0) + log1p(e^{−|x|})`; σ is
//! evaluated on the non-overflowing side; discopop's `σ(z/τ)·e^{−z}` is formed as
//! `exp(logσ(z/τ) − z)`. The score exponents (`forward_kl`, `alpha_divergence`) are clamped at 80
//! (beyond it the score is constant, its derivative 0), so every value is finite in f64 for any
//! finite input; the per-pair values are finite for `|βΔ|` up to 1e4 and beyond.
//!
//! The `sft` term: the per-pair loss is `−logp_w · P / max(Σ_pairs |y_w|, 1)` with P the number of
//! pairs in the call, so its MEAN over the batch is the token-mean NLL of the chosen completions
//! (the TRL definition); its gradient is `−P / max(Σ|y_w|, 1)` w.r.t. the chosen policy sum. With
//! gradient accumulation over micro-batches, call with the whole window or rescale.
//! `aot` / `aot_unpaired` (they sort margins over the batch) are not implemented.

use anyhow::{bail, ensure, Result};
use cudarc::driver::{CudaView, CudaViewMut, DeviceRepr, LaunchConfig, PushKernelArg};
use rayon::prelude::*;
use std::fmt;
use std::str::FromStr;

use crate::device::CudaDevice;

/// A host scalar type the loss CPU twins accept (f32 or f64); all math happens in f64.
pub trait Real: Copy + Send + Sync + 'static {
    /// Exact widening to f64.
    fn to_f64(self) -> f64;
    /// Rounding from f64.
    fn from_f64(x: f64) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
}

impl Real for f64 {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
}

/// TRL v1.9 `loss_type` values (REFERENCE §3). The discriminant is the id the CUDA kernel uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(i32)]
pub enum LossType {
    /// `−logσ(βΔ)` (with label smoothing ε: `−(1−ε)logσ(βΔ) − ε·logσ(−βΔ)`, cDPO).
    Sigmoid = 0,
    /// `max(0, 1 − βΔ)`.
    Hinge = 1,
    /// `(s_w/n_w − s_l/n_l − 1/(2β))²` (length-normalised IPO).
    Ipo = 2,
    /// EXO: reverse KL between σ(βΔ) and the ε-smoothed label.
    ExoPair = 3,
    /// NCA: `−logσ(βs_w) − ½logσ(−βs_w) − ½logσ(−βs_l)`.
    NcaPair = 4,
    /// Robust DPO: `[−(1−ε)logσ(βΔ) + ε·logσ(−βΔ)] / (1−2ε)`.
    Robust = 5,
    /// BCO on pairs: `−logσ(βs_w) − logσ(−βs_l)` (no running-mean shift).
    BcoPair = 6,
    /// `(s_w − 1/(2β))² + (s_l + 1/(2β))²`.
    SppoHard = 7,
    /// `1 − σ(βr_w) + σ(βr_l)` on the RAW log-ratios.
    ApoZero = 8,
    /// `σ(βs_w) + 1 − σ(βΔ)`.
    ApoDown = 9,
    /// DiscoPOP: `(1−m)(−logσ(z)) + m·e^{−z}`, `z = βΔ`, `m = σ(z/τ)`.
    Discopop = 10,
    /// `−logσ(β(s_w/n_w − s_l/n_l))`.
    SigmoidNorm = 11,
    /// Token-mean NLL of the chosen completions (see the module docs for the per-pair form).
    Sft = 12,
}

impl LossType {
    /// Every supported loss type.
    pub const ALL: [LossType; 13] = [
        LossType::Sigmoid,
        LossType::Hinge,
        LossType::Ipo,
        LossType::ExoPair,
        LossType::NcaPair,
        LossType::Robust,
        LossType::BcoPair,
        LossType::SppoHard,
        LossType::ApoZero,
        LossType::ApoDown,
        LossType::Discopop,
        LossType::SigmoidNorm,
        LossType::Sft,
    ];

    /// The TRL name.
    pub fn name(self) -> &'static str {
        match self {
            LossType::Sigmoid => "sigmoid",
            LossType::Hinge => "hinge",
            LossType::Ipo => "ipo",
            LossType::ExoPair => "exo_pair",
            LossType::NcaPair => "nca_pair",
            LossType::Robust => "robust",
            LossType::BcoPair => "bco_pair",
            LossType::SppoHard => "sppo_hard",
            LossType::ApoZero => "apo_zero",
            LossType::ApoDown => "apo_down",
            LossType::Discopop => "discopop",
            LossType::SigmoidNorm => "sigmoid_norm",
            LossType::Sft => "sft",
        }
    }
}

impl fmt::Display for LossType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for LossType {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(t) = LossType::ALL.iter().find(|t| t.name() == s) {
            return Ok(*t);
        }
        if s == "aot" || s == "aot_unpaired" {
            bail!("loss_type `{s}` (sorted-margin AOT) is not supported by irbridge");
        }
        let names: Vec<&str> = LossType::ALL.iter().map(|t| t.name()).collect();
        bail!("unknown loss_type `{s}` (expected one of {})", names.join(", "))
    }
}

/// TRL `f_divergence_type`: the score `s(r)` applied to each raw log-ratio (REFERENCE §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(i32)]
pub enum FDivergence {
    /// `s = r` (standard DPO).
    #[default]
    ReverseKl = 0,
    /// `s = −e^{−r}` (exponent clamped at 80).
    ForwardKl = 1,
    /// `s = logσ(r)`.
    JsDivergence = 2,
    /// `s = e^{(α−1)r}/(α−1)` (exponent clamped at 80; α = 1 is reverse KL).
    AlphaDivergence = 3,
}

impl FDivergence {
    /// Every supported f-divergence.
    pub const ALL: [FDivergence; 4] = [
        FDivergence::ReverseKl,
        FDivergence::ForwardKl,
        FDivergence::JsDivergence,
        FDivergence::AlphaDivergence,
    ];

    /// The TRL name.
    pub fn name(self) -> &'static str {
        match self {
            FDivergence::ReverseKl => "reverse_kl",
            FDivergence::ForwardKl => "forward_kl",
            FDivergence::JsDivergence => "js_divergence",
            FDivergence::AlphaDivergence => "alpha_divergence",
        }
    }
}

impl fmt::Display for FDivergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FDivergence {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        FDivergence::ALL.iter().copied().find(|d| d.name() == s).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown f_divergence_type `{s}` (expected reverse_kl, forward_kl, js_divergence or alpha_divergence)"
            )
        })
    }
}

/// Most loss terms one config may combine (the kernel receives them as a fixed-size array).
pub const MAX_TERMS: usize = 8;

/// Largest exponent a score may take before it is held constant (REFERENCE §4).
pub const SCORE_EXP_CLAMP: f64 = 80.0;

/// Preference-loss configuration (TRL names and defaults in the field docs).
#[derive(Debug, Clone, PartialEq)]
pub struct PrefLossConfig {
    /// `(loss_type, weight)` terms summed per pair (TRL `loss_type` list + `loss_weights`).
    pub terms: Vec<(LossType, f64)>,
    /// β, the KL strength (TRL `beta`, default 0.1).
    pub beta: f64,
    /// The score applied to the log-ratios (TRL `f_divergence_type`, default `reverse_kl`).
    pub f_divergence: FDivergence,
    /// α of `alpha_divergence` (default 0.5).
    pub alpha: f64,
    /// Label smoothing of the `sigmoid` term (cDPO; TRL `label_smoothing`, default 0).
    pub label_smoothing: f64,
    /// ε of the `robust` term (TRL uses `label_smoothing`; default 0, which makes it `sigmoid`).
    pub robust_eps: f64,
    /// ε of the `exo_pair` term (TRL's default 1e-3 when `label_smoothing` is 0).
    pub exo_eps: f64,
    /// τ of `discopop` (TRL `discopop_tau`, default 0.05).
    pub discopop_tau: f64,
}

impl Default for PrefLossConfig {
    fn default() -> Self {
        PrefLossConfig {
            terms: vec![(LossType::Sigmoid, 1.0)],
            beta: 0.1,
            f_divergence: FDivergence::ReverseKl,
            alpha: 0.5,
            label_smoothing: 0.0,
            robust_eps: 0.0,
            exo_eps: 1e-3,
            discopop_tau: 0.05,
        }
    }
}

impl PrefLossConfig {
    /// The default config with the single term `loss_type` (weight 1).
    pub fn single(loss_type: LossType) -> Self {
        PrefLossConfig {
            terms: vec![(loss_type, 1.0)],
            ..Default::default()
        }
    }

    /// Checks every parameter is in the range where the losses are defined.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            !self.terms.is_empty(),
            "loss terms: at least one (loss_type, weight) is needed"
        );
        ensure!(
            self.terms.len() <= MAX_TERMS,
            "loss terms: at most {MAX_TERMS} supported, got {}",
            self.terms.len()
        );
        for (t, w) in &self.terms {
            ensure!(w.is_finite(), "loss weight of `{t}` must be finite, got {w}");
        }
        ensure!(
            self.beta.is_finite() && self.beta > 0.0,
            "beta must be positive and finite, got {}",
            self.beta
        );
        ensure!(self.alpha.is_finite(), "alpha must be finite, got {}", self.alpha);
        ensure!(
            (0.0..0.5).contains(&self.label_smoothing),
            "label_smoothing must be in [0, 0.5), got {}",
            self.label_smoothing
        );
        ensure!(
            (0.0..0.5).contains(&self.robust_eps),
            "robust epsilon must be in [0, 0.5), got {}",
            self.robust_eps
        );
        ensure!(
            self.exo_eps > 0.0 && self.exo_eps < 1.0,
            "exo_pair epsilon must be in (0, 1), got {}",
            self.exo_eps
        );
        ensure!(
            self.discopop_tau.is_finite() && self.discopop_tau > 0.0,
            "discopop_tau must be positive and finite, got {}",
            self.discopop_tau
        );
        Ok(())
    }

    fn has_sft(&self) -> bool {
        self.terms.iter().any(|(t, _)| *t == LossType::Sft)
    }
}

/// `log(1 + e^x)` without overflow.
#[inline]
pub fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// `log σ(x) = −softplus(−x)`.
#[inline]
pub fn log_sigmoid(x: f64) -> f64 {
    -softplus(-x)
}

/// σ(x), evaluated on the side where `e^{·}` cannot overflow.
#[inline]
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `(s(r), ds/dr)` for the configured f-divergence.
pub fn score(fdiv: FDivergence, alpha: f64, r: f64) -> (f64, f64) {
    match fdiv {
        FDivergence::ReverseKl => (r, 1.0),
        FDivergence::ForwardKl => {
            if -r > SCORE_EXP_CLAMP {
                (-SCORE_EXP_CLAMP.exp(), 0.0)
            } else {
                let e = (-r).exp();
                (-e, e)
            }
        }
        FDivergence::JsDivergence => (log_sigmoid(r), sigmoid(-r)),
        FDivergence::AlphaDivergence => {
            let a = alpha - 1.0;
            if a == 0.0 {
                return (r, 1.0);
            }
            let x = a * r;
            if x > SCORE_EXP_CLAMP {
                (SCORE_EXP_CLAMP.exp() / a, 0.0)
            } else {
                let e = x.exp();
                (e / a, e)
            }
        }
    }
}

/// One pair's inputs, in f64.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    /// Policy log-prob sum of the chosen completion.
    pub policy_chosen: f64,
    /// Policy log-prob sum of the rejected completion.
    pub policy_rejected: f64,
    /// Reference log-prob sum of the chosen completion.
    pub ref_chosen: f64,
    /// Reference log-prob sum of the rejected completion.
    pub ref_rejected: f64,
    /// Completion token count |y_w| (0 is treated as 1 where lengths normalise).
    pub chosen_count: i32,
    /// Completion token count |y_l|.
    pub rejected_count: i32,
}

/// A pair's weighted loss and its gradients w.r.t. the two policy sums.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    /// `Σ_k weight_k·loss_k`.
    pub loss: f64,
    /// d loss / d policy_chosen.
    pub dpolicy_chosen: f64,
    /// d loss / d policy_rejected.
    pub dpolicy_rejected: f64,
}

/// One term's value and partials: w.r.t. the scores (chained through `s'(r)` by the caller) and
/// directly w.r.t. the raw log-ratios (apo_zero, sft).
#[derive(Default)]
struct Term {
    loss: f64,
    ds_w: f64,
    ds_l: f64,
    dr_w: f64,
    dr_l: f64,
}

/// A loss `f(z)` of `z = β·Δ` with derivative `f'(z)` becomes a term in `(s_w, s_l)`.
fn of_margin(beta: f64, (loss, dz): (f64, f64)) -> Term {
    Term {
        loss,
        ds_w: beta * dz,
        ds_l: -beta * dz,
        ..Default::default()
    }
}

fn term(cfg: &PrefLossConfig, t: LossType, p: &Pair, s_w: f64, s_l: f64, sft_scale: f64) -> Term {
    let b = cfg.beta;
    let z = b * (s_w - s_l);
    let (n_w, n_l) = (p.chosen_count.max(1) as f64, p.rejected_count.max(1) as f64);
    match t {
        LossType::Sigmoid => {
            let e = cfg.label_smoothing;
            of_margin(
                b,
                (
                    (1.0 - e) * softplus(-z) + e * softplus(z),
                    -(1.0 - e) * sigmoid(-z) + e * sigmoid(z),
                ),
            )
        }
        LossType::Hinge => of_margin(b, if z < 1.0 { (1.0 - z, -1.0) } else { (0.0, 0.0) }),
        LossType::Ipo => {
            let d = s_w / n_w - s_l / n_l - 1.0 / (2.0 * b);
            Term {
                loss: d * d,
                ds_w: 2.0 * d / n_w,
                ds_l: -2.0 * d / n_l,
                ..Default::default()
            }
        }
        LossType::ExoPair => {
            let e = cfg.exo_eps;
            let (p1, p0) = (sigmoid(z), sigmoid(-z));
            let (c1, c0) = ((1.0 - e).ln(), e.ln());
            let loss = p1 * (log_sigmoid(z) - c1) + p0 * (log_sigmoid(-z) - c0);
            of_margin(b, (loss, p1 * p0 * (z - c1 + c0)))
        }
        LossType::NcaPair => {
            let (x, y) = (b * s_w, b * s_l);
            Term {
                loss: softplus(-x) + 0.5 * softplus(x) + 0.5 * softplus(y),
                ds_w: b * (-sigmoid(-x) + 0.5 * sigmoid(x)),
                ds_l: b * 0.5 * sigmoid(y),
                ..Default::default()
            }
        }
        LossType::Robust => {
            let e = cfg.robust_eps;
            let k = 1.0 / (1.0 - 2.0 * e);
            of_margin(
                b,
                (
                    k * ((1.0 - e) * softplus(-z) - e * softplus(z)),
                    k * (-(1.0 - e) * sigmoid(-z) - e * sigmoid(z)),
                ),
            )
        }
        LossType::BcoPair => {
            let (x, y) = (b * s_w, b * s_l);
            Term {
                loss: softplus(-x) + softplus(y),
                ds_w: -b * sigmoid(-x),
                ds_l: b * sigmoid(y),
                ..Default::default()
            }
        }
        LossType::SppoHard => {
            let a = 1.0 / (2.0 * b);
            let (u, v) = (s_w - a, s_l + a);
            Term {
                loss: u * u + v * v,
                ds_w: 2.0 * u,
                ds_l: 2.0 * v,
                ..Default::default()
            }
        }
        LossType::ApoZero => {
            let (x, y) = (
                b * (p.policy_chosen - p.ref_chosen),
                b * (p.policy_rejected - p.ref_rejected),
            );
            Term {
                loss: sigmoid(-x) + sigmoid(y),
                dr_w: -b * sigmoid(x) * sigmoid(-x),
                dr_l: b * sigmoid(y) * sigmoid(-y),
                ..Default::default()
            }
        }
        LossType::ApoDown => {
            let x = b * s_w;
            let dx = b * sigmoid(x) * sigmoid(-x);
            let dz = b * sigmoid(z) * sigmoid(-z);
            Term {
                loss: sigmoid(x) + sigmoid(-z),
                ds_w: dx - dz,
                ds_l: dz,
                ..Default::default()
            }
        }
        LossType::Discopop => {
            let tau = cfg.discopop_tau;
            let (lm, l1m) = (log_sigmoid(z / tau), log_sigmoid(-z / tau));
            let one_minus_m = sigmoid(-z / tau);
            let a = softplus(-z);
            let m_b = (lm - z).exp(); // m·e^{−z}
            let mm = (lm + l1m).exp(); // m(1−m)
            let mm_b = (lm + l1m - z).exp(); // m(1−m)·e^{−z}
            let dz = (mm_b - mm * a) / tau - one_minus_m * sigmoid(-z) - m_b;
            of_margin(b, (one_minus_m * a + m_b, dz))
        }
        LossType::SigmoidNorm => {
            let zn = b * (s_w / n_w - s_l / n_l);
            let g = b * sigmoid(-zn);
            Term {
                loss: softplus(-zn),
                ds_w: -g / n_w,
                ds_l: g / n_l,
                ..Default::default()
            }
        }
        LossType::Sft => Term {
            loss: -p.policy_chosen * sft_scale,
            dr_w: -sft_scale,
            ..Default::default()
        },
    }
}

/// The weighted loss of one pair and its policy gradients, in f64. `sft_scale` is
/// `P / max(Σ|y_w|, 1)` over the batch (only read by the `sft` term; see [`sft_scale`]).
pub fn pair_loss(cfg: &PrefLossConfig, p: &Pair, sft_scale: f64) -> PairLoss {
    let (r_w, r_l) = (p.policy_chosen - p.ref_chosen, p.policy_rejected - p.ref_rejected);
    let (s_w, ds_w) = score(cfg.f_divergence, cfg.alpha, r_w);
    let (s_l, ds_l) = score(cfg.f_divergence, cfg.alpha, r_l);
    let mut out = PairLoss {
        loss: 0.0,
        dpolicy_chosen: 0.0,
        dpolicy_rejected: 0.0,
    };
    for &(t, w) in &cfg.terms {
        let k = term(cfg, t, p, s_w, s_l, sft_scale);
        out.loss += w * k.loss;
        out.dpolicy_chosen += w * (k.ds_w * ds_w + k.dr_w);
        out.dpolicy_rejected += w * (k.ds_l * ds_l + k.dr_l);
    }
    out
}

/// `P / max(Σ|y_w|, 1)`: the per-pair factor that makes the mean of the `sft` term the
/// token-mean NLL of the chosen completions.
pub fn sft_scale(chosen_counts: &[i32]) -> f64 {
    let total: i64 = chosen_counts.iter().map(|&c| c.max(0) as i64).sum();
    chosen_counts.len() as f64 / total.max(1) as f64
}

/// Per-pair inputs (all slices of length P).
#[derive(Debug, Clone, Copy)]
pub struct PairInputs<'a, T> {
    /// Policy log-prob sums of the chosen completions.
    pub policy_chosen: &'a [T],
    /// Policy log-prob sums of the rejected completions.
    pub policy_rejected: &'a [T],
    /// Reference log-prob sums of the chosen completions.
    pub ref_chosen: &'a [T],
    /// Reference log-prob sums of the rejected completions.
    pub ref_rejected: &'a [T],
    /// Chosen completion token counts.
    pub chosen_counts: &'a [i32],
    /// Rejected completion token counts.
    pub rejected_counts: &'a [i32],
}

impl<T: Real> PairInputs<'_, T> {
    /// The number of pairs, after checking every slice has it and every value is usable.
    pub fn check(&self) -> Result<usize> {
        let n = self.policy_chosen.len();
        for (name, len) in [
            ("policy_rejected", self.policy_rejected.len()),
            ("ref_chosen", self.ref_chosen.len()),
            ("ref_rejected", self.ref_rejected.len()),
            ("chosen_counts", self.chosen_counts.len()),
            ("rejected_counts", self.rejected_counts.len()),
        ] {
            ensure!(
                len == n,
                "{name}: expected {n} entries (one per pair, as policy_chosen), got {len}"
            );
        }
        for (name, v) in [
            ("policy_chosen", self.policy_chosen),
            ("policy_rejected", self.policy_rejected),
            ("ref_chosen", self.ref_chosen),
            ("ref_rejected", self.ref_rejected),
        ] {
            if let Some(i) = v.iter().position(|x| !x.to_f64().is_finite()) {
                bail!("{name}[{i}] = {} is not finite", v[i].to_f64());
            }
        }
        for (name, v) in [
            ("chosen_counts", self.chosen_counts),
            ("rejected_counts", self.rejected_counts),
        ] {
            if let Some(i) = v.iter().position(|&c| c < 0) {
                bail!("{name}[{i}] = {} is negative", v[i]);
            }
        }
        Ok(n)
    }

    /// Pair `i` in f64.
    pub fn pair(&self, i: usize) -> Pair {
        Pair {
            policy_chosen: self.policy_chosen[i].to_f64(),
            policy_rejected: self.policy_rejected[i].to_f64(),
            ref_chosen: self.ref_chosen[i].to_f64(),
            ref_rejected: self.ref_rejected[i].to_f64(),
            chosen_count: self.chosen_counts[i],
            rejected_count: self.rejected_counts[i],
        }
    }
}

/// Per-pair outputs, caller-owned slices of length P.
pub struct PairOutputs<'a, T> {
    /// Weighted per-pair loss (the step loss is its mean).
    pub loss: &'a mut [T],
    /// d loss_i / d policy_chosen_i.
    pub dpolicy_chosen: &'a mut [T],
    /// d loss_i / d policy_rejected_i.
    pub dpolicy_rejected: &'a mut [T],
    /// `β·r_w` (raw log-ratio).
    pub rewards_chosen: &'a mut [T],
    /// `β·r_l`.
    pub rewards_rejected: &'a mut [T],
    /// `β·r_w − β·r_l`.
    pub margins: &'a mut [T],
    /// 1 when `β·r_w > β·r_l` (strict: ties give 0), else 0.
    pub accuracies: &'a mut [T],
}

impl<T> PairOutputs<'_, T> {
    fn check(&self, n: usize) -> Result<()> {
        for (name, len) in [
            ("loss", self.loss.len()),
            ("dpolicy_chosen", self.dpolicy_chosen.len()),
            ("dpolicy_rejected", self.dpolicy_rejected.len()),
            ("rewards_chosen", self.rewards_chosen.len()),
            ("rewards_rejected", self.rewards_rejected.len()),
            ("margins", self.margins.len()),
            ("accuracies", self.accuracies.len()),
        ] {
            ensure!(len == n, "{name}: expected {n} entries (one per pair), got {len}");
        }
        Ok(())
    }
}

/// CPU twin of the preference-loss kernel (f64 math whatever `T` is).
pub fn forward_cpu<T: Real>(cfg: &PrefLossConfig, inputs: &PairInputs<'_, T>, out: PairOutputs<'_, T>) -> Result<()> {
    cfg.validate()?;
    let n = inputs.check()?;
    out.check(n)?;
    let scale = if cfg.has_sft() {
        sft_scale(inputs.chosen_counts)
    } else {
        0.0
    };
    let b = cfg.beta;
    // Pairs are independent: compute in parallel (chunks of ≥ 256 pairs to amortise the
    // scheduling), then scatter into the caller's slices.
    let results: Vec<(PairLoss, f64, f64)> = (0..n)
        .into_par_iter()
        .with_min_len(256)
        .map(|i| {
            let p = inputs.pair(i);
            let rc = b * (p.policy_chosen - p.ref_chosen);
            let rr = b * (p.policy_rejected - p.ref_rejected);
            (pair_loss(cfg, &p, scale), rc, rr)
        })
        .collect();
    for (i, (l, rc, rr)) in results.into_iter().enumerate() {
        out.loss[i] = T::from_f64(l.loss);
        out.dpolicy_chosen[i] = T::from_f64(l.dpolicy_chosen);
        out.dpolicy_rejected[i] = T::from_f64(l.dpolicy_rejected);
        out.rewards_chosen[i] = T::from_f64(rc);
        out.rewards_rejected[i] = T::from_f64(rr);
        out.margins[i] = T::from_f64(rc - rr);
        out.accuracies[i] = T::from_f64(if rc > rr { 1.0 } else { 0.0 });
    }
    Ok(())
}

/// Batch means over pairs, under the metric names users plot (REFERENCE §5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchMetrics {
    /// Mean per-pair loss (the step loss).
    pub loss: f64,
    /// Mean `β·r_w`.
    pub rewards_chosen: f64,
    /// Mean `β·r_l`.
    pub rewards_rejected: f64,
    /// Mean `β·(r_w − r_l)`.
    pub rewards_margins: f64,
    /// Fraction of pairs with `β·r_w > β·r_l`.
    pub rewards_accuracies: f64,
    /// Mean policy log-prob sum of the chosen completions.
    pub logps_chosen: f64,
    /// Mean policy log-prob sum of the rejected completions.
    pub logps_rejected: f64,
}

impl BatchMetrics {
    /// Reduces per-pair results (from either backend, copied to the host) to batch means.
    pub fn from_pairs<T: Real>(
        inputs: &PairInputs<'_, T>,
        loss: &[T],
        rewards_chosen: &[T],
        rewards_rejected: &[T],
        margins: &[T],
        accuracies: &[T],
    ) -> Result<BatchMetrics> {
        let n = inputs.policy_chosen.len();
        ensure!(n > 0, "batch metrics: the batch has no pairs");
        ensure!(
            inputs.policy_rejected.len() == n,
            "policy_rejected: expected {n} entries, got {}",
            inputs.policy_rejected.len()
        );
        let mean = |name: &str, v: &[T]| -> Result<f64> {
            ensure!(
                v.len() == n,
                "{name}: expected {n} entries (one per pair), got {}",
                v.len()
            );
            Ok(v.iter().map(|x| x.to_f64()).sum::<f64>() / n as f64)
        };
        Ok(BatchMetrics {
            loss: mean("loss", loss)?,
            rewards_chosen: mean("rewards_chosen", rewards_chosen)?,
            rewards_rejected: mean("rewards_rejected", rewards_rejected)?,
            rewards_margins: mean("margins", margins)?,
            rewards_accuracies: mean("accuracies", accuracies)?,
            logps_chosen: mean("policy_chosen", inputs.policy_chosen)?,
            logps_rejected: mean("policy_rejected", inputs.policy_rejected)?,
        })
    }

    /// `(name, value)` in the TRL metric names.
    pub fn named(&self) -> [(&'static str, f64); 7] {
        [
            ("loss", self.loss),
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/margins", self.rewards_margins),
            ("rewards/accuracies", self.rewards_accuracies),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
        ]
    }
}

/// The kernel's parameter block, passed by value (layout mirrors `PrefParams` in
/// `kernels/prefloss.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct PrefParams {
    beta: f64,
    alpha: f64,
    label_smoothing: f64,
    robust_eps: f64,
    exo_eps: f64,
    tau: f64,
    fdiv: i32,
    n_terms: i32,
    ids: [i32; MAX_TERMS],
    weights: [f64; MAX_TERMS],
}

// SAFETY: plain-old-data with a C layout identical to the kernel's struct.
unsafe impl DeviceRepr for PrefParams {}

impl PrefParams {
    fn new(cfg: &PrefLossConfig) -> Self {
        let mut ids = [0i32; MAX_TERMS];
        let mut weights = [0f64; MAX_TERMS];
        for (k, (t, w)) in cfg.terms.iter().enumerate() {
            ids[k] = *t as i32;
            weights[k] = *w;
        }
        PrefParams {
            beta: cfg.beta,
            alpha: cfg.alpha,
            label_smoothing: cfg.label_smoothing,
            robust_eps: cfg.robust_eps,
            exo_eps: cfg.exo_eps,
            tau: cfg.discopop_tau,
            fdiv: cfg.f_divergence as i32,
            n_terms: cfg.terms.len() as i32,
            ids,
            weights,
        }
    }
}

/// Device-resident per-pair inputs (f32 log-prob sums, i32 counts), all of length P.
pub struct PairInputsCuda<'a, 'b> {
    /// Policy log-prob sums of the chosen completions.
    pub policy_chosen: &'a CudaView<'b, f32>,
    /// Policy log-prob sums of the rejected completions.
    pub policy_rejected: &'a CudaView<'b, f32>,
    /// Reference log-prob sums of the chosen completions.
    pub ref_chosen: &'a CudaView<'b, f32>,
    /// Reference log-prob sums of the rejected completions.
    pub ref_rejected: &'a CudaView<'b, f32>,
    /// Chosen completion token counts.
    pub chosen_counts: &'a CudaView<'b, i32>,
    /// Rejected completion token counts.
    pub rejected_counts: &'a CudaView<'b, i32>,
}

/// Device-resident per-pair outputs (see [`PairOutputs`]), all of length P.
pub struct PairOutputsCuda<'a, 'b> {
    /// Weighted per-pair loss.
    pub loss: &'a mut CudaViewMut<'b, f32>,
    /// d loss_i / d policy_chosen_i.
    pub dpolicy_chosen: &'a mut CudaViewMut<'b, f32>,
    /// d loss_i / d policy_rejected_i.
    pub dpolicy_rejected: &'a mut CudaViewMut<'b, f32>,
    /// `β·r_w`.
    pub rewards_chosen: &'a mut CudaViewMut<'b, f32>,
    /// `β·r_l`.
    pub rewards_rejected: &'a mut CudaViewMut<'b, f32>,
    /// `β·r_w − β·r_l`.
    pub margins: &'a mut CudaViewMut<'b, f32>,
    /// Strict accuracy (1 or 0).
    pub accuracies: &'a mut CudaViewMut<'b, f32>,
}

/// Threads per block of the preference-loss kernel.
const BLOCK: u32 = 256;

/// CUDA preference loss: ONE launch for the whole batch, every weighted term summed in the
/// kernel (f64 math, f32 I/O). Inputs are not checked for finiteness on the device.
pub fn forward_cuda(
    dev: &CudaDevice,
    cfg: &PrefLossConfig,
    inputs: &PairInputsCuda<'_, '_>,
    out: PairOutputsCuda<'_, '_>,
) -> Result<()> {
    cfg.validate()?;
    let n = inputs.policy_chosen.len();
    ensure!(n <= i32::MAX as usize, "policy_chosen: {n} pairs exceed the i32 range");
    for (name, len) in [
        ("policy_rejected", inputs.policy_rejected.len()),
        ("ref_chosen", inputs.ref_chosen.len()),
        ("ref_rejected", inputs.ref_rejected.len()),
        ("chosen_counts", inputs.chosen_counts.len()),
        ("rejected_counts", inputs.rejected_counts.len()),
        ("loss", out.loss.len()),
        ("dpolicy_chosen", out.dpolicy_chosen.len()),
        ("dpolicy_rejected", out.dpolicy_rejected.len()),
        ("rewards_chosen", out.rewards_chosen.len()),
        ("rewards_rejected", out.rewards_rejected.len()),
        ("margins", out.margins.len()),
        ("accuracies", out.accuracies.len()),
    ] {
        ensure!(
            len == n,
            "{name}: expected {n} entries (one per pair, as policy_chosen), got {len}"
        );
    }
    if n == 0 {
        return Ok(());
    }
    let params = PrefParams::new(cfg);
    let has_sft = cfg.has_sft() as i32;
    let n_i = n as i32;
    let f = dev.function("prefloss", "pref_loss_forward")?;
    let cfg_launch = LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(inputs.policy_chosen)
        .arg(inputs.policy_rejected)
        .arg(inputs.ref_chosen)
        .arg(inputs.ref_rejected)
        .arg(inputs.chosen_counts)
        .arg(inputs.rejected_counts)
        .arg(&n_i)
        .arg(&params)
        .arg(&has_sft)
        .arg(out.loss)
        .arg(out.dpolicy_chosen)
        .arg(out.dpolicy_rejected)
        .arg(out.rewards_chosen)
        .arg(out.rewards_rejected)
        .arg(out.margins)
        .arg(out.accuracies);
    // SAFETY: the argument list matches `pref_loss_forward`; every buffer holds n entries.
    unsafe { b.launch(cfg_launch) }?;
    Ok(())
}
