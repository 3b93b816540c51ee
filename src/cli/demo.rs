//! `irbridge demo`: the study of [`irbridge::study`] on the built-in task, end to end, with no
//! files, no network and no GPU needed.

use anyhow::{bail, Context, Result};
use clap::Args;
use irbridge::fsutil::write_atomic;
use irbridge::study::{self, StudyConfig};
use irbridge::Device;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Flags of `irbridge demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where the models, data, table and plots go (replaced if it holds an earlier demo).
    #[arg(long, default_value = "runs/demo")]
    output_dir: PathBuf,
    /// The larger grid of docs/experiments.md: five seeds, NLL at four learning rates and five
    /// f-divergence objectives at two (about 10 minutes on two CPU cores).
    #[arg(long)]
    full: bool,
    /// A study config (JSON, as the `study.json` a demo writes; top-level keys left out keep the
    /// default grid's values, nested objects such as `sft` are given whole) instead of the
    /// built-in grid.
    #[arg(long, conflicts_with = "full")]
    config: Option<PathBuf>,
    /// Seeds to run instead of the grid's (comma-separated).
    #[arg(long, value_delimiter = ',')]
    seeds: Option<Vec<u64>>,
    /// Device the models train and sample on: cpu, cuda, cuda:N or auto (scoring runs on the
    /// CPU).
    #[arg(long, default_value = "cpu")]
    device: Device,
}

/// The file that marks a folder as a demo's, so a rerun may replace it.
const MARKER: &str = "study.json";

/// Readies `dir` for a new study: a missing or empty folder is fine; in an earlier demo's folder
/// (it has the marker) exactly what a demo writes is removed and anything else is kept; any
/// other non-empty folder is refused rather than overwritten.
fn claim(dir: &Path) -> Result<()> {
    if dir.exists() {
        let entries: Vec<std::fs::DirEntry> = std::fs::read_dir(dir)
            .and_then(|rd| rd.collect())
            .with_context(|| format!("reading {}", dir.display()))?;
        if !entries.is_empty() {
            if !dir.join(MARKER).is_file() {
                bail!(
                    "--output-dir {}: the folder exists and is not an earlier demo's (no {MARKER}); choose another",
                    dir.display()
                );
            }
            let mut kept = 0;
            for e in entries {
                let name = e.file_name().to_string_lossy().into_owned();
                let path = e.path();
                if name == MARKER || study::is_study_output(&name) {
                    let removed = if path.is_dir() {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    removed.with_context(|| format!("removing the earlier demo's {}", path.display()))?;
                } else {
                    kept += 1;
                }
            }
            if kept > 0 {
                println!(
                    "{}: replacing the earlier demo; {kept} other entries left as they are",
                    dir.display()
                );
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

/// Runs the study and prints the table and where everything went.
pub fn run(a: &DemoArgs) -> Result<()> {
    let device = a.device.ensure_available()?;
    let mut cfg = match (&a.config, a.full) {
        (Some(p), _) => StudyConfig::load(p)?,
        (None, true) => StudyConfig::full(),
        (None, false) => StudyConfig::quick(),
    };
    if let Some(s) = &a.seeds {
        cfg.seeds = s.clone();
    }
    cfg.validate()?;
    claim(&a.output_dir)?;
    write_atomic(
        &a.output_dir.join(MARKER),
        (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes(),
    )?;
    let start = Instant::now();
    println!(
        "irbridge demo: {} seed(s) × {} SFT arm(s) on the built-in task → {}",
        cfg.seeds.len(),
        cfg.arms.len(),
        a.output_dir.display()
    );
    let mut note = |m: &str| {
        let s = start.elapsed().as_secs();
        println!("[{:02}:{:02}] {m}", s / 60, s % 60);
    };
    let results = study::run(&cfg, &a.output_dir, device, &mut note)?;
    let files = results.write(&a.output_dir)?;
    let s = start.elapsed().as_secs();
    println!("\n{}", results.markdown());
    println!("finished in {:02}:{:02}; wrote:", s / 60, s % 60);
    for f in files
        .iter()
        .chain(std::iter::once(&a.output_dir.join(study::REWARD_PAGE)))
    {
        println!("  {}", f.display());
    }
    println!("models, data and training logs: {}/seed-*/", a.output_dir.display());
    Ok(())
}
