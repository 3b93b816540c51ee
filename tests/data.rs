//! Data layer: formats, tokenizer, TRL v1.9 tokenisation against the e2e goldens, the data faults
//! of REFERENCE §9, batching and inspect.
mod common;

use irbridge::data::*;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};

const EOS: u32 = 50256;

fn gpt2() -> Tokenizer {
    Tokenizer::from_dir(&common::fixtures().join("models/tiny-gpt2")).expect("loading tiny-gpt2 tokenizer")
}

fn expected(name: &str) -> Value {
    let path = common::fixtures().join("e2e").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn mask(v: &Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

fn usize_of(v: &Value) -> usize {
    v.as_u64().unwrap() as usize
}

fn opts(max_length: usize) -> TokenizeOptions {
    TokenizeOptions {
        max_length,
        ..Default::default()
    }
}

/// A fresh temp directory per test (the process id keeps parallel test runs apart).
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("irbridge-data-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn rows(name: &str, text: &str) -> Vec<Record> {
    parse_records(name, text.as_bytes()).unwrap()
}

fn pc(prompt: &str, completion: &str) -> Record {
    Record {
        source: "inline".into(),
        row: Row::PromptCompletion {
            prompt: Content::Text(prompt.into()),
            completion: Content::Text(completion.into()),
        },
    }
}

fn pref(prompt: &str, chosen: &str, rejected: &str) -> Record {
    Record {
        source: "inline".into(),
        row: Row::Preference {
            prompt: Some(Content::Text(prompt.into())),
            chosen: Content::Text(chosen.into()),
            rejected: Content::Text(rejected.into()),
        },
    }
}

// ---------------------------------------------------------------- goldens

fn check_sft_golden(ds: &SftDataset, exp: &Value) {
    let rows = exp["rows"].as_array().unwrap();
    assert_eq!(ds.examples.len(), rows.len());
    for (i, (ex, want)) in ds.examples.iter().zip(rows).enumerate() {
        let info = &ex.info;
        assert_eq!(info.prompt_len, usize_of(&want["prompt_len"]), "row {i} prompt_len");
        assert_eq!(
            info.full_completion_len,
            usize_of(&want["full_completion_len"]),
            "row {i} full_completion_len"
        );
        assert_eq!(
            info.truncated,
            want["truncated"].as_bool().unwrap(),
            "row {i} truncated"
        );
        assert_eq!(
            info.prompt_is_token_prefix,
            want["prompt_is_token_prefix"].as_bool().unwrap(),
            "row {i} prefix"
        );
        assert_eq!(
            ex.dropped.is_some(),
            want["dropped"].as_bool().unwrap(),
            "row {i} dropped"
        );
        assert_eq!(info.seq.input_ids, ids(&want["input_ids"]), "row {i} input_ids");
        assert_eq!(
            info.seq.completion_mask,
            mask(&want["completion_mask"]),
            "row {i} completion_mask"
        );
        assert_eq!(info.seq.n_completion(), usize_of(&want["count"]), "row {i} count");
    }
    let agg = &exp["aggregate"];
    let r = &ds.report;
    assert_eq!(r.n_rows, usize_of(&agg["n_rows"]));
    assert_eq!(r.n_kept, usize_of(&agg["n_kept"]));
    assert_eq!(r.n_truncated, usize_of(&agg["n_truncated"]));
    assert_eq!(r.n_completion_tokens, usize_of(&agg["total_tokens"]));
    assert_eq!(r.n_completion_tokens, 2170);
    assert_eq!(r.n_prompt_not_token_prefix, 0);
}

#[test]
fn sft_golden_rows_reproduced() {
    let tok = gpt2();
    let exp = expected("sft_expected.json");
    assert_eq!(exp["aggregate"]["max_length"], 256);
    let recs = read_records(&common::fixtures().join("e2e/sft_input.jsonl")).unwrap();
    let ds = tokenize_sft(&recs, &tok, &opts(256)).unwrap();
    check_sft_golden(&ds, &exp);
}

#[test]
fn sft_golden_from_raw_alpaca_through_the_default_template() {
    let tok = gpt2();
    let exp = expected("sft_expected.json");
    let recs = read_records(&common::data_dir().join("alpaca_en_demo.json")).unwrap();
    assert!(recs.iter().all(|r| matches!(r.row, Row::Alpaca { .. })));
    let ds = tokenize_sft(&recs[..16], &tok, &opts(256)).unwrap();
    check_sft_golden(&ds, &exp);
}

fn check_dpo_golden(ds: &DpoDataset, exp: &Value) {
    let rows = exp["rows"].as_array().unwrap();
    assert_eq!(ds.examples.len(), rows.len());
    let mut dropped = Vec::new();
    for (i, (ex, want)) in ds.examples.iter().zip(rows).enumerate() {
        assert_eq!(ex.prompt_len(), usize_of(&want["prompt_len"]), "row {i} prompt_len");
        assert_eq!(
            ex.dropped.is_some(),
            want["dropped"].as_bool().unwrap(),
            "row {i} dropped"
        );
        if ex.dropped.is_some() {
            assert_eq!(ex.dropped, Some(DropReason::PromptTooLong), "row {i} drop reason");
            dropped.push(i);
        }
        assert_eq!(
            ex.prompt_is_token_prefix(),
            want["prompt_is_token_prefix"].as_bool().unwrap(),
            "row {i}"
        );
        for (side, info) in [("chosen", &ex.chosen), ("rejected", &ex.rejected)] {
            let key = |k: &str| format!("{side}_{k}");
            assert_eq!(info.prompt_len, ex.prompt_len(), "row {i} {side} prompt_len");
            assert_eq!(
                info.full_completion_len,
                usize_of(&want[key("full_completion_len")]),
                "row {i} {side} full len"
            );
            assert_eq!(
                info.truncated,
                want[key("truncated")].as_bool().unwrap(),
                "row {i} {side} truncated"
            );
            assert_eq!(
                info.seq.input_ids,
                ids(&want[key("input_ids")]),
                "row {i} {side} input_ids"
            );
            assert_eq!(
                info.seq.completion_mask,
                mask(&want[key("completion_mask")]),
                "row {i} {side} mask"
            );
            if ex.dropped.is_none() {
                assert_eq!(
                    info.seq.n_completion(),
                    usize_of(&want[key("count")]),
                    "row {i} {side} count"
                );
            }
        }
    }
    assert_eq!(dropped, vec![1, 4, 9, 15, 17, 19]);
    let agg = &exp["aggregate"];
    let r = &ds.report;
    assert_eq!(r.n_rows, usize_of(&agg["n_rows"]));
    assert_eq!(r.n_kept, usize_of(&agg["n_kept"]));
    assert_eq!(r.n_dropped(), usize_of(&agg["n_dropped"]));
    assert_eq!(r.n_dropped_prompt_too_long, 6);
    assert_eq!(r.n_chosen_truncated, usize_of(&agg["n_chosen_truncated"]));
    assert_eq!(r.n_rejected_truncated, usize_of(&agg["n_rejected_truncated"]));
    assert_eq!(r.n_prompt_not_token_prefix, usize_of(&agg["n_prompt_not_token_prefix"]));
    assert_eq!(r.n_identical_pairs, 0);
}

#[test]
fn dpo_golden_rows_reproduced() {
    let tok = gpt2();
    let exp = expected("dpo_expected.json");
    assert_eq!(exp["aggregate"]["max_length"], 256);
    let recs = read_records(&common::fixtures().join("e2e/dpo_input.jsonl")).unwrap();
    let ds = tokenize_dpo(&recs, &tok, &opts(256)).unwrap();
    check_dpo_golden(&ds, &exp);
}

#[test]
fn dpo_golden_from_raw_sharegpt_through_flattening_and_template() {
    let tok = gpt2();
    let exp = expected("dpo_expected.json");
    let recs = read_records(&common::data_dir().join("dpo_en_demo.json")).unwrap();
    assert!(recs.iter().all(|r| matches!(r.row, Row::ShareGpt { .. })));
    let ds = tokenize_dpo(&recs[..24], &tok, &opts(256)).unwrap();
    check_dpo_golden(&ds, &exp);
}

// ---------------------------------------------------------------- tokenizer

#[test]
fn tokenizer_ignores_truncation_block_and_reads_specials() {
    let tok = gpt2();
    let long = format!("word{}", " word".repeat(299));
    assert_eq!(
        tok.encode(&long).unwrap().len(),
        300,
        "tokenizer.json's max_length 50 must be ignored"
    );
    assert_eq!(tok.eos().unwrap().id, EOS);
    assert_eq!(tok.bos().unwrap().id, EOS);
    assert!(tok.pad().is_none());
    assert_eq!(tok.pad_id().unwrap(), EOS, "pad falls back to eos");
    assert!(!tok.adds_bos(), "GPT-2 adds no special tokens");
    assert_eq!(tok.encode("Hello world").unwrap(), vec![15496, 995]);
    assert_eq!(
        tok.encode("a<|endoftext|>").unwrap(),
        vec![64, EOS],
        "eos string is the single special id"
    );
    assert!(tok.chat_template().is_none());
}

/// A copy of the GPT-2 tokenizer with a BOS-adding post-processor and/or `add_bos_token`.
fn bos_tokenizer(test: &str, post_processor_bos: bool, add_bos_token: Option<bool>) -> Tokenizer {
    let src = common::fixtures().join("models/tiny-gpt2");
    let dir = temp_dir(test);
    let read =
        |name: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(src.join(name)).unwrap()).unwrap() };
    let (mut tj, mut cfg) = (read("tokenizer.json"), read("tokenizer_config.json"));
    if post_processor_bos {
        tj["post_processor"] = serde_json::json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [EOS], "tokens": ["<|endoftext|>"]}}
        });
    }
    if let Some(flag) = add_bos_token {
        cfg["add_bos_token"] = Value::Bool(flag);
    }
    write(&dir, "tokenizer.json", &tj.to_string());
    write(&dir, "tokenizer_config.json", &cfg.to_string());
    Tokenizer::from_dir(&dir).unwrap()
}

