//! The built-in task: a small synthetic language whose true reward is known.
//!
//! A prompt names a topic (`about sea`). A response is one to three clauses
//! `det [adj] noun verb det [adj] noun`, joined by `and`, then `<eos>`. Adjectives and verbs carry
//! a hidden valence (`bright` +2 … `cruel` −2, `loves` +1 … `hurts` −1), nouns belong to a
//! topic. Three distributions over responses are defined by one [`Style`] each:
//!
//! - the **base** distribution (what the base model is pre-trained on): valence-neutral word
//!   choice, nouns on topic three times in four;
//! - the **expert** distribution (the SFT demonstrations): adjectives almost always, tilted towards
//!   positive valence, nouns nearly always on topic;
//! - a preference pair is two base responses to one prompt, labelled by Bradley–Terry on the true
//!   reward `r*` ([`reward`]).
//!
//! `r*` = mean valence per clause + ½·(on-topic − off-topic nouns)/nouns − 2 per grammar error.
//! The maximum is 5.5 (every clause `the bright … loves the bright …` on topic); the base averages
//! about 0.25 and the expert about 3. Grammar errors — a token the grammar does not allow where it
//! stands, a fourth clause, no `<eos>` — are what drifting off the base language costs: every base
//! and expert response is grammatical, so a policy only loses reward there by moving mass where
//! the base model has none (the reward-vs-KL frontier of the DPO paper).

use anyhow::{anyhow, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Padding token (never trained).
pub const PAD: &str = "<pad>";
/// End of a response.
pub const EOS: &str = "<eos>";
/// Unknown words (the word-level tokenizer needs one; the task never produces it).
pub const UNK: &str = "<unk>";

/// Topics a prompt can name; `about <topic>` is the prompt text.
pub const TOPICS: [&str; 4] = ["sea", "forest", "city", "sky"];
/// Nouns of each topic, in [`TOPICS`] order.
pub const NOUNS: [[&str; 4]; 4] = [
    ["wave", "ship", "shore", "fish"],
    ["tree", "fox", "moss", "owl"],
    ["street", "tower", "train", "crowd"],
    ["cloud", "star", "moon", "bird"],
];
/// Adjectives and their valence.
pub const ADJECTIVES: [(&str, i32); 8] = [
    ("bright", 2),
    ("warm", 1),
    ("calm", 1),
    ("old", 0),
    ("small", 0),
    ("cold", -1),
    ("dark", -1),
    ("cruel", -2),
];
/// Verbs and their valence.
pub const VERBS: [(&str, i32); 6] = [
    ("loves", 1),
    ("helps", 1),
    ("sees", 0),
    ("finds", 0),
    ("fears", -1),
    ("hurts", -1),
];
/// Determiners.
pub const DETERMINERS: [&str; 2] = ["the", "a"];
/// The clause joiner.
pub const AND: &str = "and";
/// The word that opens every prompt.
pub const ABOUT: &str = "about";
/// Clauses a response may have.
pub const MAX_CLAUSES: usize = 3;
/// Tokens the longest grammatical response takes, `<eos>` included.
pub const MAX_RESPONSE_TOKENS: usize = 7 * MAX_CLAUSES + (MAX_CLAUSES - 1) + 1;
/// Reward lost per grammar error.
pub const ERROR_PENALTY: f64 = 2.0;

/// The vocabulary in id order: special tokens first, then prompt words, then the response words.
pub fn vocabulary() -> Vec<&'static str> {
    let mut v = vec![PAD, EOS, UNK, ABOUT];
    v.extend(TOPICS);
    v.extend(DETERMINERS);
    v.extend(ADJECTIVES.iter().map(|a| a.0));
    v.extend(VERBS.iter().map(|a| a.0));
    v.push(AND);
    v.extend(NOUNS.iter().flatten());
    v
}

/// What a response word is, for the grammar and the reward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Word {
    /// `the`, `a`.
    Det,
    /// An adjective with its valence.
    Adj(i32),
    /// A noun of topic `t`.
    Noun(usize),
    /// A verb with its valence.
    Verb(i32),
    /// `and`.
    And,
    /// `<eos>`.
    Eos,
    /// Anything else (special tokens, prompt words): never grammatical in a response.
    Other,
}

/// Classifies a word.
pub fn word(text: &str) -> Word {
    if DETERMINERS.contains(&text) {
        return Word::Det;
    }
    if let Some(&(_, v)) = ADJECTIVES.iter().find(|a| a.0 == text) {
        return Word::Adj(v);
    }
    if let Some(&(_, v)) = VERBS.iter().find(|a| a.0 == text) {
        return Word::Verb(v);
    }
    if let Some(t) = NOUNS.iter().position(|ns| ns.contains(&text)) {
        return Word::Noun(t);
    }
    match text {
        AND => Word::And,
        EOS => Word::Eos,
        _ => Word::Other,
    }
}

