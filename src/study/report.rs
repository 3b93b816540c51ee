//! The study's results: per seed and arm measurements, the table over seeds (JSON and
//! Markdown), and the SVG plots (reward vs KL, training curves).

use super::evaluate::PolicyEval;
use super::StudyConfig;
use crate::fsutil::write_atomic;
use crate::plot::{Chart, Series, Style};
use crate::train::metrics::{MetricsFile, METRICS_FILE};
use anyhow::Result;
use serde::Serialize;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Every file [`StudyResults::write`] may write at the top of the output folder (a rerun of the
/// demo removes exactly these, the seed folders, the marker and the implicit-reward page).
pub const REPORT_FILES: [&str; 8] = [
    "results.json",
    "results.md",
    "reward_vs_kl.svg",
    "frontier_learning_rate.svg",
    "frontier_objective.svg",
    "sft_loss.svg",
    "dpo_loss.svg",
    "dpo_accuracy.svg",
];

/// One arm of one seed.
#[derive(Clone, Debug, Serialize)]
pub struct ArmResult {
    /// Seed.
    pub seed: u64,
    /// Index into [`StudyConfig::arms`].
    pub arm: usize,
    /// The SFT model, sampled.
    pub sft: PolicyEval,
    /// The DPO model after it, sampled.
    pub dpo: PolicyEval,
    /// Win rate of this arm's DPO model against the default arm's DPO model under `r*`.
    pub win_rate: f64,
    /// Held-out ranking accuracy of the SFT model's implicit reward against the base model, on
    /// `[mixed, base-only]` pairs.
    pub sft_ranking: [f64; 2],
    /// Held-out ranking accuracy of the DPO model's implicit reward against its SFT reference,
    /// on `[mixed, base-only]` pairs.
    pub dpo_ranking: [f64; 2],
    /// The SFT run's folder (metrics, model).
    pub sft_dir: PathBuf,
    /// The DPO run's folder.
    pub dpo_dir: PathBuf,
}

/// The reference points of one seed.
#[derive(Clone, Debug, Serialize)]
pub struct SeedBaseline {
    /// Seed.
    pub seed: u64,
    /// The pre-trained base model, sampled (its KL is 0 by definition).
    pub base: PolicyEval,
    /// Mean `r*` of the true base distribution (what the base model imitates).
    pub base_distribution_reward: f64,
    /// Mean `r*` of the true expert distribution (what SFT imitates).
    pub expert_distribution_reward: f64,
}

/// Everything a study measured.
#[derive(Clone, Debug, Serialize)]
pub struct StudyResults {
    /// The configuration that produced it.
    pub config: StudyConfig,
    /// Per seed.
    pub baselines: Vec<SeedBaseline>,
    /// Per seed and arm.
    pub runs: Vec<ArmResult>,
}

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    let m = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (m, 0.0);
    }
    let var = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, var.sqrt())
}

/// The middle value (mean of the two middle ones for an even count); robust to the occasional
/// collapsed run that drags a mean down.
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn cell(xs: &[f64], digits: usize) -> String {
    let (m, sd) = mean_sd(xs);
    if xs.len() < 2 {
        format!("{m:.digits$}")
    } else {
        format!("{m:.digits$} ± {sd:.digits$}")
    }
}

impl StudyResults {
    fn of_arm(&self, arm: usize, f: impl Fn(&ArmResult) -> f64) -> Vec<f64> {
        self.runs.iter().filter(|r| r.arm == arm).map(f).collect()
    }

