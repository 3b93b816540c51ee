//! Rows → token ids and completion masks, with TRL v1.9 semantics (REFERENCE §2).
//!
//! Explicit-prompt rows: `prompt_ids = tok(prompt)`, `completion_ids = tok(prompt +
//! completion)[len(prompt_ids):]`, sequence = `prompt_ids + completion_ids`, mask 0 on the prompt
//! and 1 on the completion. Non-conversational completions get the EOS string appended unless they
//! already end with it (so never a double EOS); conversational rows are rendered with the chat
//! template (prompt with `add_generation_prompt`) and rely on it for EOS. When `prompt_ids` is not
//! a token prefix of the joint ids (e.g. a prompt ending in a space, which BPE merges into the
//! first completion token) the row is kept as TRL keeps it, flagged and counted.
//!
//! Truncation is `keep_start` to `max_length` on prompt+completion, per sequence (chosen and
//! rejected independently). Dropped, with a reason and a count, never silently trained:
//! - DPO pairs whose prompt alone is ≥ `max_length` ([`DropReason::PromptTooLong`], TRL's rule);
//! - sequences left with zero completion tokens ([`DropReason::EmptyCompletion`]; for SFT this
//!   includes a prompt that fills `max_length`, as the fixtures README §6 words it);
//! - DPO pairs whose chosen and rejected sequences are identical after truncation (zero gradient):
//!   always counted in `n_identical_pairs`, dropped when `drop_identical_pairs` (the default).
//!
//! Position 0 never carries a completion mask: it has no prediction (`targets[t]` is token t+1),
//! so counting it would make the mask sum disagree with the number of trained tokens.
//!
//! `{"text"}` rows (continued pre-training) train on every token: EOS appended as for
//! completions, mask 1 everywhere except position 0, and a long text is cut into consecutive
//! `max_length` windows rather than truncated. `{"messages"}` rows follow [`MessagesLoss`].
//! Alpaca and ShareGPT preference rows become text prompts through
//! [`TokenizeOptions::prompt_template`] (fixtures README §6).

use super::formats::{Content, Message, Record, Row, Turn};
use super::template::ChatTemplate;
use super::tokenizer::Tokenizer;
use anyhow::{anyhow, bail, ensure, Result};
use rayon::prelude::*;
use std::fmt;

/// The prompt template applied to Alpaca and ShareGPT rows; `{prompt}` is replaced by the
/// instruction (plus `"\n\n" + input` when non-empty) or the flattened conversation.
pub const DEFAULT_PROMPT_TEMPLATE: &str = "### Instruction:\n{prompt}\n\n### Response:\n";

/// TRL's default `max_length`.
pub const DEFAULT_MAX_LENGTH: usize = 1024;

/// What a `{"messages"}` SFT row trains on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessagesLoss {
    /// Every token of the rendered conversation (TRL's default for language-modelling rows).
    AllTokens,
    /// Only the turns from the last `assistant` message on: the earlier turns are the prompt,
    /// rendered with `add_generation_prompt` (TRL's conversational prompt/completion path).
    LastAssistant,
}

/// Knobs of the tokenisation; `Default` gives TRL's behaviour and the fixture template.
#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// Maximum prompt+completion length per sequence (`keep_start` truncation).
    pub max_length: usize,
    /// Template for Alpaca/ShareGPT prompts; must contain `{prompt}`.
    pub prompt_template: String,
    /// Drop DPO pairs whose chosen and rejected are identical after truncation (they would give
    /// zero gradient yet count in the mean loss). They are counted either way.
    pub drop_identical_pairs: bool,
    /// Loss extent for `{"messages"}` rows.
    pub messages_loss: MessagesLoss,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self {
            max_length: DEFAULT_MAX_LENGTH,
            prompt_template: DEFAULT_PROMPT_TEMPLATE.to_string(),
            drop_identical_pairs: true,
            messages_loss: MessagesLoss::AllTokens,
        }
    }
}

