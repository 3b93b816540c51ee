//! Dataset files → typed rows.
//!
//! Accepted containers: a JSON array of objects, JSON Lines (one object per non-blank line), and
//! plain text (`.txt`: one document per non-empty line, because that is how the usual pre-training
//! dumps such as `wiki_demo.txt` are laid out — a paragraph never spans lines there). Any of them
//! may be gzip-compressed; compression is detected from the magic bytes `1f 8b`, not the name.
//! A JSON array is recognised by its first non-blank byte `[`; anything else that is not `.txt`
//! is read as JSON Lines.
//!
//! Row shapes (the first rule that matches wins, so a row is never ambiguous):
//! 1. `chosen` + `rejected` + `conversations` → [`Row::ShareGpt`] (LLaMA-Factory preference layout)
//! 2. `chosen` + `rejected` + `prompt` → [`Row::Preference`] with an explicit prompt
//! 3. `chosen` + `rejected` → [`Row::Preference`] with an implicit prompt (`prompt: None`)
//! 4. `instruction` + `output` (`input` optional) → [`Row::Alpaca`]
//! 5. `prompt` + `completion` → [`Row::PromptCompletion`]
//! 6. `messages`, or `conversations` without `chosen` → [`Row::Messages`]
//! 7. `text` → [`Row::Text`]
//!
//! `prompt`, `completion`, `chosen` and `rejected` may be strings or message lists. Messages are
//! `{"role","content"}` (OpenAI/TRL) or `{"from","value"}` (ShareGPT; `human`→`user`,
//! `gpt`→`assistant`, other names kept). Every error names the file and the row: `name:LINE`
//! (1-based) for JSON Lines and text, `name[INDEX]` (0-based, as Python prints it) for arrays.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

/// One chat message, roles normalised to the OpenAI/TRL names (`system`, `user`, `assistant`, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Speaker: `system`, `user`, `assistant`, or whatever else the data named.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A field that is either plain text or a conversation (TRL calls the latter "conversational").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Content {
    /// A plain string; tokenised as is, EOS appended to completions.
    Text(String),
    /// A message list; rendered with the tokenizer's chat template.
    Messages(Vec<Message>),
}

impl Content {
    /// True for message lists, which go through the chat template.
    pub fn is_conversational(&self) -> bool {
        matches!(self, Content::Messages(_))
    }
}

/// One ShareGPT turn as written in the file (`from` kept verbatim, e.g. `human`, `gpt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    /// The speaker as written: `system`, `human`, `gpt`, ...
    pub from: String,
    /// The turn's text.
    pub value: String,
}

/// A typed dataset row; see the module docs for how keys map to variants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Row {
    /// Continued pre-training text: every token is trained.
    Text {
        /// The document.
        text: String,
    },
    /// SFT with an explicit prompt: only completion tokens are trained.
    PromptCompletion {
        /// Context, masked out of the loss.
        prompt: Content,
        /// Target, trained.
        completion: Content,
    },
    /// A whole conversation for SFT.
    Messages {
        /// The conversation in order.
        messages: Vec<Message>,
    },
    /// A preference pair; `prompt: None` is TRL's implicit-prompt format (the prompt is the
    /// longest common prefix of `chosen` and `rejected`).
    Preference {
        /// Shared context, or `None` when implicit.
        prompt: Option<Content>,
        /// Preferred response.
        chosen: Content,
        /// Dispreferred response.
        rejected: Content,
    },
    /// Alpaca SFT row; mapped to prompt/completion through a prompt template.
    Alpaca {
        /// The task.
        instruction: String,
        /// Optional extra context (empty when absent).
        input: String,
        /// The target answer.
        output: String,
    },
    /// ShareGPT preference row (LLaMA-Factory `dpo_en_demo.json` layout).
    ShareGpt {
        /// The context turns.
        conversations: Vec<Turn>,
        /// Preferred reply.
        chosen: Turn,
        /// Dispreferred reply.
        rejected: Turn,
    },
}