#[test]
fn never_a_double_bos() {
    for (name, pp, flag) in [("bos-cfg", false, Some(true)), ("bos-pp", true, None)] {
        let tok = bos_tokenizer(name, pp, flag);
        assert!(tok.adds_bos(), "{name}");
        assert_eq!(tok.encode("Hello").unwrap(), vec![EOS, 15496]);
        assert_eq!(
            tok.encode("<|endoftext|>Hello").unwrap(),
            vec![EOS, 15496],
            "text already starting with BOS"
        );
        let ds = tokenize_sft(&[pc("<|endoftext|>Q:", " A")], &tok, &opts(64)).unwrap();
        let seq = &ds.examples[0].info.seq;
        assert_eq!(
            seq.input_ids.iter().take_while(|&&i| i == EOS).count(),
            1,
            "one BOS: {:?}",
            seq.input_ids
        );
        assert!(ds.examples[0].info.prompt_is_token_prefix);
    }
    // `add_bos_token: false` overrides a post-processor that would add one.
    let tok = bos_tokenizer("bos-off", true, Some(false));
    assert!(!tok.adds_bos());
    assert_eq!(tok.encode("Hello").unwrap(), vec![15496]);
}

// ---------------------------------------------------------------- REFERENCE §9 faults

#[test]
fn trailing_space_shifts_the_boundary_and_is_counted() {
    let tok = gpt2();
    let prompt_ids = tok.encode("Question: why?\nAnswer: ").unwrap();
    let full_ids = tok.encode("Question: why?\nAnswer: Because<|endoftext|>").unwrap();
    assert!(
        !full_ids.starts_with(&prompt_ids),
        "BPE merges the trailing space into the answer"
    );
    let recs = vec![
        pc("Question: why?\nAnswer: ", "Because"),
        pc("Question: why?\nAnswer:", " Because"),
    ];
    let ds = tokenize_sft(&recs, &tok, &opts(64)).unwrap();
    assert_eq!(ds.report.n_prompt_not_token_prefix, 1);
    let bad = &ds.examples[0].info;
    assert!(!bad.prompt_is_token_prefix);
    // TRL: prompt_ids + full_ids[len(prompt_ids):], the mask following that split.
    let mut want = prompt_ids.clone();
    want.extend_from_slice(&full_ids[prompt_ids.len()..]);
    assert_eq!(bad.seq.input_ids, want);
    assert_eq!(
        bad.seq.completion_mask[..prompt_ids.len()],
        vec![0; prompt_ids.len()][..]
    );
    let good = &ds.examples[1].info;
    assert!(good.prompt_is_token_prefix);
    assert!(ds.examples.iter().all(|e| e.dropped.is_none()));
}