/// One tokenised sequence: ids and the 0/1 completion (loss) mask of the same length.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizedSeq {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// 1 where the token is a training target, 0 for prompt tokens and position 0.
    pub completion_mask: Vec<u8>,
}

impl TokenizedSeq {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// True for a sequence with no tokens.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Number of trained tokens (mask sum).
    pub fn n_completion(&self) -> usize {
        self.completion_mask.iter().map(|&m| m as usize).sum()
    }

    /// Cuts to `max_length` tokens from the start; returns whether anything was cut.
    fn truncate(&mut self, max_length: usize) -> bool {
        let cut = self.input_ids.len() > max_length;
        self.input_ids.truncate(max_length);
        self.completion_mask.truncate(max_length);
        cut
    }
}

/// Why an example does not reach the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The prompt alone fills `max_length`.
    PromptTooLong,
    /// No completion token survived truncation (or there was none).
    EmptyCompletion,
    /// Chosen and rejected are the same sequence after truncation.
    IdenticalPair,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DropReason::PromptTooLong => "prompt ≥ max_length",
            DropReason::EmptyCompletion => "empty completion",
            DropReason::IdenticalPair => "chosen == rejected",
        })
    }
}

/// One prompt/completion sequence as tokenised, with the facts tests and reports need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqInfo {
    /// The sequence after truncation.
    pub seq: TokenizedSeq,
    /// Prompt tokens (before truncation).
    pub prompt_len: usize,
    /// Completion tokens before truncation.
    pub full_completion_len: usize,
    /// Whether prompt+completion exceeded `max_length` and was cut.
    pub truncated: bool,
    /// Whether `tok(prompt)` is a prefix of `tok(prompt + completion)`.
    pub prompt_is_token_prefix: bool,
}

/// One SFT example (a row, or one window of a long text row).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SftExample {
    /// Where it came from (`file:line`, plus `(window k/n)` for chunked texts).
    pub source: String,
    /// The tokenised sequence.
    pub info: SeqInfo,
    /// `Some` when the example does not reach the loss.
    pub dropped: Option<DropReason>,
}

/// One DPO pair.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DpoExample {
    /// Where it came from.
    pub source: String,
    /// Chosen sequence (prompt + chosen completion).
    pub chosen: SeqInfo,
    /// Rejected sequence (prompt + rejected completion).
    pub rejected: SeqInfo,
    /// `Some` when the pair does not reach the loss.
    pub dropped: Option<DropReason>,
}

impl DpoExample {
    /// Prompt tokens (shared by both sides).
    pub fn prompt_len(&self) -> usize {
        self.chosen.prompt_len
    }

    /// Whether the prompt is a token prefix of both joint tokenisations.
    pub fn prompt_is_token_prefix(&self) -> bool {
        self.chosen.prompt_is_token_prefix && self.rejected.prompt_is_token_prefix
    }
}

/// Counts of what tokenisation did; printed by `inspect` and logged by the trainers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenizeReport {
    /// Input rows read.
    pub n_rows: usize,
    /// Examples produced (SFT sequences incl. text windows, or DPO pairs), dropped ones included.
    pub n_examples: usize,
    /// Examples that reach the loss.
    pub n_kept: usize,
    /// DPO pairs dropped because the prompt alone is ≥ `max_length`.
    pub n_dropped_prompt_too_long: usize,
    /// Dropped because no completion token is left.
    pub n_dropped_empty_completion: usize,
    /// DPO pairs (not otherwise dropped) whose chosen and rejected are identical after truncation.
    pub n_identical_pairs: usize,
    /// Of those, how many were dropped (all of them unless `drop_identical_pairs` is off).
    pub n_dropped_identical_pairs: usize,
    /// Examples (all, dropped included) whose prompt ids are not a token prefix of the joint ids.
    pub n_prompt_not_token_prefix: usize,
    /// Kept SFT examples that were truncated.
    pub n_truncated: usize,
    /// Kept DPO pairs whose chosen side was truncated.
    pub n_chosen_truncated: usize,
    /// Kept DPO pairs whose rejected side was truncated.
    pub n_rejected_truncated: usize,
    /// Trained tokens over kept examples (both sides for DPO).
    pub n_completion_tokens: usize,
}

