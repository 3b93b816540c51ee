//! Token-level implicit rewards: the Q-function view of a fine-tuned model (REFERENCE §1.4).
//!
//! For a policy π and its reference π_ref, the implicit reward of completion token `y_t` is
//! `β·(log π(y_t | x, y_<t) − log π_ref(y_t | x, y_<t))` = `Q(s_t, a_t) − V(s_t)`, and a
//! sequence's implicit reward is the sum over its completion tokens. If fine-tuning learned a
//! reward, chosen responses should out-score rejected ones: [`ranking_accuracy`] measures that on
//! preference pairs, [`html_report`] shows which tokens carry the reward.

use crate::data::{Batch as DataBatch, TokenizedSeq, Tokenizer};
use crate::model::Model;
use crate::score::{model_batch, SeqScore};
use anyhow::{ensure, Context, Result};
use std::fmt::Write as _;

/// The implicit rewards of one sequence's completion tokens.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenRewards {
    /// Prompt + completion ids.
    pub ids: Vec<u32>,
    /// Tokens of `ids` that belong to the prompt (the completion starts at this index).
    pub prompt_len: usize,
    /// `β·(log π − log π_ref)` per completion token (`ids[prompt_len..]`, where masked).
    pub rewards: Vec<f32>,
    /// Σ of `rewards` (f64).
    pub total: f64,
}

/// Per-token implicit rewards of `seqs` under `policy` against `reference`, in micro-batches of
/// `batch_size`; `β > 0`.
pub fn token_rewards(
    policy: &Model,
    reference: &Model,
    seqs: &[&TokenizedSeq],
    pad_id: u32,
    beta: f64,
    batch_size: usize,
) -> Result<Vec<TokenRewards>> {
    ensure!(beta.is_finite() && beta > 0.0, "beta: must be > 0, got {beta}");
    ensure!(batch_size > 0, "batch size must be positive");
    ensure!(
        policy.config().vocab_size == reference.config().vocab_size,
        "policy and reference vocabularies differ ({} vs {} tokens): implicit rewards need one tokenizer",
        policy.config().vocab_size,
        reference.config().vocab_size
    );
    let mut out = Vec::with_capacity(seqs.len());
    for chunk in seqs.chunks(batch_size) {
        let data = DataBatch::from_seqs(chunk, pad_id)?;
        let batch = model_batch(&data)?;
        let p = policy.forward(&batch).context("policy forward")?;
        let r = reference.forward(&batch).context("reference forward")?;
        let t_n = batch.seq();
        for (b, s) in chunk.iter().enumerate() {
            let prompt_len = s.completion_mask.iter().position(|&m| m == 1).unwrap_or(s.len());
            // Position t predicts token t+1: the reward of ids[t+1] sits at t.
            let rewards: Vec<f32> = (prompt_len..s.len())
                .map(|i| {
                    let t = b * t_n + i - 1;
                    (beta * (p.logp()[t] as f64 - r.logp()[t] as f64)) as f32
                })
                .collect();
            let total = rewards.iter().map(|&x| x as f64).sum();
            out.push(TokenRewards {
                ids: s.input_ids.clone(),
                prompt_len,
                rewards,
                total,
            });
        }
    }
    Ok(out)
}

/// Fraction of pairs whose chosen side has the strictly larger implicit reward
/// `(log π − log π_ref)(chosen) > (log π − log π_ref)(rejected)` (β > 0 does not change the
/// order). Exactly 0 when policy == reference, like TRL's `rewards/accuracies`.
pub fn ranking_accuracy(policy: &[(SeqScore, SeqScore)], reference: &[(SeqScore, SeqScore)]) -> Result<f64> {
    ensure!(
        policy.len() == reference.len(),
        "reference scores: expected {} pairs, got {}",
        policy.len(),
        reference.len()
    );
    ensure!(!policy.is_empty(), "ranking accuracy: no pairs");
    let wins = policy
        .iter()
        .zip(reference)
        .filter(|((pc, pr), (rc, rr))| pc.logp - rc.logp > pr.logp - rr.logp)
        .count();
    Ok(wins as f64 / policy.len() as f64)
}

/// One dataset row on the [`html_report`] page: a preference pair (`chosen` and `rejected`,
/// judged by which sum is larger) or a single completion (`chosen` only).
pub struct RowView<'a> {
    /// Where the row came from (`file:line`).
    pub source: &'a str,
    /// The chosen sequence, or the only one.
    pub chosen: &'a TokenRewards,
    /// The rejected sequence of a pair.
    pub rejected: Option<&'a TokenRewards>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A background colour for a reward: green above 0, red below, saturating at `scale`.
fn colour(r: f32, scale: f32) -> String {
    let a = (r / scale).clamp(-1.0, 1.0);
    let (red, green) = if a >= 0.0 { (0.0, a) } else { (-a, 0.0) };
    let mix = |c: f32| (255.0 - 150.0 * c) as u8;
    format!("rgb({},{},{})", mix(green), mix(red), mix(red.max(green)))
}

