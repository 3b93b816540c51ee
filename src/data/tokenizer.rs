//! Hugging Face tokenizer loading with transformers' semantics.
//!
//! `tokenizer.json` is loaded with the `tokenizers` crate, but its `truncation` and `padding`
//! blocks are switched off: transformers ignores them unless asked, and the engine truncates
//! (the GPT-2 fixture carries `max_length: 50`, which would silently cut every longer row).
//! `tokenizer_config.json` (falling back to `special_tokens_map.json`) supplies the bos/eos/pad
//! tokens, `add_bos_token` and the chat template (`chat_template.jinja` beside it also counts).
//!
//! BOS follows transformers: added when the post-processor adds it, overridden by an explicit
//! `add_bos_token`, and never doubled when the text already starts with the BOS string. Any EOS a
//! post-processor would append (`add_eos_token`) is not applied: TRL appends EOS as text to
//! completions, and an EOS after the prompt would break the prompt/completion split.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A special token's text and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecialToken {
    /// The token as written in text, e.g. `<|endoftext|>`.
    pub text: String,
    /// Its vocabulary id.
    pub id: u32,
}

/// A tokenizer plus the special-token facts the data pipeline needs.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    pad: Option<SpecialToken>,
    unk: Option<SpecialToken>,
    chat_template: Option<String>,
    /// Whether `encode` starts a sequence with BOS (post-processor, or `add_bos_token`).
    adds_bos: bool,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json`,
    /// `special_tokens_map.json` (consulted for tokens the config lacks) and `chat_template.jinja`
    /// (used when the config has no template) from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{}: no such model folder (expected tokenizer.json inside)",
                dir.display()
            );
        }
        let existing = |name: &str| Some(dir.join(name)).filter(|p| p.exists());
        let config = existing("tokenizer_config.json");
        let map = existing("special_tokens_map.json");
        let mut tok = Self::load(&dir.join("tokenizer.json"), config.as_deref(), map.as_deref())?;
        if let (None, Some(jinja)) = (&tok.chat_template, existing("chat_template.jinja")) {
            tok.chat_template =
                Some(std::fs::read_to_string(&jinja).with_context(|| format!("reading {}", jinja.display()))?);
        }
        Ok(tok)
    }

    /// Loads a `tokenizer.json`, optionally with its `tokenizer_config.json`.
    pub fn from_files(tokenizer_json: &Path, config: Option<&Path>) -> Result<Self> {
        Self::load(tokenizer_json, config, None)
    }

    fn load(tokenizer_json: &Path, config: Option<&Path>, special_map: Option<&Path>) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", tokenizer_json.display()))?;
        inner
            .with_truncation(None)
            .map_err(|e| anyhow!("{}: cannot disable truncation: {e}", tokenizer_json.display()))?;
        inner.with_padding(None);
        let empty = || Value::Object(Default::default());
        let cfg = config.map(read_json).transpose()?.unwrap_or_else(empty);
        let map = special_map.map(read_json).transpose()?.unwrap_or_else(empty);
        let name = |p: Option<&Path>| p.map(|p| p.display().to_string()).unwrap_or_default();
        let lookup = |key: &str| -> Result<Option<SpecialToken>> {
            match special(&inner, &cfg, key).with_context(|| name(config))? {
                Some(t) => Ok(Some(t)),
                None => special(&inner, &map, key).with_context(|| name(special_map)),
            }
        };
        let (bos, eos, pad, unk) = (
            lookup("bos_token")?,
            lookup("eos_token")?,
            lookup("pad_token")?,
            lookup("unk_token")?,
        );
        let chat_template = match cfg.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // Older configs store named templates; "default" is the one apply_chat_template uses.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            Some(_) => bail!("{}: `chat_template` must be a string", name(config)),
        };
        // Only a BOS is taken from the post-processor: TRL appends EOS as text itself, and
        // transformers rebuilds the post-processor from `add_bos_token` when the config sets it.
        let probe = inner
            .encode("", true)
            .map_err(|e| anyhow!("{}: cannot encode: {e}", tokenizer_json.display()))?;
        let post_processor_adds_bos = bos.as_ref().is_some_and(|b| probe.get_ids().first() == Some(&b.id));
        let adds_bos = match cfg.get("add_bos_token").and_then(Value::as_bool) {
            Some(flag) => flag && bos.is_some(),
            None => post_processor_adds_bos,
        };
        Ok(Self {
            inner,
            bos,
            eos,
            pad,
            unk,
            chat_template,
            adds_bos,
        })
    }

    /// Tokenises text as transformers' `tok(text)` does: special tokens only where the tokenizer
    /// adds them (BOS when the post-processor or `add_bos_token` asks; GPT-2 adds none), no
    /// truncation. A text that already starts with the BOS string never gets a second BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode_plain(text)?;
        if let Some(bos) = &self.bos {
            if self.adds_bos && ids.first() != Some(&bos.id) {
                ids.insert(0, bos.id);
            }
        }
        Ok(ids)
    }

    /// Tokenises text with no special tokens added (what `apply_chat_template` does: the template
    /// writes any BOS itself). Special-token strings inside the text still map to their ids.
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenizer: cannot encode text: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping special tokens visible.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("tokenizer: cannot decode: {e}"))
    }

    /// The vocabulary's string for one id (byte-level pieces such as `Ġthe` for GPT-2).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The BOS token, if the tokenizer has one.
    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    /// The EOS token, if the tokenizer has one.
    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// The pad token as configured (often absent).
    pub fn pad(&self) -> Option<&SpecialToken> {
        self.pad.as_ref()
    }

    /// The unknown token, if any (passed to chat templates that mention it).
    pub fn unk(&self) -> Option<&SpecialToken> {
        self.unk.as_ref()
    }

    /// The id used for padding: the pad token, or EOS when there is none (TRL's convention).
    /// Padding is never used to build masks, so pad == eos is safe.
    pub fn pad_id(&self) -> Result<u32> {
        self.pad
            .as_ref()
            .or(self.eos.as_ref())
            .map(|t| t.id)
            .ok_or_else(|| anyhow!("tokenizer has neither a pad token nor an eos token to pad with"))
    }

    /// The Jinja chat template, if the tokenizer ships one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Whether [`Tokenizer::encode`] starts sequences with BOS.
    pub fn adds_bos(&self) -> bool {
        self.adds_bos
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}:{}:{}: malformed JSON: {e}", path.display(), e.line(), e.column()))
}

/// Reads `key` as a string or an AddedToken object (`{"content": ...}`) and resolves its id.
fn special(inner: &tokenizers::Tokenizer, cfg: &Value, key: &str) -> Result<Option<SpecialToken>> {
    let text = match cfg.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => s.clone(),
            _ => bail!("`{key}`: AddedToken object without a string `content`"),
        },
        Some(_) => bail!("`{key}`: expected a string or an AddedToken object"),
    };
    let id = inner
        .token_to_id(&text)
        .ok_or_else(|| anyhow!("`{key}` {text:?} is not in the vocabulary"))?;
    Ok(Some(SpecialToken { text, id }))
}