#[test]
fn first_response_token_is_trained_and_eos_appended_once() {
    let tok = gpt2();
    let ds = tokenize_sft(
        &[pc("Say hi:", " hi"), pc("Say hi:", " hi<|endoftext|>")],
        &tok,
        &opts(64),
    )
    .unwrap();
    let a = &ds.examples[0].info;
    let p = a.prompt_len;
    assert_eq!(p, tok.encode("Say hi:").unwrap().len());
    assert_eq!(a.seq.completion_mask[p - 1], 0);
    assert_eq!(a.seq.completion_mask[p], 1, "first response token must be trained");
    assert_eq!(
        a.seq.input_ids[p..],
        [tok.encode(" hi").unwrap(), vec![EOS]].concat()[..]
    );
    // A completion already ending with EOS gets no second one.
    assert_eq!(ds.examples[1].info.seq, a.seq);
    assert_eq!(a.seq.input_ids.iter().filter(|&&i| i == EOS).count(), 1);
    // The batch target for the last prompt position is the first response token.
    let b = Batch::from_seqs(&[&a.seq], tok.pad_id().unwrap()).unwrap();
    assert_eq!(b.targets[p - 1], i64::from(a.seq.input_ids[p]));
    assert_eq!(b.targets[p - 2], -100);
}

