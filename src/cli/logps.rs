//! `irbridge logps`: per-sequence completion log-probs of a model over a dataset file, one JSON
//! line per input row (REFERENCE §2: sums over completion tokens, TRL tokenisation, keep_start
//! truncation).

use super::progress::Progress;
use super::{load_dataset, Dataset, EngineFn, ModelArgs};
use anyhow::{Context, Result};
use clap::Args;
use irbridge::data::Tokenizer;
use irbridge::model::Model;
use irbridge::score::{score_pairs, score_sequences, token_logps, DEFAULT_SCORE_BATCH};
use irbridge::train::Engine;
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `irbridge logps`.
#[derive(Args)]
pub struct LogpsArgs {
    /// Hugging Face checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    common: ModelArgs,
    /// Write the JSON lines here (atomically) instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also write each row's per-token completion log-probs (`completion_token_logps`, or
    /// `chosen_token_logps` / `rejected_token_logps` for pairs), in token order.
    #[arg(long)]
    per_token: bool,
}

/// Runs `irbridge logps`.
pub fn run(args: LogpsArgs) -> Result<()> {
    let device = args.common.check_device()?;
    if let Some(out) = &args.output {
        super::check_output_file(out, &args.common.data)?;
    }
    let tok = Tokenizer::from_dir(&args.model)?;
    let model = Model::load(&args.model)?;
    args.common.check_positions(&model, &args.model)?;
    let pad = tok.pad_id()?;
    let ds = load_dataset(&args.common.data, &tok, args.common.max_length)?;
    let per_token = args.per_token;
    let lines = args.common.with_engine(
        device,
        model,
        Lines {
            ds: &ds,
            pad,
            per_token,
        },
    )?;
    eprintln!("{}", ds.report());
    let mut text = String::new();
    for l in &lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    match &args.output {
        Some(path) => irbridge::fsutil::write_atomic(path, text.as_bytes())?,
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}

/// One JSON line per input row (dropped rows say why), scored on whichever engine.
struct Lines<'a> {
    ds: &'a Dataset,
    pad: u32,
    /// Add the per-token log-probs to each line.
    per_token: bool,
}

impl Lines<'_> {
    /// The per-token log-probs when `--per-token` asked for them (an empty iterator otherwise).
    fn per_token_of<E: Engine>(
        &self,
        engine: &mut E,
        seqs: &[&irbridge::data::TokenizedSeq],
    ) -> Result<std::vec::IntoIter<Vec<f32>>> {
        let v = if self.per_token {
            token_logps(engine, seqs, self.pad, DEFAULT_SCORE_BATCH)?
        } else {
            Vec::new()
        };
        Ok(v.into_iter())
    }
}

impl EngineFn<Vec<Value>> for Lines<'_> {
    fn call<E: Engine>(self, engine: &mut E) -> Result<Vec<Value>> {
        let pad = self.pad;
        let mut lines: Vec<Value> = Vec::new();
        match self.ds {
            Dataset::Sft(d) => {
                let kept: Vec<_> = d.kept().collect();
                let seqs: Vec<_> = kept.iter().map(|e| &e.info.seq).collect();
                let mut bar = Progress::new("logps", seqs.len());
                let scores = score_sequences(engine, &seqs, pad, DEFAULT_SCORE_BATCH, &mut |n| bar.update(n))?;
                let mut per_token = self.per_token_of(engine, &seqs)?;
                let mut it = scores.into_iter();
                for ex in &d.examples {
                    lines.push(match ex.dropped {
                        Some(reason) => json!({"source": ex.source, "dropped": reason.to_string()}),
                        None => {
                            let s = it.next().context("internal: fewer scores than kept rows")?;
                            let mut line =
                                json!({"source": ex.source, "completion_logps": s.logp, "completion_tokens": s.tokens});
                            if let Some(t) = per_token.next() {
                                line["completion_token_logps"] = json!(t);
                            }
                            line
                        }
                    });
                }
            }
            Dataset::Dpo(d) => {
                let kept: Vec<_> = d.kept().collect();
                let mut bar = Progress::new("logps (pairs)", kept.len());
                let scores = score_pairs(engine, &kept, pad, DEFAULT_SCORE_BATCH, &mut |n| bar.update(n))?;
                let sides: Vec<_> = kept.iter().flat_map(|p| [&p.chosen.seq, &p.rejected.seq]).collect();
                let mut per_token = self.per_token_of(engine, &sides)?;
                let mut it = scores.into_iter();
                for ex in &d.examples {
                    lines.push(match ex.dropped {
                        Some(reason) => json!({"source": ex.source, "dropped": reason.to_string()}),
                        None => {
                            let (c, r) = it.next().context("internal: fewer scores than kept pairs")?;
                            let mut line = json!({
                                "source": ex.source,
                                "chosen_logps": c.logp, "rejected_logps": r.logp,
                                "chosen_tokens": c.tokens, "rejected_tokens": r.tokens,
                            });
                            if let (Some(tc), Some(tr)) = (per_token.next(), per_token.next()) {
                                line["chosen_token_logps"] = json!(tc);
                                line["rejected_token_logps"] = json!(tr);
                            }
                            line
                        }
                    });
                }
            }
        }
        Ok(lines)
    }
}
