//! What the two plain-binary GPU benches share: their flags (`--json PATH`, `--iters N`) and the
//! way they start — a skip line and exit 0 on a machine without a usable GPU, exit 2 on bad flags,
//! exit 1 when the run fails.

use anyhow::{bail, Context, Result};
use irbridge::device::cuda_unavailable_reason;

/// The flags of a GPU bench.
pub struct Args {
    /// Write the results as JSON here.
    pub json: Option<String>,
    /// Timed runs per measurement.
    pub iters: usize,
}

fn parse_args(default_iters: usize, min_iters: usize) -> Result<Args> {
    let mut args = Args {
        json: None,
        iters: default_iters,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = Some(it.next().context("--json needs a path")?),
            "--iters" => {
                args.iters = it
                    .next()
                    .context("--iters needs a number")?
                    .parse()
                    .context("--iters")?;
                if args.iters < min_iters {
                    bail!("--iters must be at least {min_iters} (got {})", args.iters);
                }
            }
            // `cargo bench` passes --bench (and maybe a filter); nothing else is meaningful here.
            _ => {}
        }
    }
    Ok(args)
}

/// Parses the flags and runs `run` on a usable GPU; `name` prefixes the error lines.
pub fn main_with(name: &str, default_iters: usize, min_iters: usize, run: impl FnOnce(&Args) -> Result<()>) {
    let args = match parse_args(default_iters, min_iters) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{name}: {e:#}");
            std::process::exit(2);
        }
    };
    if let Some(why) = cuda_unavailable_reason(0) {
        println!("skipped: no GPU ({why})");
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("{name} failed: {e:#}");
        std::process::exit(1);
    }
}
