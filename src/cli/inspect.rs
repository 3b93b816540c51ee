//! `irbridge inspect-data`: what the trainer will see — tokens, loss masks and drop counts.

use anyhow::Result;
use clap::{Args, ValueEnum};
use irbridge::data::{inspect_dpo, inspect_sft, read_records, tokenize_dpo, tokenize_sft, TokenizeOptions, Tokenizer};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Which tokenisation to show.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum DataKind {
    /// Sequences with a completion mask.
    Sft,
    /// Chosen/rejected pairs.
    Dpo,
}

/// Flags of `inspect-data`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model directory (its tokenizer is used).
    #[arg(long)]
    pub model: PathBuf,
    /// Data file.
    #[arg(long)]
    pub data: PathBuf,
    /// sft or dpo.
    #[arg(long, value_enum, default_value = "sft")]
    pub kind: DataKind,
    /// Rows to print.
    #[arg(long, default_value_t = 3)]
    pub rows: usize,
    /// Maximum tokens per sequence.
    #[arg(long, default_value_t = 1024)]
    pub max_length: usize,
}

/// Tokenises and prints.
pub fn run(args: &InspectArgs) -> Result<()> {
    let tok = Tokenizer::from_dir(&args.model)?;
    let records = read_records(&args.data)?;
    let opts = TokenizeOptions {
        max_length: args.max_length,
        ..Default::default()
    };
    let color = std::io::stdout().is_terminal();
    let text = match args.kind {
        DataKind::Sft => inspect_sft(&tokenize_sft(&records, &tok, &opts)?, &tok, args.rows, color)?,
        DataKind::Dpo => inspect_dpo(&tokenize_dpo(&records, &tok, &opts)?, &tok, args.rows, color)?,
    };
    print!("{text}");
    Ok(())
}