impl Row {
    /// True for preference rows (chosen/rejected pairs), which DPO consumes.
    pub fn is_preference(&self) -> bool {
        matches!(self, Row::Preference { .. } | Row::ShareGpt { .. })
    }

    /// Short name of the row's shape, for error messages and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            Row::Text { .. } => "text",
            Row::PromptCompletion { .. } => "prompt/completion",
            Row::Messages { .. } => "messages",
            Row::Preference { prompt: Some(_), .. } => "prompt/chosen/rejected",
            Row::Preference { prompt: None, .. } => "chosen/rejected (implicit prompt)",
            Row::Alpaca { .. } => "alpaca",
            Row::ShareGpt { .. } => "sharegpt preference",
        }
    }
}

/// A row with where it came from (`file.jsonl:17` or `file.json[3]`), for errors and reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// File name and 1-based line (JSONL, text) or 0-based array index (JSON arrays).
    pub source: String,
    /// The parsed row.
    pub row: Row,
}

/// Reads a dataset file (JSON array, JSONL or `.txt`, optionally gzip) into typed rows.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    parse_records(&name, &bytes)
}

/// Parses a dataset from memory; `name` is used for format detection (`.txt`, optionally followed
/// by `.gz`) and in every error message.
pub fn parse_records(name: &str, bytes: &[u8]) -> Result<Vec<Record>> {
    let decompressed;
    let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_end(&mut out)
            .with_context(|| format!("{name}: corrupt gzip stream"))?;
        decompressed = out;
        &decompressed[..]
    } else {
        bytes
    };
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count();
        anyhow!("{name}:{line}: invalid UTF-8")
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let base = name.strip_suffix(".gz").unwrap_or(name);
    if base.ends_with(".txt") {
        return Ok(parse_text_lines(name, text));
    }
    if text.trim_start().starts_with('[') {
        parse_json_array(name, text)
    } else {
        parse_jsonl(name, text)
    }
}

fn parse_text_lines(name: &str, text: &str) -> Vec<Record> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Record {
            source: format!("{name}:{}", i + 1),
            row: Row::Text { text: l.to_string() },
        })
        .collect()
}

fn parse_json_array(name: &str, text: &str) -> Result<Vec<Record>> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| anyhow!("{name}:{}:{}: malformed JSON: {e}", e.line(), e.column()))?;
    let Value::Array(items) = value else {
        bail!("{name}: expected a JSON array of objects")
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let source = format!("{name}[{i}]");
            let row = parse_row(v).map_err(|e| anyhow!("{source}: {e:#}"))?;
            Ok(Record { source, row })
        })
        .collect()
}

fn parse_jsonl(name: &str, text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let source = format!("{name}:{}", i + 1);
        let v: Value = serde_json::from_str(line)
            .map_err(|e| anyhow!("{source}: malformed JSON at column {}: {e}", e.column()))?;
        let row = parse_row(v).map_err(|e| anyhow!("{source}: {e:#}"))?;
        out.push(Record { source, row });
    }
    Ok(out)
}

