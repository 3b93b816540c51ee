//! The `irbridge` command line: parses arguments, calls the library, prints results.

mod cli;

use anyhow::Result;
use clap::{Parser, Subcommand};
use irbridge::train::Kind;

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
    /// The paper's claims as a controlled experiment on a built-in task with a known reward
    /// (pre-train → SFT at several learning rates and objectives → DPO → evaluation).
    Demo(cli::demo::DemoArgs),
    /// Sample continuations of prompts from a checkpoint (KV cache, temperature, top-p).
    Generate(cli::generate::GenerateArgs),
    /// Token-level implicit rewards β·(log π − log π_ref) of a model against a reference over a
    /// dataset, with a chosen-vs-rejected ranking accuracy and an HTML view.
    Analyze(cli::analyze::AnalyzeArgs),
    /// Show the build's CUDA kernels and the devices this machine offers.
    Info,
    /// Per-sequence completion log-probs of a model over a dataset (one JSON line per row).
    Logps(cli::logps::LogpsArgs),
    /// Preference loss and reward metrics of a policy against a reference over a dataset.
    Eval(cli::eval::EvalArgs),
    /// Train a model (SFT or DPO).
    #[command(subcommand)]
    Train(Box<TrainCommand>),
    /// Show how a dataset is tokenised: tokens, loss masks, drop counts.
    InspectData(cli::inspect::InspectArgs),
    /// Chart keys of one or more metrics.jsonl files against the step, as an SVG.
    Plot(cli::plot::PlotArgs),
}

#[derive(Subcommand)]
enum TrainCommand {
    /// Supervised fine-tuning (NLL or an f-divergence objective).
    Sft(cli::train::TrainArgs),
    /// Preference optimisation (DPO and the TRL loss family).
    Dpo(cli::train::TrainArgs),
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
        Command::Demo(a) => cli::demo::run(&a),
        Command::Generate(a) => cli::generate::run(&a),
        Command::Analyze(a) => cli::analyze::run(&a),
        Command::Info => cli::info::run(),
        Command::Logps(a) => cli::logps::run(a),
        Command::Eval(a) => cli::eval::run(a),
        Command::Train(t) => match *t {
            TrainCommand::Sft(a) => cli::train::run(Kind::Sft, &a),
            TrainCommand::Dpo(a) => cli::train::run(Kind::Dpo, &a),
        },
        Command::InspectData(a) => cli::inspect::run(&a),
        Command::Plot(a) => cli::plot::run(&a),
    }
}