#[test]
fn eos_trained_when_pad_equals_eos() {
    let tok = gpt2();
    let pad = tok.pad_id().unwrap();
    assert_eq!(pad, tok.eos().unwrap().id);
    let ds = tokenize_sft(
        &[
            pc("Name a colour:", " red"),
            pc("Name three colours, please:", " red, green and blue"),
        ],
        &tok,
        &opts(64),
    )
    .unwrap();
    let seqs: Vec<&TokenizedSeq> = ds.kept().map(|e| &e.info.seq).collect();
    let b = Batch::from_seqs(&seqs, pad).unwrap();
    assert_eq!(b.batch_size, 2);
    let short = &seqs[0];
    let n = short.len();
    assert!(n < b.seq_len);
    let row = &b.targets[..b.seq_len];
    assert_eq!(row[n - 2], i64::from(EOS), "the final EOS is a target");
    assert!(
        row[n - 1..].iter().all(|&t| t == -100),
        "padding (also id {EOS}) is ignored"
    );
    assert!(b.input_ids[n..b.seq_len].iter().all(|&i| i == pad));
    assert_eq!(
        b.attention_mask[..b.seq_len].iter().map(|&m| m as usize).sum::<usize>(),
        n
    );
    assert_eq!(b.n_targets, vec![seqs[0].n_completion(), seqs[1].n_completion()]);
    assert_eq!(b.lengths, vec![seqs[0].len(), seqs[1].len()]);
}

#[test]
fn truncation_leaving_an_empty_completion_is_dropped_and_counted() {
    let tok = gpt2();
    let long_prompt = "one two three four five six seven eight nine ten:";
    let p = tok.encode(long_prompt).unwrap().len();
    assert!(p > 8);
    // SFT: the prompt fills max_length → no completion token left → dropped.
    let ds = tokenize_sft(&[pc(long_prompt, " eleven"), pc("one:", " two")], &tok, &opts(8)).unwrap();
    assert_eq!(ds.examples[0].dropped, Some(DropReason::EmptyCompletion));
    assert_eq!(ds.examples[0].info.seq.n_completion(), 0);
    assert!(ds.examples[0].info.truncated);
    assert_eq!(ds.report.n_dropped_empty_completion, 1);
    assert_eq!(ds.report.n_kept, 1);
    assert_eq!(ds.kept().count(), 1);
    // A prompt one token short of max_length keeps exactly one completion token.
    let ds = tokenize_sft(&[pc(long_prompt, " eleven twelve")], &tok, &opts(p + 1)).unwrap();
    assert_eq!(ds.examples[0].dropped, None);
    assert_eq!(ds.examples[0].info.seq.n_completion(), 1);
    // DPO: prompt ≥ max_length drops the pair.
    let ds = tokenize_dpo(&[pref(long_prompt, " a", " b"), pref("x:", " a", " b")], &tok, &opts(p)).unwrap();
    assert_eq!(ds.examples[0].dropped, Some(DropReason::PromptTooLong));
    assert_eq!(ds.report.n_dropped_prompt_too_long, 1);
    assert_eq!(ds.report.n_kept, 1);
}

#[test]
fn limits_and_prompt_mask_apply_to_both_chosen_and_rejected() {
    let tok = gpt2();
    let prompt = "Write a list:";
    let p = tok.encode(prompt).unwrap().len();
    let long = " a b c d e f g h i j k l m n o p q r s t u v w x y z";
    let recs = vec![
        pref(prompt, long, " z y x w v u t s r q p o n m l k j i h g"),
        pref(prompt, " ok", long),
    ];
    let ds = tokenize_dpo(&recs, &tok, &opts(16)).unwrap();
    for ex in &ds.examples {
        assert_eq!(ex.dropped, None);
        for side in [&ex.chosen, &ex.rejected] {
            assert!(side.seq.len() <= 16, "{} tokens", side.seq.len());
            assert_eq!(
                side.seq.completion_mask[..p],
                vec![0; p][..],
                "prompt masked on both sides"
            );
            assert!(side.seq.completion_mask[p..].iter().all(|&m| m == 1));
        }
    }
    let (a, b) = (&ds.examples[0], &ds.examples[1]);
    assert!(a.chosen.truncated && a.rejected.truncated);
    assert_eq!((a.chosen.seq.len(), a.rejected.seq.len()), (16, 16));
    assert!(!b.chosen.truncated && b.rejected.truncated);
    assert_eq!(b.chosen.seq.len(), p + 2);
    assert_eq!((ds.report.n_chosen_truncated, ds.report.n_rejected_truncated), (1, 2));
    // Batched: chosen rows first, then rejected, each with its own prompt mask.
    let pairs: Vec<&DpoExample> = ds.kept().collect();
    let batch = Batch::from_pairs(&pairs, tok.pad_id().unwrap()).unwrap();
    assert_eq!(batch.batch_size, 4);
    assert_eq!(batch.lengths, vec![16, p + 2, 16, 16]);
    for row in 0..4 {
        let t = &batch.targets[row * batch.seq_len..(row + 1) * batch.seq_len];
        assert!(
            t[..p - 1].iter().all(|&x| x == -100),
            "row {row}: prompt targets ignored"
        );
        assert_ne!(t[p - 1], -100, "row {row}: first completion token trained");
    }
}

