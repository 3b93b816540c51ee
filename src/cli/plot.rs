//! `irbridge plot`: training curves from one or more `metrics.jsonl` files (the trainers'
//! output, one JSON object per line) as an SVG chart, so a run can be looked at without Python.
//!
//! Each chosen key becomes a series against `--x` (default `step`); with several files every
//! (file, key) pair is its own series, labelled by the run (the file's folder name, or
//! `--labels`). Lines without a key are skipped for that key (train and eval lines share the
//! file), and so are `null` values (non-finite numbers, as the trainer logs them). Everything is
//! read and checked before the chart is written: a malformed line names its file and line, a key
//! no line has names the key, the file and the keys it does have.

use anyhow::{ensure, Result};
use clap::Args;
use irbridge::plot::{Chart, Series};
use irbridge::train::metrics::MetricsFile;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Flags of `plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// A metrics.jsonl file; repeat the flag for several runs.
    #[arg(long = "metrics", required = true)]
    pub metrics: Vec<PathBuf>,
    /// Keys to plot, comma-separated (e.g. loss,eval_loss or rewards/accuracies).
    #[arg(long, value_delimiter = ',', required = true)]
    pub keys: Vec<String>,
    /// Key of the x axis.
    #[arg(long, default_value = "step")]
    pub x: String,
    /// Output file (.svg).
    #[arg(long)]
    pub output: PathBuf,
    /// Chart title (default: the keys against the x key).
    #[arg(long)]
    pub title: Option<String>,
    /// Run labels, comma-separated, one per --metrics file (default: each file's folder name).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
}

/// The run's default label: the folder holding the file (`runs/sft/metrics.jsonl` → `sft`).
fn default_label(run: &MetricsFile) -> String {
    run.path
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.path.display().to_string())
}

/// Reads every file, builds the chart, writes it.
pub fn run(args: &PlotArgs) -> Result<()> {
    ensure!(
        args.output.extension().is_some_and(|e| e == "svg"),
        "--output {}: charts are written as SVG; use a .svg file name",
        args.output.display()
    );
    let keys: Vec<&str> = args.keys.iter().map(|k| k.trim()).filter(|k| !k.is_empty()).collect();
    ensure!(
        !keys.is_empty(),
        "--keys: give at least one key, e.g. --keys loss,eval_loss"
    );
    ensure!(
        args.labels.is_empty() || args.labels.len() == args.metrics.len(),
        "--labels: {} labels for {} --metrics files",
        args.labels.len(),
        args.metrics.len()
    );
    let runs: Vec<MetricsFile> = args
        .metrics
        .iter()
        .map(|p| MetricsFile::read(p))
        .collect::<Result<_>>()?;
    let mut labels: Vec<String> = if args.labels.is_empty() {
        runs.iter().map(default_label).collect()
    } else {
        args.labels.clone()
    };
    // Two runs in folders of the same name would share a legend entry: fall back to paths.
    if args.labels.is_empty() && labels.iter().collect::<BTreeSet<_>>().len() < labels.len() {
        labels = runs.iter().map(|r| r.path.display().to_string()).collect();
    }
    let title = args
        .title
        .clone()
        .unwrap_or_else(|| format!("{} vs {}", keys.join(", "), args.x));
    let y_label = if keys.len() == 1 { keys[0] } else { "value" };
    let mut chart = Chart::new(title, args.x.as_str(), y_label);
    for (run, label) in runs.iter().zip(&labels) {
        for key in &keys {
            let name = match (runs.len(), keys.len()) {
                (1, _) => key.to_string(),
                (_, 1) => label.clone(),
                _ => format!("{label}: {key}"),
            };
            chart = chart.with(Series::line(name, run.points(&args.x, key)?));
        }
    }
    chart.save(&args.output)?;
    println!("wrote {}", args.output.display());
    Ok(())
}
