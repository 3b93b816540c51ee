//! Human-readable view of tokenised data (what `irbridge inspect-data` prints): the first rows
//! token by token with their loss mask, then the counts. Seeing the mask is the quickest way to
//! catch a shifted prompt/completion boundary or an untrained EOS.
//!
//! Tokens are separated by `|`; runs of masked (untrained) tokens are wrapped in `[...]`, or
//! dimmed when `color` is set. Newlines and tabs are shown as `\n` and `\t`.

use super::tokenize::{DpoDataset, SeqInfo, SftDataset, TokenizeReport};
use super::tokenizer::Tokenizer;
use anyhow::Result;
use std::fmt::Write;

const DIM: &str = "\x1b[2m";
const RESET: &str = "\x1b[0m";

/// Renders the first `n_rows` SFT examples and the counts.
pub fn inspect_sft(ds: &SftDataset, tok: &Tokenizer, n_rows: usize, color: bool) -> Result<String> {
    let mut out = String::new();
    for (i, ex) in ds.examples.iter().take(n_rows).enumerate() {
        writeln!(out, "#{i} {}{}", ex.source, dropped_note(ex.dropped))?;
        write_seq(&mut out, "  ", &ex.info, tok, color)?;
    }
    write_report(&mut out, &ds.report)?;
    Ok(out)
}

/// Renders the first `n_rows` DPO pairs (chosen, then rejected) and the counts.
pub fn inspect_dpo(ds: &DpoDataset, tok: &Tokenizer, n_rows: usize, color: bool) -> Result<String> {
    let mut out = String::new();
    for (i, ex) in ds.examples.iter().take(n_rows).enumerate() {
        writeln!(out, "#{i} {}{}", ex.source, dropped_note(ex.dropped))?;
        write_seq(&mut out, "  chosen   ", &ex.chosen, tok, color)?;
        write_seq(&mut out, "  rejected ", &ex.rejected, tok, color)?;
    }
    write_report(&mut out, &ds.report)?;
    Ok(out)
}

fn dropped_note(reason: Option<super::tokenize::DropReason>) -> String {
    reason.map(|r| format!("  DROPPED ({r})")).unwrap_or_default()
}

fn write_report(out: &mut String, report: &TokenizeReport) -> Result<()> {
    writeln!(out, "--")?;
    writeln!(out, "{report}")?;
    Ok(())
}

fn write_seq(out: &mut String, label: &str, info: &SeqInfo, tok: &Tokenizer, color: bool) -> Result<()> {
    writeln!(
        out,
        "{label}{} tokens: prompt {}, trained {}{}{}",
        info.seq.len(),
        info.prompt_len,
        info.seq.n_completion(),
        if info.truncated { ", truncated" } else { "" },
        if info.prompt_is_token_prefix {
            ""
        } else {
            ", PROMPT NOT A TOKEN PREFIX"
        },
    )?;
    let (open, close) = if color { (DIM, RESET) } else { ("[", "]") };
    let mut line = String::from("    ");
    let mut in_masked = false;
    for (k, (&id, &m)) in info.seq.input_ids.iter().zip(&info.seq.completion_mask).enumerate() {
        let masked = m == 0;
        let boundary = masked != in_masked;
        if k > 0 && (color || !boundary) {
            line.push('|');
        }
        if boundary {
            line.push_str(if masked { open } else { close });
        }
        in_masked = masked;
        line.push_str(&escape(&tok.decode(&[id])?));
    }
    if in_masked {
        line.push_str(close);
    }
    writeln!(out, "{line}")?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\t', "\\t")
        .replace('\r', "\\r")
}