#[test]
fn identical_pairs_after_truncation_are_detected() {
    let tok = gpt2();
    let recs = vec![
        pref(
            "Q:",
            " the same long answer that goes on and on, then A",
            " the same long answer that goes on and on, then B",
        ),
        pref("Q:", " yes", " no"),
    ];
    let ds = tokenize_dpo(&recs, &tok, &opts(8)).unwrap();
    assert_eq!(ds.examples[0].chosen.seq, ds.examples[0].rejected.seq);
    assert_eq!(ds.examples[0].dropped, Some(DropReason::IdenticalPair));
    assert_eq!(ds.report.n_identical_pairs, 1);
    assert_eq!(ds.report.n_dropped_identical_pairs, 1);
    assert_eq!(ds.report.n_kept, 1);
    let keep = TokenizeOptions {
        max_length: 8,
        drop_identical_pairs: false,
        ..Default::default()
    };
    let ds = tokenize_dpo(&recs, &tok, &keep).unwrap();
    assert_eq!(ds.report.n_identical_pairs, 1);
    assert_eq!(ds.report.n_kept, 2, "counted but kept when asked");
    // Not identical with room to reach the difference.
    let ds = tokenize_dpo(&recs, &tok, &opts(64)).unwrap();
    assert_eq!(ds.report.n_identical_pairs, 0);
}

#[test]
fn implicit_prompt_is_the_longest_common_prefix() {
    let tok = gpt2();
    let recs = rows(
        "x.jsonl",
        r#"{"chosen": "The sky is blue", "rejected": "The sky is green"}"#,
    );
    let Row::Preference {
        prompt: None,
        chosen,
        rejected,
    } = &recs[0].row
    else {
        panic!("{:?}", recs[0].row)
    };
    let (p, c, r) = tokenize::extract_prompt(chosen, rejected).unwrap();
    // TRL moves the space before the divergence into the completions.
    assert_eq!(p, Content::Text("The sky is".into()));
    assert_eq!(c, Content::Text(" blue".into()));
    assert_eq!(r, Content::Text(" green".into()));
    let ds = tokenize_dpo(&recs, &tok, &opts(32)).unwrap();
    assert_eq!(ds.examples[0].prompt_len(), tok.encode("The sky is").unwrap().len());
    assert!(ds.examples[0].prompt_is_token_prefix());
}

#[test]
fn text_rows_train_every_token_in_windows() {
    let tok = gpt2();
    let text = format!("word{}", " word".repeat(24));
    let recs = rows("t.jsonl", &format!("{{\"text\": \"{text}\"}}\n{{\"text\": \"\"}}\n"));
    let ds = tokenize_sft(&recs, &tok, &opts(10)).unwrap();
    let all = tok.encode(&format!("{text}<|endoftext|>")).unwrap();
    assert_eq!(all.len(), 26);
    // 26 tokens → windows of 10, 10, 6; then the empty text (just EOS) has nothing to predict.
    assert_eq!(ds.examples.len(), 4);
    let joined: Vec<u32> = ds.examples[..3]
        .iter()
        .flat_map(|e| e.info.seq.input_ids.clone())
        .collect();
    assert_eq!(joined, all);
    for e in &ds.examples[..3] {
        let m = &e.info.seq.completion_mask;
        assert_eq!(m[0], 0, "first token has no prediction");
        assert!(m[1..].iter().all(|&x| x == 1));
        assert_eq!(e.dropped, None);
    }
    assert_eq!(ds.examples[0].source, "t.jsonl:1 (window 1/3)");
    assert_eq!(ds.examples[3].dropped, Some(DropReason::EmptyCompletion));
    assert_eq!(ds.report.n_rows, 2);
    assert_eq!(ds.report.n_kept, 3);
    assert_eq!(ds.report.n_completion_tokens, 9 + 9 + 5);
}

#[test]
fn wrong_row_kind_for_the_trainer_is_an_error() {
    let tok = gpt2();
    let recs = rows(
        "d.jsonl",
        "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n",
    );
    let e = tokenize_sft(&recs, &tok, &opts(16)).unwrap_err().to_string();
    assert!(e.starts_with("d.jsonl:2: ") && e.contains("DPO"), "{e}");
    let e = tokenize_dpo(&recs, &tok, &opts(16)).unwrap_err().to_string();
    assert!(e.starts_with("d.jsonl:1: ") && e.contains("SFT"), "{e}");
}

