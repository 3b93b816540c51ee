//! `irbridge analyze`: token-level implicit rewards `β·(log π − log π_ref)` of a model against a
//! reference over a dataset — per token, per sequence, the chosen-vs-rejected ranking accuracy —
//! and an HTML page that colours every completion token by its reward.

use super::progress::Progress;
use super::{load_dataset, Dataset, ModelArgs};
use anyhow::{ensure, Context, Result};
use clap::Args;
use irbridge::analyze::{html_report, token_pieces, token_rewards, RowView, TokenRewards};
use irbridge::data::{TokenizedSeq, Tokenizer};
use irbridge::fsutil::write_atomic;
use irbridge::model::Model;
use irbridge::score::DEFAULT_SCORE_BATCH;
use serde_json::json;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Flags of `irbridge analyze`.
#[derive(Args)]
pub struct AnalyzeArgs {
    /// The fine-tuned model (policy π).
    #[arg(long)]
    model: PathBuf,
    /// The reference model π_ref (e.g. the checkpoint fine-tuning started from).
    #[arg(long = "ref", visible_alias = "ref-model")]
    reference: PathBuf,
    #[command(flatten)]
    common: ModelArgs,
    /// β of the implicit reward.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// Output folder: token_rewards.jsonl, summary.json, implicit_rewards.html.
    #[arg(long, default_value = "runs/analyze")]
    output_dir: PathBuf,
    /// Rows shown on the HTML page (the JSONL has them all).
    #[arg(long, default_value_t = 50)]
    html_rows: usize,
}

/// The completion's token pieces (they concatenate to the decoded completion).
fn token_strings(tok: &Tokenizer, r: &TokenRewards) -> Result<Vec<String>> {
    Ok(token_pieces(tok, &r.ids)?.split_off(r.prompt_len))
}

fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = xs.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    s / n.max(1) as f64
}

/// Runs `irbridge analyze`.
pub fn run(a: &AnalyzeArgs) -> Result<()> {
    a.common.check_device()?;
    ensure!(
        a.beta.is_finite() && a.beta > 0.0,
        "--beta: must be > 0, got {}",
        a.beta
    );
    let tok = Tokenizer::from_dir(&a.model)?;
    let policy = Model::load(&a.model)?;
    let reference = Model::load(&a.reference).with_context(|| format!("--ref {}", a.reference.display()))?;
    super::check_same_vocabulary(&policy, &a.model, &reference, &a.reference)?;
    a.common.check_positions(&policy, &a.model)?;
    a.common.check_positions(&reference, &a.reference)?;
    let pad = tok.pad_id()?;
    let ds = load_dataset(&a.common.data, &tok, a.common.max_length)?;
    let (sources, seqs, paired): (Vec<&str>, Vec<&TokenizedSeq>, bool) = match &ds {
        Dataset::Sft(d) => (
            d.kept().map(|e| e.source.as_str()).collect(),
            d.kept().map(|e| &e.info.seq).collect(),
            false,
        ),
        Dataset::Dpo(d) => (
            d.kept().map(|e| e.source.as_str()).collect(),
            d.kept().flat_map(|e| [&e.chosen.seq, &e.rejected.seq]).collect(),
            true,
        ),
    };
    ensure!(
        !seqs.is_empty(),
        "{}: no row reaches the analysis ({})",
        a.common.data.display(),
        ds.summary()
    );
    let mut rewards = Vec::with_capacity(seqs.len());
    let mut bar = Progress::new("implicit rewards", seqs.len());
    for chunk in seqs.chunks(DEFAULT_SCORE_BATCH) {
        rewards.extend(token_rewards(
            &policy,
            &reference,
            chunk,
            pad,
            a.beta,
            DEFAULT_SCORE_BATCH,
        )?);
        bar.update(rewards.len());
    }
    let per_row = if paired { 2 } else { 1 };
    let mut lines = String::new();
    let mut views = Vec::new();
    for (src, r) in sources.iter().zip(rewards.chunks_exact(per_row)) {
        let row = if paired {
            json!({
                "source": src,
                "chosen_reward": r[0].total, "rejected_reward": r[1].total,
                "chosen_ranked_higher": r[0].total > r[1].total,
                "chosen_tokens": token_strings(&tok, &r[0])?, "chosen_token_rewards": r[0].rewards,
                "rejected_tokens": token_strings(&tok, &r[1])?, "rejected_token_rewards": r[1].rewards,
            })
        } else {
            json!({
                "source": src, "reward": r[0].total,
                "tokens": token_strings(&tok, &r[0])?, "token_rewards": r[0].rewards,
            })
        };
        writeln!(lines, "{row}")?;
        if views.len() < a.html_rows {
            views.push(RowView {
                source: src,
                chosen: &r[0],
                rejected: r.get(1),
            });
        }
    }
    let summary = if paired {
        let pairs: Vec<&[TokenRewards]> = rewards.chunks_exact(2).collect();
        let acc = mean(pairs.iter().map(|p| f64::from(u8::from(p[0].total > p[1].total))));
        json!({
            "pairs": pairs.len(), "beta": a.beta,
            "ranking_accuracy": acc,
            "rewards/chosen": mean(pairs.iter().map(|p| p[0].total)),
            "rewards/rejected": mean(pairs.iter().map(|p| p[1].total)),
            "rewards/margins": mean(pairs.iter().map(|p| p[0].total - p[1].total)),
        })
    } else {
        json!({
            "sequences": rewards.len(), "beta": a.beta,
            "mean_reward": mean(rewards.iter().map(|r| r.total)),
            "mean_token_reward": mean(rewards.iter().flat_map(|r| r.rewards.iter().map(|&x| x as f64))),
        })
    };
    let mut shown: Vec<(String, String)> = vec![
        ("policy".into(), a.model.display().to_string()),
        ("reference".into(), a.reference.display().to_string()),
        ("data".into(), a.common.data.display().to_string()),
    ];
    if let Some(obj) = summary.as_object() {
        shown.extend(obj.iter().map(|(k, v)| (k.clone(), v.to_string())));
    }
    shown.push(("rows shown".into(), format!("{} of {}", views.len(), sources.len())));
    let html = html_report("Token-level implicit rewards", &shown, &tok, &views)?;
    let out = &a.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write_atomic(&out.join("token_rewards.jsonl"), lines.as_bytes())?;
    write_atomic(
        &out.join("summary.json"),
        (serde_json::to_string_pretty(&summary)? + "\n").as_bytes(),
    )?;
    write_atomic(&out.join("implicit_rewards.html"), html.as_bytes())?;
    eprintln!("{}", ds.report());
    println!("{summary}");
    eprintln!(
        "wrote {0}/token_rewards.jsonl, {0}/summary.json, {0}/implicit_rewards.html",
        out.display()
    );
    Ok(())
}