/// Classifies one JSON object; the error text is prefixed with the row's source by the caller.
fn parse_row(v: Value) -> Result<Row> {
    let Value::Object(o) = v else {
        bail!("expected a JSON object, got {}", type_name(&v))
    };
    let has = |k: &str| o.get(k).is_some_and(|v| !v.is_null());
    if has("chosen") || has("rejected") {
        if !(has("chosen") && has("rejected")) {
            bail!("missing field `{}`", if has("chosen") { "rejected" } else { "chosen" });
        }
        if has("conversations") {
            return Ok(Row::ShareGpt {
                conversations: turns(&o, "conversations")?,
                chosen: turn(&o["chosen"]).context("field `chosen`")?,
                rejected: turn(&o["rejected"]).context("field `rejected`")?,
            });
        }
        let prompt = if has("prompt") {
            Some(content(&o, "prompt")?)
        } else {
            None
        };
        return Ok(Row::Preference {
            prompt,
            chosen: content(&o, "chosen")?,
            rejected: content(&o, "rejected")?,
        });
    }
    if has("instruction") || has("output") {
        return Ok(Row::Alpaca {
            instruction: string(&o, "instruction")?,
            input: if has("input") {
                string(&o, "input")?
            } else {
                String::new()
            },
            output: string(&o, "output")?,
        });
    }
    if has("prompt") || has("completion") {
        return Ok(Row::PromptCompletion {
            prompt: content(&o, "prompt")?,
            completion: content(&o, "completion")?,
        });
    }
    if has("messages") {
        return Ok(Row::Messages {
            messages: messages(&o, "messages")?,
        });
    }
    if has("conversations") {
        let messages = turns(&o, "conversations")?
            .into_iter()
            .map(Turn::into_message)
            .collect();
        return Ok(Row::Messages { messages });
    }
    if has("text") {
        return Ok(Row::Text {
            text: string(&o, "text")?,
        });
    }
    let keys: Vec<&str> = o.keys().map(String::as_str).collect();
    bail!(
        "unrecognised row with keys {keys:?}; expected one of text, prompt/completion, messages, \
         prompt/chosen/rejected, chosen/rejected, instruction/input/output, conversations/chosen/rejected"
    )
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn field<'a>(o: &'a Map<String, Value>, key: &str) -> Result<&'a Value> {
    match o.get(key) {
        None | Some(Value::Null) => bail!("missing field `{key}`"),
        Some(v) => Ok(v),
    }
}

fn string(o: &Map<String, Value>, key: &str) -> Result<String> {
    match field(o, key)? {
        Value::String(s) => Ok(s.clone()),
        v => bail!("field `{key}`: expected a string, got {}", type_name(v)),
    }
}

fn content(o: &Map<String, Value>, key: &str) -> Result<Content> {
    match field(o, key)? {
        Value::String(s) => Ok(Content::Text(s.clone())),
        Value::Array(_) => Ok(Content::Messages(messages(o, key)?)),
        v => bail!(
            "field `{key}`: expected a string or a list of messages, got {}",
            type_name(v)
        ),
    }
}

fn messages(o: &Map<String, Value>, key: &str) -> Result<Vec<Message>> {
    let Value::Array(items) = field(o, key)? else {
        bail!("field `{key}`: expected a list of messages")
    };
    items
        .iter()
        .enumerate()
        .map(|(i, m)| message(m).with_context(|| format!("field `{key}`[{i}]")))
        .collect()
}

/// Accepts `{"role","content"}` and ShareGPT `{"from","value"}` messages.
fn message(v: &Value) -> Result<Message> {
    let Value::Object(m) = v else {
        bail!("expected a message object, got {}", type_name(v))
    };
    if m.contains_key("from") {
        return Ok(turn(v)?.into_message());
    }
    Ok(Message {
        role: string(m, "role")?,
        content: string(m, "content")?,
    })
}

fn turns(o: &Map<String, Value>, key: &str) -> Result<Vec<Turn>> {
    let Value::Array(items) = field(o, key)? else {
        bail!("field `{key}`: expected a list of turns")
    };
    items
        .iter()
        .enumerate()
        .map(|(i, t)| turn(t).with_context(|| format!("field `{key}`[{i}]")))
        .collect()
}

fn turn(v: &Value) -> Result<Turn> {
    let Value::Object(m) = v else {
        bail!("expected a {{\"from\",\"value\"}} object, got {}", type_name(v))
    };
    Ok(Turn {
        from: string(m, "from")?,
        value: string(m, "value")?,
    })
}

impl Turn {
    /// The OpenAI/TRL role for this ShareGPT speaker (`human`→`user`, `gpt`→`assistant`).
    pub fn role(&self) -> &str {
        match self.from.as_str() {
            "human" | "user" => "user",
            "gpt" | "assistant" => "assistant",
            other => other,
        }
    }

    fn into_message(self) -> Message {
        Message {
            role: self.role().to_string(),
            content: self.value,
        }
    }
}