// ---------------------------------------------------------------- chat templates

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'].strip() + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

fn templated_tokenizer(test: &str, template: &str) -> Tokenizer {
    let src = common::fixtures().join("models/tiny-gpt2");
    let dir = temp_dir(test);
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
    cfg["chat_template"] = Value::String(template.into());
    cfg["pad_token"] = serde_json::json!({"content": "!", "special": false});
    write(&dir, "tokenizer_config.json", &cfg.to_string());
    Tokenizer::from_files(&src.join("tokenizer.json"), Some(&dir.join("tokenizer_config.json"))).unwrap()
}

#[test]
fn conversational_rows_use_the_chat_template() {
    let tok = templated_tokenizer("chatml", CHATML);
    assert_eq!(tok.pad().unwrap().id, 0, "AddedToken-object pad token resolved");
    let recs = rows(
        "c.jsonl",
        r#"{"prompt": [{"role": "user", "content": " Hi "}], "completion": [{"role": "assistant", "content": "Hello"}]}
{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": [{"role": "assistant", "content": "Go away"}]}"#,
    );
    let ds = tokenize_sft(&recs[..2], &tok, &opts(128)).unwrap();
    let prompt_text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    let full_text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n";
    let a = &ds.examples[0].info;
    assert_eq!(
        a.seq.input_ids,
        tok.encode_plain(full_text).unwrap(),
        "no EOS appended to conversational rows"
    );
    assert_eq!(a.prompt_len, tok.encode_plain(prompt_text).unwrap().len());
    assert!(a.prompt_is_token_prefix);
    // messages rows train on every token by default (TRL's language-modelling default).
    let m = &ds.examples[1].info;
    assert_eq!(m.seq.n_completion(), m.seq.len() - 1);
    // ... or on the last assistant turn only.
    let last = TokenizeOptions {
        max_length: 128,
        messages_loss: MessagesLoss::LastAssistant,
        ..Default::default()
    };
    let ds2 = tokenize_sft(&recs[1..2], &tok, &last).unwrap();
    let l = &ds2.examples[0].info;
    assert_eq!(l.seq.input_ids, m.seq.input_ids);
    assert_eq!(
        l.seq.n_completion(),
        tok.encode_plain("Hello<|im_end|>\n").unwrap().len()
    );
    let dpo = tokenize_dpo(&recs[2..], &tok, &opts(128)).unwrap();
    assert_eq!(dpo.examples[0].chosen.seq.input_ids, a.seq.input_ids);
    assert_eq!(dpo.report.n_kept, 1);
}

#[test]
fn chat_template_errors_are_clear() {
    let recs = rows("c.jsonl", r#"{"messages": [{"role": "user", "content": "Hi"}]}"#);
    let e = tokenize_sft(&recs, &gpt2(), &opts(16)).unwrap_err().to_string();
    assert!(e.starts_with("c.jsonl:1: ") && e.contains("chat template"), "{e}");
    let tok = templated_tokenizer("raise", "{{ raise_exception('only user/assistant roles') }}");
    let e = format!("{:#}", tokenize_sft(&recs, &tok, &opts(16)).unwrap_err());
    assert!(e.contains("only user/assistant roles"), "{e}");
    let tok = templated_tokenizer(
        "date",
        "{{ strftime_now('%Y') }}{% for m in messages %}{% if loop.index > 0 %}{% break %}{% endif %}{% endfor %}",
    );
    let ds = tokenize_sft(&recs, &tok, &opts(16)).unwrap();
    let text = tok.decode(&ds.examples[0].info.seq.input_ids).unwrap();
    assert!(text.len() == 4 && text.starts_with("20"), "{text}");
}

// ---------------------------------------------------------------- formats

#[test]
fn format_text_jsonl_and_txt() {
    let r = rows("a.jsonl", "{\"text\": \"hello\"}\n\n{\"text\": \"world\"}\n");
    assert_eq!(r.len(), 2);
    assert_eq!(r[1].source, "a.jsonl:3");
    assert_eq!(r[1].row, Row::Text { text: "world".into() });
    let r = rows("b.txt", "first doc\n\n  \nsecond doc\n");
    assert_eq!(
        r.iter().map(|x| x.source.as_str()).collect::<Vec<_>>(),
        ["b.txt:1", "b.txt:4"]
    );
    assert_eq!(
        r[1].row,
        Row::Text {
            text: "second doc".into()
        }
    );
}

#[test]
fn format_prompt_completion_and_messages() {
    let r = rows(
        "a.json",
        r#"[{"prompt": "p", "completion": "c"}, {"messages": [{"role": "user", "content": "u"}]}, {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g"}]}]"#,
    );
    assert_eq!(r[0].source, "a.json[0]");
    assert_eq!(
        r[0].row,
        Row::PromptCompletion {
            prompt: Content::Text("p".into()),
            completion: Content::Text("c".into())
        }
    );
    assert_eq!(
        r[1].row,
        Row::Messages {
            messages: vec![Message {
                role: "user".into(),
                content: "u".into()
            }]
        }
    );
    let Row::Messages { messages } = &r[2].row else {
        panic!()
    };
    assert_eq!(
        messages.iter().map(|m| m.role.as_str()).collect::<Vec<_>>(),
        ["user", "assistant"]
    );
}

#[test]
fn format_preference_explicit_implicit_and_conversational() {
    let r = rows(
        "p.jsonl",
        r#"{"prompt": "p", "chosen": "c", "rejected": "r"}
{"chosen": "c", "rejected": "r"}
{"prompt": [{"role": "user", "content": "u"}], "chosen": [{"role": "assistant", "content": "c"}], "rejected": [{"role": "assistant", "content": "r"}]}"#,
    );
    assert!(matches!(&r[0].row, Row::Preference { prompt: Some(Content::Text(p)), .. } if p == "p"));
    assert!(matches!(&r[1].row, Row::Preference { prompt: None, .. }));
    let Row::Preference {
        prompt: Some(p),
        chosen,
        ..
    } = &r[2].row
    else {
        panic!()
    };
    assert!(p.is_conversational() && chosen.is_conversational());
}

#[test]
fn format_alpaca_and_sharegpt() {
    let r = rows(
        "x.jsonl",
        r#"{"instruction": "i", "input": "", "output": "o"}
{"instruction": "i", "output": "o"}
{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "h"}], "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "r"}}"#,
    );
    assert_eq!(
        r[0].row,
        Row::Alpaca {
            instruction: "i".into(),
            input: "".into(),
            output: "o".into()
        }
    );
    assert_eq!(r[1].row, r[0].row);
    let Row::ShareGpt {
        conversations, chosen, ..
    } = &r[2].row
    else {
        panic!()
    };
    assert_eq!(tokenize::flatten_sharegpt(conversations), "System: s\n\nHuman: h");
    assert_eq!(chosen.value, "c");
    assert_eq!(tokenize::flatten_sharegpt(&conversations[1..]), "h");
}

#[test]
fn format_gzip_detected_by_magic_bytes() {
    let dir = temp_dir("gzip");
    let text = "{\"prompt\": \"p\", \"completion\": \"c\"}\n{\"prompt\": \"q\"}\n";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(text.as_bytes()).unwrap();
    let bytes = gz.finish().unwrap();
    // Named without .gz: detection is by content.
    let p = dir.join("data.jsonl");
    std::fs::write(&p, &bytes).unwrap();
    let e = read_records(&p).unwrap_err().to_string();
    assert_eq!(e, "data.jsonl:2: missing field `completion`");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert!(read_records(&p).unwrap_err().to_string().contains("corrupt gzip"));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(b"line one\nline two\n").unwrap();
    let p = dir.join("docs.txt.gz");
    std::fs::write(&p, gz.finish().unwrap()).unwrap();
    assert_eq!(read_records(&p).unwrap().len(), 2);
}

#[test]
fn malformed_input_errors_name_file_and_line() {
    let dir = temp_dir("errors");
    let p = write(&dir, "data.jsonl", "{\"text\": \"a\"}\n{\"text\": \"b\"\n");
    let e = read_records(&p).unwrap_err().to_string();
    assert!(e.starts_with("data.jsonl:2: malformed JSON"), "{e}");
    let cases = [
        (
            "m.jsonl",
            "{\"text\": \"a\"}\n{\"prompt\": \"a\", \"chosen\": \"b\"}",
            "m.jsonl:2: missing field `rejected`",
        ),
        ("m.jsonl", "\"str\"", "m.jsonl:1: expected a JSON object, got a string"),
        (
            "m.json",
            "[{\"text\": \"a\"}, 7]",
            "m.json[1]: expected a JSON object, got a number",
        ),
        (
            "m.json",
            "[{\"instruction\": \"a\", \"output\": 3}]",
            "m.json[0]: field `output`: expected a string, got a number",
        ),
        (
            "m.jsonl",
            "{\"foo\": 1}",
            "m.jsonl:1: unrecognised row with keys [\"foo\"]",
        ),
    ];
    for (name, text, want) in cases {
        let e = parse_records(name, text.as_bytes()).unwrap_err().to_string();
        assert!(e.starts_with(want), "{e:?} should start with {want:?}");
    }
    let e = parse_records("m.json", b"[{\"text\": \"a\"},\n {\"text\": }]")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("m.json:2:"), "{e}");
    let e = format!(
        "{:#}",
        parse_records("m.jsonl", b"{\"messages\": [{\"role\": \"user\"}]}").unwrap_err()
    );
    assert!(e.contains("m.jsonl:1") && e.contains("`content`"), "{e}");
    let e = parse_records("bad.jsonl", b"{\"text\": \"a\"}\n\xff\n")
        .unwrap_err()
        .to_string();
    assert_eq!(e, "bad.jsonl:2: invalid UTF-8");
    let e = read_records(&dir.join("missing.jsonl")).unwrap_err().to_string();
    assert!(e.contains("missing.jsonl"), "{e}");
}