/// The true reward of a response and its parts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Reward {
    /// `r*`.
    pub total: f64,
    /// Σ valence of the adjectives and verbs.
    pub valence: i32,
    /// Complete clauses.
    pub clauses: usize,
    /// Nouns on the prompt's topic, and off it.
    pub on_topic: usize,
    /// Nouns off the prompt's topic.
    pub off_topic: usize,
    /// Grammar errors (see the module docs).
    pub errors: usize,
}

/// Where the grammar automaton stands inside a clause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Expecting the subject's determiner.
    SubjectDet,
    /// After it: an adjective or the noun.
    SubjectAdjOrNoun,
    /// After the adjective: the noun.
    SubjectNoun,
    Verb,
    ObjectDet,
    ObjectAdjOrNoun,
    ObjectNoun,
    /// A clause is complete: `and` or `<eos>`.
    End,
}

/// Scores a response (its words, in order, ending at `<eos>` or wherever generation stopped)
/// for a prompt about topic `topic`. A token the grammar does not allow where it stands is one
/// error and is skipped; `<eos>` before a clause is complete, a fourth clause, and a response
/// without `<eos>` are one error each.
pub fn reward(topic: usize, words: &[&str]) -> Reward {
    let mut r = Reward::default();
    let mut slot = Slot::SubjectDet;
    let mut ended = false;
    for &w in words {
        let class = word(w);
        let next = match (slot, class) {
            (Slot::SubjectDet, Word::Det) => Some(Slot::SubjectAdjOrNoun),
            (Slot::ObjectDet, Word::Det) => Some(Slot::ObjectAdjOrNoun),
            (Slot::SubjectAdjOrNoun, Word::Adj(_)) => Some(Slot::SubjectNoun),
            (Slot::ObjectAdjOrNoun, Word::Adj(_)) => Some(Slot::ObjectNoun),
            (Slot::SubjectAdjOrNoun | Slot::SubjectNoun, Word::Noun(_)) => Some(Slot::Verb),
            (Slot::ObjectAdjOrNoun | Slot::ObjectNoun, Word::Noun(_)) => Some(Slot::End),
            (Slot::Verb, Word::Verb(_)) => Some(Slot::ObjectDet),
            (Slot::End, Word::And) if r.clauses + 1 < MAX_CLAUSES => Some(Slot::SubjectDet),
            _ => None,
        };
        if class == Word::Eos {
            if slot != Slot::End {
                r.errors += 1;
            } else {
                r.clauses += 1;
            }
            ended = true;
            break;
        }
        match next {
            None => r.errors += 1,
            Some(n) => {
                match class {
                    Word::Adj(v) | Word::Verb(v) => r.valence += v,
                    Word::Noun(t) if t == topic => r.on_topic += 1,
                    Word::Noun(_) => r.off_topic += 1,
                    Word::And => r.clauses += 1,
                    _ => {}
                }
                slot = n;
            }
        }
    }
    if !ended {
        r.errors += 1;
    }
    let nouns = r.on_topic + r.off_topic;
    let topical = if nouns == 0 {
        0.0
    } else {
        0.5 * (r.on_topic as f64 - r.off_topic as f64) / nouns as f64
    };
    r.total = r.valence as f64 / r.clauses.max(1) as f64 + topical - ERROR_PENALTY * r.errors as f64;
    r
}

/// How a distribution over responses chooses its words.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Style {
    /// Probability that a noun phrase has an adjective.
    pub adjective: f64,
    /// Word choice ∝ `exp(tilt · valence)` for adjectives and verbs (0: uniform).
    pub tilt: f64,
    /// Probability that a noun is on the prompt's topic (else uniform over the other topics).
    pub on_topic: f64,
    /// Probability of another clause after each one (while fewer than [`MAX_CLAUSES`]).
    pub another_clause: f64,
}

/// The base distribution.
pub const BASE: Style = Style {
    adjective: 0.5,
    tilt: 0.0,
    on_topic: 0.75,
    another_clause: 0.35,
};

/// The expert (demonstration) distribution.
pub const EXPERT: Style = Style {
    adjective: 0.9,
    tilt: 1.0,
    on_topic: 0.95,
    another_clause: 0.35,
};

fn tilted<'a>(rng: &mut ChaCha8Rng, items: &[(&'a str, i32)], tilt: f64) -> &'a str {
    let w: Vec<f64> = items.iter().map(|&(_, v)| (tilt * v as f64).exp()).collect();
    let mut u = rng.gen::<f64>() * w.iter().sum::<f64>();
    for (&(text, _), &wi) in items.iter().zip(&w) {
        if u < wi {
            return text;
        }
        u -= wi;
    }
    items[items.len() - 1].0
}

