//! The `irbridge` command line: parses arguments, calls the library, prints results.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "irbridge",
    version,
    about = "SFT and DPO post-training around the implicit reward β·log π/π_ref"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the build's CUDA kernels and the devices this machine offers.
    Info,
    /// Per-sequence completion log-probs of a model over a dataset (one JSON line per row).
    Logps(cli::logps::LogpsArgs),
    /// Preference loss and reward metrics of a policy against a reference over a dataset.
    Eval(cli::eval::EvalArgs),
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Info => cli::info::run(),
        Command::Logps(a) => cli::logps::run(a),
        Command::Eval(a) => cli::eval::run(a),
    }
}