#[test]
fn real_data_files_parse() {
    let d = common::data_dir();
    let alpaca = read_records(&d.join("alpaca_en_demo.json")).unwrap();
    assert_eq!(alpaca.len(), 999);
    let dpo = read_records(&d.join("dpo_en_demo.json")).unwrap();
    assert_eq!(dpo.len(), 300);
    assert!(dpo.iter().all(|r| matches!(r.row, Row::ShareGpt { .. })));
    let c4 = read_records(&d.join("c4_demo.jsonl")).unwrap();
    assert!(!c4.is_empty() && c4.iter().all(|r| matches!(r.row, Row::Text { .. })));
    let wiki = read_records(&d.join("wiki_demo.txt")).unwrap();
    assert_eq!(wiki.len(), 30);
    // The whole corpora tokenise; text windows never exceed max_length.
    let tok = gpt2();
    let ds = tokenize_sft(&wiki, &tok, &opts(1024)).unwrap();
    assert!(ds.examples.len() > wiki.len());
    assert!(ds.examples.iter().all(|e| e.info.seq.len() <= 1024));
    let ds = tokenize_dpo(&dpo, &tok, &opts(1024)).unwrap();
    assert_eq!(ds.report.n_rows, 300);
    assert_eq!(ds.report.n_kept + ds.report.n_dropped(), 300);
}