/// The text each token contributes, such that the pieces concatenate to `decode(ids)`.
///
/// Decoding tokens one by one loses the spaces a word-level tokenizer puts between tokens and
/// splits multi-byte characters that byte-level BPE spreads over several tokens. This is the
/// streaming detokeniser of text-generation-inference instead: decode a short window ending at
/// the token and take what it adds to the window without it; while the text ends in an
/// incomplete character (U+FFFD), the token's piece is empty and the character goes to the token
/// that completes it.
pub fn token_pieces(tok: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let (mut prefix, mut read) = (0usize, 0usize);
    let mut pieces = Vec::with_capacity(ids.len());
    for i in 0..ids.len() {
        let before = tok.decode(&ids[prefix..read])?;
        let after = tok.decode(&ids[prefix..=i])?;
        match after.get(before.len()..) {
            Some(new) if !new.is_empty() && !after.ends_with('\u{FFFD}') => {
                pieces.push(new.to_string());
                (prefix, read) = (read, i + 1);
            }
            _ => pieces.push(String::new()),
        }
    }
    if read < ids.len() {
        // The text ends inside a character: what is left goes to the last token as decoded.
        let (before, after) = (tok.decode(&ids[prefix..read])?, tok.decode(&ids[prefix..])?);
        if let (Some(last), Some(rest)) = (pieces.last_mut(), after.get(before.len()..)) {
            last.push_str(rest);
        }
    }
    Ok(pieces)
}

fn tokens_html(tok: &Tokenizer, seq: &TokenRewards, scale: f32, out: &mut String) -> Result<()> {
    for (i, piece) in token_pieces(tok, &seq.ids)?.iter().enumerate() {
        let shown = escape(piece).replace('\n', "↵\n");
        if i < seq.prompt_len {
            write!(out, "<span class=\"p\">{shown}</span>")?;
        } else {
            let r = seq.rewards[i - seq.prompt_len];
            write!(
                out,
                "<span class=\"t\" style=\"background:{}\" title=\"{r:+.4}\">{shown}</span>",
                colour(r, scale)
            )?;
        }
    }
    Ok(())
}

/// A self-contained HTML page (no scripts, no external assets): every row with each completion
/// token coloured by its implicit reward (hover for the value), the sequence sums, and a summary.
pub fn html_report(title: &str, summary: &[(String, String)], tok: &Tokenizer, rows: &[RowView]) -> Result<String> {
    let scale = rows
        .iter()
        .flat_map(|p| {
            p.chosen
                .rewards
                .iter()
                .chain(p.rejected.iter().flat_map(|r| &r.rewards))
        })
        .map(|r| r.abs())
        .fold(0f32, f32::max)
        .max(1e-6);
    let mut h = String::new();
    write!(
        h,
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
         body{{font-family:system-ui,sans-serif;margin:2em;max-width:70em}}\
         table.s td{{padding:0 1em 0 0}}\
         .pair{{border:1px solid #ccc;border-radius:6px;padding:.6em 1em;margin:1em 0}}\
         .row{{margin:.4em 0;line-height:1.9;white-space:pre-wrap}} .lab{{font-weight:600;display:inline-block;width:6.5em}}\
         .p{{color:#777}} .t{{padding:1px 0;border-radius:2px}}\
         .sum{{font-family:monospace;margin-left:.5em}} .ok{{color:#070}} .bad{{color:#a00}}\
         .legend span{{padding:1px 6px;margin-right:4px;border-radius:3px}}\
         </style></head><body>\n<h1>{t}</h1>\n",
        t = escape(title)
    )?;
    h.push_str("<table class=\"s\">");
    for (k, v) in summary {
        write!(h, "<tr><td>{}</td><td><b>{}</b></td></tr>", escape(k), escape(v))?;
    }
    h.push_str("</table>\n<p class=\"legend\">Token colour = implicit reward β·(log π − log π<sub>ref</sub>): ");
    for r in [-1.0f32, -0.5, 0.0, 0.5, 1.0] {
        write!(
            h,
            "<span style=\"background:{}\">{:+.3}</span>",
            colour(r * scale, scale),
            r * scale
        )?;
    }
    h.push_str(" (grey: prompt, not scored)</p>\n");
    for p in rows {
        write!(h, "<div class=\"pair\"><div><small>{}</small>", escape(p.source))?;
        let mut shown = vec![("completion", p.chosen)];
        if let Some(rej) = p.rejected {
            let ok = p.chosen.total > rej.total;
            write!(
                h,
                " — <span class=\"{}\">{}</span>",
                if ok { "ok" } else { "bad" },
                if ok {
                    "chosen ranked higher"
                } else {
                    "rejected ranked higher or equal"
                }
            )?;
            shown = vec![("chosen", p.chosen), ("rejected", rej)];
        }
        h.push_str("</div>");
        for (lab, s) in shown {
            write!(h, "<div class=\"row\"><span class=\"lab\">{lab}</span>")?;
            tokens_html(tok, s, scale, &mut h)?;
            write!(h, "<span class=\"sum\">Σ = {:+.4}</span></div>", s.total)?;
        }
        h.push_str("</div>\n");
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(logp: f64) -> SeqScore {
        SeqScore { logp, tokens: 3 }
    }

    #[test]
    fn ranking_accuracy_is_strict_and_checks_lengths() {
        let refr = vec![(s(-5.0), s(-5.0)), (s(-4.0), s(-6.0))];
        assert_eq!(ranking_accuracy(&refr, &refr).unwrap(), 0.0, "policy == reference");
        // Pair 0: chosen gains 1, rejected loses 1 → ranked right; pair 1: both gain 0.5 → tie.
        let pol = vec![(s(-4.0), s(-6.0)), (s(-3.5), s(-5.5))];
        assert_eq!(ranking_accuracy(&pol, &refr).unwrap(), 0.5);
        assert!(ranking_accuracy(&pol[..1], &refr).is_err());
        assert!(ranking_accuracy(&[], &[]).is_err());
    }

    #[test]
    fn colours_saturate_and_escape() {
        assert_eq!(colour(0.0, 1.0), "rgb(255,255,255)");
        assert_eq!(colour(5.0, 1.0), colour(1.0, 1.0));
        assert_ne!(colour(0.5, 1.0), colour(-0.5, 1.0));
        assert_eq!(escape("<a&\"b\">"), "&lt;a&amp;&quot;b&quot;&gt;");
    }
}
