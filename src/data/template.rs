//! Chat templates: the tokenizer's Jinja `chat_template` rendered with minijinja the way
//! transformers' `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, loop controls,
//! Python string methods such as `.strip()`, `raise_exception`, `strftime_now`, and the special
//! tokens passed as variables).
//!
//! There is deliberately no built-in default template: transformers 5 removed class defaults, and
//! guessing a format the model was never trained on would silently train the wrong thing. A
//! conversational row on a tokenizer without a template is an error that says so.

use super::formats::Message;
use super::tokenizer::Tokenizer;
use anyhow::{anyhow, Result};
use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind};
use std::time::{SystemTime, UNIX_EPOCH};

const NAME: &str = "chat_template";

/// A compiled chat template plus the special-token strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    pad_token: String,
    unk_token: String,
}

impl ChatTemplate {
    /// Compiles the tokenizer's template; errors when the tokenizer has none.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let source = tok.chat_template().ok_or_else(|| {
            anyhow!(
                "conversational rows need a chat template, but the tokenizer has none \
                 (no `chat_template` in tokenizer_config.json and no chat_template.jinja)"
            )
        })?;
        let text = |t: Option<&super::tokenizer::SpecialToken>| t.map(|t| t.text.clone()).unwrap_or_default();
        Self::new(
            source,
            &text(tok.bos()),
            &text(tok.eos()),
            &text(tok.pad()),
            &text(tok.unk()),
        )
    }

    /// Compiles a template given as source text, with the special-token strings it may use.
    pub fn new(source: &str, bos_token: &str, eos_token: &str, pad_token: &str, unk_token: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("chat template syntax: {e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            strftime_utc(&fmt, now_secs())
        });
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| anyhow!("chat template does not compile: {e:#}"))?;
        Ok(Self {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
            pad_token: pad_token.to_string(),
            unk_token: unk_token.to_string(),
        })
    }

    /// Renders a conversation; `add_generation_prompt` appends the assistant header that starts a
    /// reply (used for the prompt part of conversational rows).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let msgs: Vec<_> = messages
            .iter()
            .map(|m| context! { role => &m.role, content => &m.content })
            .collect();
        let tmpl = self.env.get_template(NAME).map_err(|e| anyhow!("chat template: {e}"))?;
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
            pad_token => &self.pad_token,
            unk_token => &self.unk_token,
        })
        .map_err(|e| anyhow!("chat template failed to render: {e:#}"))
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A small `strftime` (UTC) covering what chat templates use for "today's date"
/// (`%d %b %Y`, `%Y-%m-%d`, ...); unknown directives are written through unchanged.
fn strftime_utc(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Howard Hinnant's days-to-civil conversion.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strftime_utc;

    #[test]
    fn strftime_known_dates() {
        // 2024-02-29 13:05:09 UTC (a leap day) and the epoch.
        assert_eq!(strftime_utc("%d %b %Y %H:%M:%S", 1_709_211_909), "29 Feb 2024 13:05:09");
        assert_eq!(strftime_utc("%Y-%m-%d %B %% %q", 0), "1970-01-01 January % %q");
    }
}