// ---------------------------------------------------------------- batch + inspect

#[test]
fn batch_targets_follow_the_definition() {
    let tok = gpt2();
    let recs = read_records(&common::fixtures().join("e2e/sft_input.jsonl")).unwrap();
    let ds = tokenize_sft(&recs[..8], &tok, &opts(256)).unwrap();
    let seqs: Vec<&TokenizedSeq> = ds.kept().map(|e| &e.info.seq).collect();
    let b = Batch::from_seqs(&seqs, EOS).unwrap();
    assert_eq!(b.seq_len, seqs.iter().map(|s| s.len()).max().unwrap());
    for (row, s) in seqs.iter().enumerate() {
        for t in 0..b.seq_len {
            let i = row * b.seq_len + t;
            let want = if t + 1 < s.len() && s.completion_mask[t + 1] == 1 {
                i64::from(s.input_ids[t + 1])
            } else {
                -100
            };
            assert_eq!(b.targets[i], want, "row {row} t {t}");
            assert_eq!(b.attention_mask[i], u8::from(t < s.len()));
        }
        assert_eq!(b.n_targets[row], s.n_completion());
    }
    assert_eq!(b.total_targets(), seqs.iter().map(|s| s.n_completion()).sum::<usize>());
    assert!(Batch::from_seqs(&[], EOS).is_err());
    let bad = TokenizedSeq {
        input_ids: vec![1, 2],
        completion_mask: vec![0],
    };
    assert!(Batch::from_seqs(&[&bad], EOS)
        .unwrap_err()
        .to_string()
        .contains("completion_mask"));
}

#[test]
fn inspect_shows_masks_and_counts() {
    let tok = gpt2();
    let ds = tokenize_sft(&[pc("Say hi:", " hi")], &tok, &opts(64)).unwrap();
    let out = inspect_sft(&ds, &tok, 5, false).unwrap();
    assert!(out.contains("[Say| hi|:] hi|<|endoftext|>"), "{out}");
    assert!(out.contains("kept:                         1"), "{out}");
    let recs = read_records(&common::fixtures().join("e2e/dpo_input.jsonl")).unwrap();
    let dpo = tokenize_dpo(&recs[..2], &tok, &opts(256)).unwrap();
    let out = inspect_dpo(&dpo, &tok, 2, true).unwrap();
    assert!(out.contains("DROPPED (prompt ≥ max_length)"), "{out}");
    assert!(out.contains("\x1b[2m###"), "prompt dimmed: {out}");
    assert!(
        out.contains("chosen   256 tokens: prompt 33, trained 223, truncated"),
        "{out}"
    );
}
