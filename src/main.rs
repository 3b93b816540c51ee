//! The `irbridge` command line: parses arguments, calls the library, prints results.

use anyhow::Result;
use clap::{Parser, Subcommand};
use irbridge::device::{cuda_unavailable_reason, CudaDevice};
use irbridge::kernels;

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
        Command::Info => info(),
    }
}

fn info() -> Result<()> {
    println!("irbridge {}", env!("CARGO_PKG_VERSION"));
    match kernels::TOOLCHAIN {
        Some(tc) => {
            let names: Vec<&str> = kernels::KERNEL_IMAGES.iter().map(|k| k.name).collect();
            println!(
                "kernels: {} modules compiled with {tc}: {}",
                names.len(),
                names.join(", ")
            );
        }
        None => println!("kernels: none (built without a CUDA compiler; CPU engine only)"),
    }
    match cuda_unavailable_reason(0) {
        None => {
            let dev = CudaDevice::get(0)?;
            println!("cuda:0: {}", dev.name()?);
        }
        Some(why) => println!("cuda: unavailable ({why}); using the CPU"),
    }
    println!("cpu: {} threads", rayon::current_num_threads());
    Ok(())
}