impl TokenizeReport {
    /// Examples dropped for any reason.
    pub fn n_dropped(&self) -> usize {
        self.n_examples - self.n_kept
    }

    fn count_drop(&mut self, reason: Option<DropReason>) {
        match reason {
            None => self.n_kept += 1,
            Some(DropReason::PromptTooLong) => self.n_dropped_prompt_too_long += 1,
            Some(DropReason::EmptyCompletion) => self.n_dropped_empty_completion += 1,
            Some(DropReason::IdenticalPair) => self.n_dropped_identical_pairs += 1,
        }
    }
}

impl fmt::Display for TokenizeReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "rows read:                    {}", self.n_rows)?;
        writeln!(f, "examples:                     {}", self.n_examples)?;
        writeln!(f, "kept:                         {}", self.n_kept)?;
        writeln!(f, "dropped, prompt ≥ max_length: {}", self.n_dropped_prompt_too_long)?;
        writeln!(f, "dropped, empty completion:    {}", self.n_dropped_empty_completion)?;
        writeln!(
            f,
            "identical chosen/rejected:    {} ({} dropped)",
            self.n_identical_pairs, self.n_dropped_identical_pairs
        )?;
        writeln!(f, "prompt not a token prefix:    {}", self.n_prompt_not_token_prefix)?;
        writeln!(f, "truncated (sft):              {}", self.n_truncated)?;
        writeln!(
            f,
            "truncated chosen / rejected:  {} / {}",
            self.n_chosen_truncated, self.n_rejected_truncated
        )?;
        write!(f, "completion tokens:            {}", self.n_completion_tokens)
    }
}

impl TokenizeReport {
    /// The counts that explain an empty dataset, on one line (for error messages).
    pub fn summary(&self) -> String {
        format!(
            "{} rows, {} kept; dropped: {} with the prompt ≥ max_length, {} with an empty completion, {} identical pairs",
            self.n_rows,
            self.n_kept,
            self.n_dropped_prompt_too_long,
            self.n_dropped_empty_completion,
            self.n_dropped_identical_pairs
        )
    }
}

/// A tokenised SFT dataset: every example (dropped ones carry their reason) and the counts.
#[derive(Clone, Debug)]
pub struct SftDataset {
    /// All examples in input order.
    pub examples: Vec<SftExample>,
    /// Counts.
    pub report: TokenizeReport,
}

impl SftDataset {
    /// The examples that reach the loss.
    pub fn kept(&self) -> impl Iterator<Item = &SftExample> {
        self.examples.iter().filter(|e| e.dropped.is_none())
    }
}

/// A tokenised DPO dataset: every pair (dropped ones carry their reason) and the counts.
#[derive(Clone, Debug)]
pub struct DpoDataset {
    /// All pairs in input order.
    pub examples: Vec<DpoExample>,
    /// Counts.
    pub report: TokenizeReport,
}

impl DpoDataset {
    /// The pairs that reach the loss.
    pub fn kept(&self) -> impl Iterator<Item = &DpoExample> {
        self.examples.iter().filter(|e| e.dropped.is_none())
    }
}

/// Tokenises SFT rows (`text`, prompt/completion, `messages`, Alpaca, ShareGPT conversations).
pub fn tokenize_sft(records: &[Record], tok: &Tokenizer, opts: &TokenizeOptions) -> Result<SftDataset> {
    let enc = Encoder::new(tok, opts)?;
    let encoded: Vec<Vec<SeqInfo>> = records
        .par_iter()
        .map(|rec| enc.sft_row(&rec.row).map_err(|e| anyhow!("{}: {e:#}", rec.source)))
        .collect::<Result<_>>()?;
    let mut report = TokenizeReport {
        n_rows: records.len(),
        ..Default::default()
    };
    let mut examples = Vec::new();
    for (rec, infos) in records.iter().zip(encoded) {
        let n = infos.len();
        for (k, info) in infos.into_iter().enumerate() {
            let dropped = (info.seq.n_completion() == 0).then_some(DropReason::EmptyCompletion);
            report.count_drop(dropped);
            report.n_prompt_not_token_prefix += usize::from(!info.prompt_is_token_prefix);
            if dropped.is_none() {
                report.n_truncated += usize::from(info.truncated);
                report.n_completion_tokens += info.seq.n_completion();
            }
            let source = if n > 1 {
                format!("{} (window {}/{n})", rec.source, k + 1)
            } else {
                rec.source.clone()
            };
            examples.push(SftExample { source, info, dropped });
        }
    }
    report.n_examples = examples.len();
    Ok(SftDataset { examples, report })
}