    /// The results table in Markdown: one row per arm, mean ± standard deviation over seeds.
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let mut s = String::from("# irbridge study results\n\n");
        let seeds: Vec<String> = c.seeds.iter().map(u64::to_string).collect();
        let _ = writeln!(
            s,
            "Seeds: {} ({}). Mean ± sd over seeds; r* = true reward (max 5.5), KL = KL(π‖π_base) in nats per response, \
             win = DPO model vs the `{}` pipeline's under r* (ties ½), errors = fraction of samples with a grammar error, \
             rank = held-out implicit-reward ranking accuracy on mixed / base-only pairs (SFT against the base model, \
             DPO against its SFT model).\n",
            c.seeds.len(),
            seeds.join(", "),
            c.arms.first().map(|a| a.label()).unwrap_or_default()
        );
        let b: Vec<f64> = self.baselines.iter().map(|b| b.base.reward).collect();
        let bd: Vec<f64> = self.baselines.iter().map(|b| b.base_distribution_reward).collect();
        let ed: Vec<f64> = self.baselines.iter().map(|b| b.expert_distribution_reward).collect();
        let _ = writeln!(
            s,
            "Base model r* {} (base distribution {}, expert distribution {}).\n",
            cell(&b, 3),
            cell(&bd, 3),
            cell(&ed, 3)
        );
        s.push_str(
            "| SFT arm | SFT lr | SFT r* | SFT KL | SFT rank | DPO r* | DPO r* median | DPO KL | DPO errors | DPO win vs default | DPO rank |\n",
        );
        s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (i, arm) in c.arms.iter().enumerate() {
            let g = |f: &dyn Fn(&ArmResult) -> f64, d: usize| cell(&self.of_arm(i, f), d);
            let rank = |f: &dyn Fn(&ArmResult) -> [f64; 2]| format!("{} / {}", g(&|r| f(r)[0], 3), g(&|r| f(r)[1], 3));
            let _ = writeln!(
                s,
                "| {} | {:.2e} | {} | {} | {} | {} | {:.3} | {} | {} | {} | {} |",
                arm.label(),
                c.sft.learning_rate * arm.lr_factor,
                g(&|r| r.sft.reward, 3),
                g(&|r| r.sft.kl, 2),
                rank(&|r| r.sft_ranking),
                g(&|r| r.dpo.reward, 3),
                median(&self.of_arm(i, |r| r.dpo.reward)),
                g(&|r| r.dpo.kl, 2),
                g(&|r| r.dpo.error_rate, 3),
                g(&|r| r.win_rate, 3),
                rank(&|r| r.dpo_ranking),
            );
        }
        s
    }

    /// Reward against KL: one point per model, SFT and DPO of every arm and seed, an arm's points
    /// in one colour and labelled by stage.
    fn reward_vs_kl(&self) -> Chart {
        let mut chart = Chart::new(
            "True reward vs KL to the base model (one point per model)",
            "KL(π ‖ π_base), nats per response",
            "mean r* of samples",
        );
        // Arms first, so each keeps the colour it has in the other charts; the base model last.
        for (i, arm) in self.config.arms.iter().enumerate() {
            let (mut pts, mut labels) = (Vec::new(), Vec::new());
            for r in self.runs.iter().filter(|r| r.arm == i) {
                pts.extend([(r.sft.kl, r.sft.reward), (r.dpo.kl, r.dpo.reward)]);
                labels.extend(["SFT".to_string(), "DPO".to_string()]);
            }
            chart = chart.with(Series::points(arm.label(), pts, labels));
        }
        let base: Vec<(f64, f64)> = self.baselines.iter().map(|b| (0.0, b.base.reward)).collect();
        let labels = vec!["base".to_string(); base.len()];
        chart.with(Series::points("base model", base, labels))
    }

    /// Median SFT and DPO model of each selected arm, joined SFT → DPO: how DPO moves each
    /// recipe on the reward-vs-KL plane. Medians over seeds, so one collapsed run does not stretch
    /// the axes.
    fn frontier(&self, title: &str, arms: &[usize]) -> Chart {
        let mut chart = Chart::new(
            title,
            "KL(π ‖ π_base), nats per response (median over seeds)",
            "mean r* of samples (median over seeds)",
        );
        for &i in arms {
            let m = |f: &dyn Fn(&ArmResult) -> f64| median(&self.of_arm(i, f));
            chart = chart.with(Series {
                name: self.config.arms[i].label(),
                points: vec![
                    (m(&|r| r.sft.kl), m(&|r| r.sft.reward)),
                    (m(&|r| r.dpo.kl), m(&|r| r.dpo.reward)),
                ],
                labels: vec!["SFT".into(), "DPO".into()],
                style: Style::LinePoints,
            });
        }
        chart
    }

    /// One metric of one stage's `metrics.jsonl` against the step, a line per arm (first seed).
    fn curves(&self, title: &str, key: &str, dpo: bool) -> Result<Chart> {
        let mut chart = Chart::new(title, "step", key);
        let first = self.config.seeds.first().copied();
        for r in self.runs.iter().filter(|r| Some(r.seed) == first) {
            let dir = if dpo { &r.dpo_dir } else { &r.sft_dir };
            let pts = MetricsFile::read(&dir.join(METRICS_FILE))?.points("step", key)?;
            chart = chart.with(Series::line(self.config.arms[r.arm].label(), pts));
        }
        Ok(chart)
    }

    /// Writes `results.json`, `results.md` and the plots into `dir`; returns the files written.
    pub fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut files = Vec::new();
        let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
            let p = dir.join(name);
            write_atomic(&p, bytes)?;
            files.push(p);
            Ok(())
        };
        put("results.json", (serde_json::to_string_pretty(self)? + "\n").as_bytes())?;
        put("results.md", self.markdown().as_bytes())?;
        put("reward_vs_kl.svg", self.reward_vs_kl().to_svg().as_bytes())?;
        // Claim (a): the first arm's objective at every learning rate; claim (b): every objective
        // at the first arm's learning rate.
        let arms = &self.config.arms;
        if let Some(first) = arms.first() {
            let by_lr: Vec<usize> = (0..arms.len())
                .filter(|&i| arms[i].sft_loss == first.sft_loss)
                .collect();
            let by_loss: Vec<usize> = (0..arms.len())
                .filter(|&i| arms[i].lr_factor == first.lr_factor)
                .collect();
            for (name, title, sel) in [
                (
                    "frontier_learning_rate.svg",
                    "SFT learning rate: SFT → DPO on the reward-vs-KL plane",
                    by_lr,
                ),
                (
                    "frontier_objective.svg",
                    "SFT objective: SFT → DPO on the reward-vs-KL plane",
                    by_loss,
                ),
            ] {
                if sel.len() > 1 {
                    put(name, self.frontier(title, &sel).to_svg().as_bytes())?;
                }
            }
        }
        for (name, title, key, dpo) in [
            ("sft_loss.svg", "SFT training loss", "loss", false),
            ("dpo_loss.svg", "DPO training loss", "loss", true),
            (
                "dpo_accuracy.svg",
                "DPO rewards/accuracies (training pairs)",
                "rewards/accuracies",
                true,
            ),
        ] {
            put(name, self.curves(title, key, dpo)?.to_svg().as_bytes())?;
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_and_spread() {
        assert_eq!(mean_sd(&[2.0]), (2.0, 0.0));
        let (m, sd) = mean_sd(&[1.0, 2.0, 3.0]);
        assert!((m - 2.0).abs() < 1e-12 && (sd - 1.0).abs() < 1e-12);
        assert_eq!(cell(&[1.0, 3.0], 1), "2.0 ± 1.4");
        assert_eq!(median(&[5.0, -3.0, 1.0]), 1.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