impl Style {
    fn noun_phrase(&self, rng: &mut ChaCha8Rng, topic: usize, out: &mut Vec<&'static str>) {
        out.push(DETERMINERS[rng.gen_range(0..DETERMINERS.len())]);
        if rng.gen::<f64>() < self.adjective {
            out.push(tilted(rng, &ADJECTIVES, self.tilt));
        }
        let t = if rng.gen::<f64>() < self.on_topic {
            topic
        } else {
            let other = rng.gen_range(0..TOPICS.len() - 1);
            if other >= topic {
                other + 1
            } else {
                other
            }
        };
        out.push(NOUNS[t][rng.gen_range(0..NOUNS[t].len())]);
    }

    /// Draws a response to a prompt about `topic` (words, without `<eos>`).
    pub fn sample(&self, rng: &mut ChaCha8Rng, topic: usize) -> Vec<&'static str> {
        let mut out = Vec::with_capacity(MAX_RESPONSE_TOKENS);
        for clause in 0..MAX_CLAUSES {
            if clause > 0 {
                if rng.gen::<f64>() >= self.another_clause {
                    break;
                }
                out.push(AND);
            }
            self.noun_phrase(rng, topic, &mut out);
            out.push(tilted(rng, &VERBS, self.tilt));
            self.noun_phrase(rng, topic, &mut out);
        }
        out
    }
}

/// Mean `r*` of `n` responses drawn from `style` (topics in turn): the reference level of a
/// distribution, estimated the way the policies are.
pub fn mean_reward(style: &Style, seed: u64, n: usize) -> f64 {
    use rand::SeedableRng;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let total: f64 = (0..n)
        .map(|i| {
            let t = i % TOPICS.len();
            let mut w = style.sample(&mut rng, t);
            w.push(EOS);
            reward(t, &w).total
        })
        .sum();
    total / n.max(1) as f64
}

/// The prompt text for a topic.
pub fn prompt(topic: usize) -> String {
    format!("{ABOUT} {}", TOPICS[topic])
}

/// The topic a prompt text names.
pub fn topic_of(prompt: &str) -> Result<usize> {
    let mut it = prompt.split_whitespace();
    match (it.next(), it.next(), it.next()) {
        (Some(ABOUT), Some(t), None) => TOPICS
            .iter()
            .position(|&x| x == t)
            .ok_or_else(|| anyhow!("prompt {prompt:?}: unknown topic {t:?} (topics: {})", TOPICS.join(", "))),
        _ => Err(anyhow!("prompt {prompt:?} is not of the form `{ABOUT} <topic>`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn reward_of_hand_written_responses() {
        let best = "the bright wave loves the bright ship"
            .split(' ')
            .chain([EOS])
            .collect::<Vec<_>>();
        let r = reward(0, &best);
        assert_eq!((r.valence, r.clauses, r.errors), (5, 1, 0));
        assert!((r.total - 5.5).abs() < 1e-12);
        let off = reward(1, &best);
        assert!((off.total - 4.5).abs() < 1e-12, "off topic: {off:?}");
        // A missing noun, then eos mid-clause: two errors.
        let bad = reward(0, &["the", "bright", "loves", EOS]);
        assert_eq!(bad.errors, 2, "{bad:?}");
        // A fourth clause is an error; no eos is an error.
        let clause = ["the", "wave", "sees", "a", "fish"];
        let mut four: Vec<&str> = Vec::new();
        for i in 0..4 {
            if i > 0 {
                four.push(AND);
            }
            four.extend(clause);
        }
        let r4 = reward(0, &four);
        assert_eq!((r4.clauses, r4.errors), (2, 1 + 5 + 1), "{r4:?}");
        assert_eq!(reward(0, &[]).errors, 1);
    }

    #[test]
    fn samples_are_grammatical_and_styles_differ() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (mut base, mut expert) = (0.0, 0.0);
        let n = 4000;
        for i in 0..n {
            let t = i % TOPICS.len();
            for (style, acc) in [(BASE, &mut base), (EXPERT, &mut expert)] {
                let mut w = style.sample(&mut rng, t);
                assert!(w.len() < MAX_RESPONSE_TOKENS);
                w.push(EOS);
                let r = reward(t, &w);
                assert_eq!(r.errors, 0, "{w:?}");
                *acc += r.total / n as f64;
            }
        }
        assert!((base - 0.25).abs() < 0.1, "base mean reward {base}");
        assert!(expert > 2.5, "expert mean reward {expert}");
        assert!(vocabulary().len() == 41);
    }

    #[test]
    fn prompts_round_trip() {
        for t in 0..TOPICS.len() {
            assert_eq!(topic_of(&prompt(t)).unwrap(), t);
        }
        assert!(topic_of("about mars")
            .unwrap_err()
            .to_string()
            .contains("unknown topic"));
        assert!(topic_of("hello").is_err());
    }
}