/// Tokenises preference rows (explicit or implicit prompt, strings or messages, ShareGPT).
pub fn tokenize_dpo(records: &[Record], tok: &Tokenizer, opts: &TokenizeOptions) -> Result<DpoDataset> {
    let enc = Encoder::new(tok, opts)?;
    let encoded: Vec<(SeqInfo, SeqInfo)> = records
        .par_iter()
        .map(|rec| enc.dpo_row(&rec.row).map_err(|e| anyhow!("{}: {e:#}", rec.source)))
        .collect::<Result<_>>()?;
    let mut report = TokenizeReport {
        n_rows: records.len(),
        ..Default::default()
    };
    let mut examples = Vec::with_capacity(records.len());
    for (rec, (chosen, rejected)) in records.iter().zip(encoded) {
        let mut dropped = if chosen.prompt_len >= opts.max_length {
            Some(DropReason::PromptTooLong)
        } else if chosen.seq.n_completion() == 0 || rejected.seq.n_completion() == 0 {
            Some(DropReason::EmptyCompletion)
        } else {
            None
        };
        if dropped.is_none() && chosen.seq == rejected.seq {
            report.n_identical_pairs += 1;
            if opts.drop_identical_pairs {
                dropped = Some(DropReason::IdenticalPair);
            }
        }
        report.count_drop(dropped);
        let ex = DpoExample {
            source: rec.source.clone(),
            chosen,
            rejected,
            dropped,
        };
        report.n_prompt_not_token_prefix += usize::from(!ex.prompt_is_token_prefix());
        if dropped.is_none() {
            report.n_chosen_truncated += usize::from(ex.chosen.truncated);
            report.n_rejected_truncated += usize::from(ex.rejected.truncated);
            report.n_completion_tokens += ex.chosen.seq.n_completion() + ex.rejected.seq.n_completion();
        }
        examples.push(ex);
    }
    report.n_examples = examples.len();
    Ok(DpoDataset { examples, report })
}

/// Per-dataset tokenisation state, shared by the worker threads (rows are independent). A
/// missing or broken chat template is kept as its error message and only reported when a
/// conversational row needs it, so plain-text datasets work with tokenizers that have none.
struct Encoder<'a> {
    tok: &'a Tokenizer,
    opts: &'a TokenizeOptions,
    template: std::result::Result<ChatTemplate, String>,
}

impl<'a> Encoder<'a> {
    fn new(tok: &'a Tokenizer, opts: &'a TokenizeOptions) -> Result<Self> {
        ensure!(opts.max_length > 0, "max_length must be positive");
        ensure!(
            opts.prompt_template.contains("{prompt}"),
            "prompt template {:?} has no `{{prompt}}` placeholder",
            opts.prompt_template
        );
        let template = ChatTemplate::from_tokenizer(tok).map_err(|e| format!("{e:#}"));
        Ok(Self { tok, opts, template })
    }

    fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        match &self.template {
            Ok(t) => t.render(messages, add_generation_prompt),
            Err(msg) => bail!("{msg}"),
        }
    }

    fn eos_text(&self) -> Result<&'a str> {
        self.tok
            .eos()
            .map(|t| t.text.as_str())
            .ok_or_else(|| anyhow!("the tokenizer has no eos token to end completions with"))
    }

    fn templated(&self, prompt: &str) -> String {
        self.opts.prompt_template.replace("{prompt}", prompt)
    }

    fn sft_row(&self, row: &Row) -> Result<Vec<SeqInfo>> {
        match row {
            Row::Text { text } => self.text_windows(text),
            Row::PromptCompletion { prompt, completion } => Ok(vec![self.pair(prompt, completion)?]),
            Row::Alpaca {
                instruction,
                input,
                output,
            } => {
                let prompt = if input.is_empty() {
                    instruction.clone()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                Ok(vec![self.pair(
                    &Content::Text(self.templated(&prompt)),
                    &Content::Text(output.clone()),
                )?])
            }
            Row::Messages { messages } => Ok(vec![self.messages(messages)?]),
            other => bail!(
                "a {} row is a preference pair; it belongs in a DPO dataset, not SFT",
                other.kind()
            ),
        }
    }

    fn dpo_row(&self, row: &Row) -> Result<(SeqInfo, SeqInfo)> {
        let (prompt, chosen, rejected) = match row {
            Row::Preference {
                prompt: Some(p),
                chosen,
                rejected,
            } => (p.clone(), chosen.clone(), rejected.clone()),
            Row::Preference {
                prompt: None,
                chosen,
                rejected,
            } => extract_prompt(chosen, rejected)?,
            Row::ShareGpt {
                conversations,
                chosen,
                rejected,
            } => (
                Content::Text(self.templated(&flatten_sharegpt(conversations))),
                Content::Text(chosen.value.clone()),
                Content::Text(rejected.value.clone()),
            ),
            other => bail!(
                "a {} row has no chosen/rejected pair; it belongs in an SFT dataset, not DPO",
                other.kind()
            ),
        };
        let prompt_ids = self.prompt_ids(&prompt)?;
        Ok((
            self.complete(&prompt, &prompt_ids, &chosen)?,
            self.complete(&prompt, &prompt_ids, &rejected)?,
        ))
    }

    /// TRL's explicit-prompt tokenisation of one prompt/completion sequence, truncated.
    fn pair(&self, prompt: &Content, completion: &Content) -> Result<SeqInfo> {
        self.complete(prompt, &self.prompt_ids(prompt)?, completion)
    }

    /// `tok(prompt)`: plain text as `tok(text)`, conversations rendered with the generation prompt.
    fn prompt_ids(&self, prompt: &Content) -> Result<Vec<u32>> {
        match prompt {
            Content::Text(p) => self.tok.encode(p),
            Content::Messages(p) => self.tok.encode_plain(&self.render(p, true)?),
        }
    }

    /// Tokenises prompt + completion jointly and splits it at `len(prompt_ids)` (computed once
    /// per DPO pair and shared by both sides).
    fn complete(&self, prompt: &Content, prompt_ids: &[u32], completion: &Content) -> Result<SeqInfo> {
        let full_ids = match (prompt, completion) {
            (Content::Text(p), Content::Text(c)) => {
                let eos = self.eos_text()?;
                let full = if c.ends_with(eos) {
                    format!("{p}{c}")
                } else {
                    format!("{p}{c}{eos}")
                };
                self.tok.encode(&full)?
            }
            (Content::Messages(p), Content::Messages(c)) => {
                let joint: Vec<Message> = p.iter().chain(c).cloned().collect();
                self.tok.encode_plain(&self.render(&joint, false)?)?
            }
            _ => bail!("prompt and completion must both be strings or both be message lists"),
        };
        let prompt_is_token_prefix = full_ids.starts_with(prompt_ids);
        let completion = full_ids.get(prompt_ids.len()..).unwrap_or(&[]);
        let mut seq = TokenizedSeq {
            input_ids: prompt_ids.iter().chain(completion).copied().collect(),
            completion_mask: std::iter::repeat_n(0, prompt_ids.len())
                .chain(std::iter::repeat_n(1, completion.len()))
                .collect(),
        };
        Ok(self.finish(&mut seq, prompt_ids.len(), completion.len(), prompt_is_token_prefix))
    }

    /// Continued pre-training: the whole text trained, cut into `max_length` windows.
    fn text_windows(&self, text: &str) -> Result<Vec<SeqInfo>> {
        let eos = self.eos_text()?;
        let ids = if text.ends_with(eos) {
            self.tok.encode(text)?
        } else {
            self.tok.encode(&format!("{text}{eos}"))?
        };
        Ok(ids
            .chunks(self.opts.max_length)
            .map(|w| {
                let mut seq = TokenizedSeq {
                    input_ids: w.to_vec(),
                    completion_mask: vec![1; w.len()],
                };
                self.finish(&mut seq, 0, w.len(), true)
            })
            .collect())
    }

    fn messages(&self, messages: &[Message]) -> Result<SeqInfo> {
        match self.opts.messages_loss {
            MessagesLoss::AllTokens => {
                let ids = self.tok.encode_plain(&self.render(messages, false)?)?;
                let mut seq = TokenizedSeq {
                    completion_mask: vec![1; ids.len()],
                    input_ids: ids,
                };
                let n = seq.len();
                Ok(self.finish(&mut seq, 0, n, true))
            }
            MessagesLoss::LastAssistant => {
                let i = messages
                    .iter()
                    .rposition(|m| m.role == "assistant")
                    .ok_or_else(|| anyhow!("conversation has no assistant message to train on"))?;
                self.pair(
                    &Content::Messages(messages[..i].to_vec()),
                    &Content::Messages(messages[i..].to_vec()),
                )
            }
        }
    }

    /// Clears position 0 of the mask (it has no prediction), truncates, and records the facts.
    fn finish(&self, seq: &mut TokenizedSeq, prompt_len: usize, full_completion_len: usize, prefix: bool) -> SeqInfo {
        if let Some(m) = seq.completion_mask.first_mut() {
            *m = 0;
        }
        let truncated = seq.truncate(self.opts.max_length);
        SeqInfo {
            seq: std::mem::take(seq),
            prompt_len,
            full_completion_len,
            truncated,
            prompt_is_token_prefix: prefix,
        }
    }
}

