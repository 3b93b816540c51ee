//! The `irbridge` command line: parses arguments, calls the library, prints results.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "irbridge", version, about = "SFT and DPO post-training around the implicit reward β·log π/π_ref")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the build's CUDA kernels and the devices this machine offers.
    Info,
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
    }
}