/// TRL's `extract_prompt` for implicit-prompt rows: the prompt is the longest common prefix of
/// chosen and rejected (characters for strings, whole messages for conversations); for strings a
/// space right before the divergence goes to the completions, as TRL does.
pub fn extract_prompt(chosen: &Content, rejected: &Content) -> Result<(Content, Content, Content)> {
    match (chosen, rejected) {
        (Content::Text(c), Content::Text(r)) => {
            let mut idx = c
                .chars()
                .zip(r.chars())
                .take_while(|(a, b)| a == b)
                .map(|(a, _)| a.len_utf8())
                .sum::<usize>();
            let diverged = idx < c.len() && idx < r.len();
            if diverged && c[..idx].ends_with(' ') {
                idx -= 1;
            }
            Ok((
                Content::Text(c[..idx].to_string()),
                Content::Text(c[idx..].to_string()),
                Content::Text(r[idx..].to_string()),
            ))
        }
        (Content::Messages(c), Content::Messages(r)) => {
            let n = c.iter().zip(r).take_while(|(a, b)| a == b).count();
            Ok((
                Content::Messages(c[..n].to_vec()),
                Content::Messages(c[n..].to_vec()),
                Content::Messages(r[n..].to_vec()),
            ))
        }
        _ => bail!("chosen and rejected must both be strings or both be message lists"),
    }
}

/// Flattens a ShareGPT context (fixtures README §6): a single human turn is its text; otherwise
/// each turn becomes `"<Role>: <text>"` (System/Human/Assistant) joined by blank lines.
pub fn flatten_sharegpt(turns: &[Turn]) -> String {
    if let [only] = turns {
        if only.from == "human" {
            return only.value.clone();
        }
    }
    turns
        .iter()
        .map(|t| {
            let role = match t.from.as_str() {
                "system" => "System".to_string(),
                "human" => "Human".to_string(),
                "gpt" => "Assistant".to_string(),
                other => capitalise(other),
            };
            format!("{role}: {}", t.value)
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
