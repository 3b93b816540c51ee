//! The CPU model against the transformers goldens (fixtures README §2–§3): logits, token and
//! sequence log-probs, every stored parameter gradient; plus chunking, accumulation, finite
//! differences, save/load round trips, sharded/BF16 loading and the loader's errors.

mod common;

use common::{assert_close, fixtures, load_goldens, Golden, TempDir};
use irbridge::model::{Batch, Grads, Model};
use irbridge::ops::logsoftmax::{forward_cpu, ForwardOut, IGNORE_INDEX};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const MODELS: [&str; 3] = ["tiny-gpt2", "tiny-llama", "tiny-qwen2"];

fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

struct Fixture {
    model: Model,
    g: HashMap<String, Golden>,
    json: serde_json::Value,
    batch: Batch,
}

fn fixture(name: &str) -> Fixture {
    let model = Model::load(&model_dir(name)).unwrap();
    let g = load_goldens(&fixtures().join(format!("golden/{name}.safetensors")));
    let text = std::fs::read_to_string(fixtures().join(format!("golden/{name}.json"))).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let (b, t) = (g["input_ids"].shape[0], g["input_ids"].shape[1]);
    let lengths: Vec<usize> = g["lengths"].i64().iter().map(|&l| l as usize).collect();
    assert_eq!(
        Batch::lengths_from_mask(&g["attention_mask"].i64(), b, t).unwrap(),
        lengths
    );
    let batch = Batch::causal_lm(&g["input_ids"].i64(), b, t, &lengths).unwrap();
    Fixture { model, g, json, batch }
}

fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Logits at the stored rows/columns/lse, token and sequence log-probs, full-logits vs chunked.
fn check_forward(name: &str) {
    let fx = fixture(name);
    let (m, g, batch) = (&fx.model, &fx.g, &fx.batch);
    let (b_n, t_n, v) = (batch.batch(), batch.seq(), m.config().vocab_size);
    let logits = m.forward_logits(batch).unwrap();
    assert_eq!(logits.len(), b_n * t_n * v);

    let pos = g["logits_rows_pos"].i64();
    let rows = g["logits_rows"].f32();
    for (k, bt) in pos.chunks(2).enumerate() {
        let at = (bt[0] as usize * t_n + bt[1] as usize) * v;
        assert_close(
            &format!("{name} logits_rows[{k}]"),
            &f64s(&logits[at..at + v]),
            &f64s(&rows[k * v..(k + 1) * v]),
            0.0,
            1e-4,
        );
    }
    let cols = g["logits_cols_ids"].i64();
    let want_cols = g["logits_cols"].f32();
    let want_lse = g["logits_lse"].f32();
    let (mut got_c, mut exp_c, mut got_l, mut exp_l) = (vec![], vec![], vec![], vec![]);
    for b in 0..b_n {
        for t in 0..batch.lengths()[b] {
            let row = &logits[(b * t_n + t) * v..][..v];
            for (j, &c) in cols.iter().enumerate() {
                got_c.push(row[c as usize] as f64);
                exp_c.push(want_cols[(b * t_n + t) * cols.len() + j] as f64);
            }
            let mx = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            got_l.push(mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln());
            exp_l.push(want_lse[b * t_n + t] as f64);
        }
    }
    assert_close(&format!("{name} logits_cols"), &got_c, &exp_c, 0.0, 1e-4);
    assert_close(&format!("{name} logits_lse"), &got_l, &exp_l, 0.0, 1e-4);

    // Chunked path.
    let f = m.forward(batch).unwrap();
    let want_tok = g["token_logps"].f32();
    let got_tok: Vec<f64> = (0..b_n)
        .flat_map(|b| (0..t_n - 1).map(move |t| (b, t)))
        .map(|(b, t)| f.logp()[b * t_n + t] as f64)
        .collect();
    assert_close(&format!("{name} token_logps"), &got_tok, &f64s(&want_tok), 0.0, 1e-4);
    assert!(
        f.logp().iter().skip(t_n - 1).step_by(t_n).all(|&x| x == 0.0),
        "{name}: last position has no target"
    );
    assert_close(
        &format!("{name} seq_logps"),
        &f.sequence_logps(),
        &g["seq_logps"].data,
        0.0,
        2e-3,
    );
    let mask = f.target_mask();
    let (mut chunk_lse, mut gold_lse) = (vec![], vec![]);
    for i in (0..b_n * t_n).filter(|&i| mask[i]) {
        chunk_lse.push(f.lse()[i] as f64);
        gold_lse.push(want_lse[i] as f64);
    }
    assert_close(&format!("{name} chunked lse"), &chunk_lse, &gold_lse, 0.0, 1e-4);

    // Full-logits path through the log-softmax twin == chunked path.
    let (mut lse, mut logp, mut ent) = (vec![0f32; b_n * t_n], vec![0f32; b_n * t_n], vec![0f32; b_n * t_n]);
    let out = ForwardOut {
        lse: &mut lse,
        logp: &mut logp,
        entropy: Some(&mut ent),
    };
    forward_cpu(&logits, b_n * t_n, v, batch.targets(), out).unwrap();
    let pick = |x: &[f32]| -> Vec<f64> { (0..b_n * t_n).filter(|&i| mask[i]).map(|i| x[i] as f64).collect() };
    assert_close(
        &format!("{name} full vs chunked logp"),
        &pick(f.logp()),
        &pick(&logp),
        1e-6,
        1e-5,
    );
    assert_close(
        &format!("{name} full vs chunked lse"),
        &pick(f.lse()),
        &pick(&lse),
        1e-6,
        1e-5,
    );
    assert_close(
        &format!("{name} full vs chunked entropy"),
        &pick(f.entropy()),
        &pick(&ent),
        1e-6,
        1e-5,
    );
    assert!(pick(f.entropy()).iter().all(|&h| h > 0.0 && h < (v as f64).ln() + 1e-3));
}

/// Gradients of L = Σ token_logps for every stored parameter.
fn check_grads(name: &str) {
    let fx = fixture(name);
    let (m, g, batch) = (&fx.model, &fx.g, &fx.batch);
    let f = m.forward(batch).unwrap();
    let dlogp: Vec<f32> = f.target_mask().iter().map(|&t| if t { 1.0 } else { 0.0 }).collect();
    let mut grads = m.new_grads();
    m.backward(&f, &dlogp, &mut grads).unwrap();
    let l: f64 = f.sequence_logps().iter().sum();
    let want_l = fx.json["L"].as_f64().unwrap();
    assert!((l - want_l).abs() < 2e-3 * 4.0, "{name}: L = {l}, want {want_l}");

    let params: Vec<String> = fx.json["grad_params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect();
    for p in &params {
        let got = grads.get(p).unwrap();
        let want = &g[&format!("grad.{p}")];
        let cols = *want.shape.last().unwrap();
        let got_sel: Vec<f64> = match g.get(&format!("grad_rows.{p}")) {
            Some(rows) => rows
                .i64()
                .iter()
                .flat_map(|&r| f64s(&got[r as usize * cols..(r as usize + 1) * cols]))
                .collect(),
            None => f64s(got),
        };
        let gmax = want.data.iter().fold(0f64, |a, &x| a.max(x.abs()));
        assert_close(&format!("{name} grad {p}"), &got_sel, &want.data, 1e-3, 1e-4 * gmax);
        let fro = got.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let want_fro = fx.json["grad_fro_norm_full"][p].as_f64().unwrap();
        assert!(
            (fro - want_fro).abs() <= 1e-4 * want_fro,
            "{name} {p}: |grad|_F = {fro}, want {want_fro}"
        );
    }
    // Parameters not in the golden still received a finite gradient.
    for (spec, gr) in grads.iter() {
        assert!(
            gr.iter().all(|x| x.is_finite()),
            "{name} {}: non-finite gradient",
            spec.name
        );
    }
}

#[test]
fn gpt2_forward_matches_goldens() {
    check_forward("tiny-gpt2");
}
#[test]
fn llama_forward_matches_goldens() {
    check_forward("tiny-llama");
}
#[test]
fn qwen2_forward_matches_goldens() {
    check_forward("tiny-qwen2");
}
#[test]
fn gpt2_grads_match_goldens() {
    check_grads("tiny-gpt2");
}
#[test]
fn llama_grads_match_goldens() {
    check_grads("tiny-llama");
}
#[test]
fn qwen2_grads_match_goldens() {
    check_grads("tiny-qwen2");
}

fn max_rel(a: &Grads, b: &Grads) -> f64 {
    a.iter()
        .zip(b.iter())
        .map(|((s, x), (_, y))| {
            let num = x
                .iter()
                .zip(y)
                .map(|(p, q)| ((p - q) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let den = y.iter().map(|&q| (q as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
            assert!(den > 1e-20 || num == 0.0, "{}: zero reference gradient", s.name);
            num / den
        })
        .fold(0.0, f64::max)
}

/// Random per-token weights (a DPO-like upstream gradient), not just ones.
fn weights(f: &irbridge::model::Forward, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    f.target_mask()
        .iter()
        .map(|&t| if t { rng.gen_range(-2.0..2.0) } else { 0.0 })
        .collect()
}

/// Chunk size changes nothing; accumulating two micro-batches equals one batch.
#[test]
fn chunking_and_accumulation_agree() {
    let fx = fixture("tiny-qwen2");
    let mut m = fx.model;
    let (g, batch) = (&fx.g, &fx.batch);
    let f = m.forward(batch).unwrap();
    let w = weights(&f, 7);
    let mut full = m.new_grads();
    m.backward(&f, &w, &mut full).unwrap();

    m.set_lm_head_chunk(7).unwrap();
    let f7 = m.forward(batch).unwrap();
    assert_close("chunk 7 logp", &f64s(f7.logp()), &f64s(f.logp()), 1e-6, 1e-5);
    let mut g7 = m.new_grads();
    m.backward(&f7, &w, &mut g7).unwrap();
    assert!(
        max_rel(&g7, &full) < 1e-5,
        "chunk 7 vs 256: rel {}",
        max_rel(&g7, &full)
    );
    m.set_lm_head_chunk(256).unwrap();

    // Micro-batches: rows {0, 2} and {1, 3}, each padded to its own length.
    let (t_n, ids) = (batch.seq(), g["input_ids"].i64());
    let mut acc = m.new_grads();
    let mut reuse = irbridge::model::Forward::default();
    for rows in [[0usize, 2], [1, 3]] {
        let lens: Vec<usize> = rows.iter().map(|&r| batch.lengths()[r]).collect();
        let t = *lens.iter().max().unwrap();
        let sub_ids: Vec<i64> = rows.iter().flat_map(|&r| ids[r * t_n..r * t_n + t].to_vec()).collect();
        let sub = Batch::causal_lm(&sub_ids, 2, t, &lens).unwrap();
        m.forward_into(&sub, &mut reuse).unwrap();
        let sub_w: Vec<f32> = rows.iter().flat_map(|&r| w[r * t_n..r * t_n + t].to_vec()).collect();
        for (i, &r) in rows.iter().enumerate() {
            let want = &f.logp()[r * t_n..r * t_n + t];
            assert_close(
                "micro-batch logp",
                &f64s(&reuse.logp()[i * t..(i + 1) * t]),
                &f64s(want),
                1e-6,
                1e-5,
            );
        }
        m.backward(&reuse, &sub_w, &mut acc).unwrap();
    }
    assert!(
        max_rel(&acc, &full) < 1e-5,
        "accumulated vs full: rel {}",
        max_rel(&acc, &full)
    );
    acc.zero();
    assert!(acc.iter().all(|(_, d)| d.iter().all(|&x| x == 0.0)));
}

/// Central differences of L = Σ w·logp for a few scalars of every kind (norm weight, bias,
/// projection, embedding row of a used token) on a short row.
#[test]
fn gradients_match_finite_differences() {
    for name in ["tiny-gpt2", "tiny-qwen2"] {
        let fx = fixture(name);
        let mut m = fx.model;
        let ids = fx.g["input_ids"].i64();
        let t_n = fx.batch.seq();
        let row: Vec<i64> = ids[3 * t_n..3 * t_n + 13].to_vec();
        let batch = Batch::causal_lm(&row, 1, 13, &[13]).unwrap();
        let f = m.forward(&batch).unwrap();
        let w = weights(&f, 3);
        let mut grads = m.new_grads();
        m.backward(&f, &w, &mut grads).unwrap();
        let objective = |m: &Model| -> f64 {
            let f = m.forward(&batch).unwrap();
            f.logp().iter().zip(&w).map(|(&l, &wi)| l as f64 * wi as f64).sum()
        };
        let probes: Vec<(&str, usize)> = if name == "tiny-gpt2" {
            vec![
                ("transformer.h.1.ln_2.weight", 5),
                ("transformer.h.0.attn.c_attn.bias", 70),
                ("transformer.h.1.mlp.c_fc.weight", 301),
                ("transformer.wte.weight", row[4] as usize * 64 + 3),
                ("transformer.wpe.weight", 2 * 64 + 9),
            ]
        } else {
            vec![
                ("model.layers.1.post_attention_layernorm.weight", 11),
                ("model.layers.1.self_attn.k_proj.bias", 3),
                ("model.layers.0.self_attn.q_proj.weight", 517),
                ("model.embed_tokens.weight", row[4] as usize * 64 + 3),
            ]
        };
        for (p, i) in probes {
            let h = 1e-2f32;
            let orig = m.params().get(p).unwrap()[i];
            m.params_mut().get_mut(p).unwrap()[i] = orig + h;
            let up = objective(&m);
            m.params_mut().get_mut(p).unwrap()[i] = orig - h;
            let down = objective(&m);
            m.params_mut().get_mut(p).unwrap()[i] = orig;
            let fd = (up - down) / (2.0 * h as f64);
            let an = grads.get(p).unwrap()[i] as f64;
            assert!(
                (fd - an).abs() <= 2e-2 * an.abs().max(1.0),
                "{name} {p}[{i}]: analytic {an}, finite difference {fd}"
            );
        }
    }
}

/// Save → load is bit-exact; tied models are written without `lm_head.weight`; tokenizer files
/// and config come along.
#[test]
fn save_load_round_trip() {
    let tmp = TempDir::new("save");
    for name in MODELS {
        let m = Model::load(&model_dir(name)).unwrap();
        let out = tmp.0.join(name);
        m.save(&out).unwrap();
        m.save(&out).unwrap(); // replacing an existing checkpoint works too
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let names = st.names();
        assert_eq!(
            names.contains(&"lm_head.weight"),
            !m.config().tie_word_embeddings,
            "{name}: lm_head.weight presence"
        );
        assert!(st.tensors().iter().all(|(_, v)| v.dtype() == Dtype::F32));
        let back = Model::load(&out).unwrap();
        assert_eq!(back.params().len(), m.params().len());
        for ((s, a), (s2, b)) in m.params().iter().zip(back.params().iter()) {
            assert_eq!(s, s2);
            assert!(
                a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} {}: not bit-exact",
                s.name
            );
        }
        let src: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("config.json")).unwrap()).unwrap();
        let saved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(src, saved, "{name}: config.json changed");
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
            "generation_config.json",
        ] {
            assert_eq!(
                std::fs::read(model_dir(name).join(f)).unwrap(),
                std::fs::read(out.join(f)).unwrap(),
                "{name}: {f}"
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary directories left behind");
    }
}

/// Rewrites a checkpoint's tensors: `edit` maps (name, dtype, shape, bytes) to the tensors to store.
fn write_st(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn read_st(path: &Path) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Two BF16 shards behind `model.safetensors.index.json` load as the bf16-rounded weights.
#[test]
fn sharded_bf16_checkpoint_loads() {
    let tmp = TempDir::new("shards");
    let src = model_dir("tiny-llama");
    std::fs::copy(src.join("config.json"), tmp.0.join("config.json")).unwrap();
    let tensors = read_st(&src.join("model.safetensors"));
    let to_bf16 = |b: &[u8]| -> Vec<u8> {
        b.chunks_exact(4)
            .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
            .collect()
    };
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let conv: Vec<_> = part
            .iter()
            .map(|(n, _, s, d)| (n.clone(), Dtype::BF16, s.clone(), to_bf16(d)))
            .collect();
        write_st(&tmp.0.join(file), &conv);
        part.iter().for_each(|(n, ..)| {
            map.insert(n.clone(), serde_json::Value::String(file.into()));
        });
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(tmp.0.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let m = Model::load(&tmp.0).unwrap();
    let orig = Model::load(&src).unwrap();
    for ((s, x), (_, y)) in m.params().iter().zip(orig.params().iter()) {
        assert!(
            x.iter().zip(y).all(|(p, q)| *p == half::bf16::from_f32(*q).to_f32()),
            "{}: not the bf16 rounding",
            s.name
        );
    }
}

fn load_err(dir: &Path) -> String {
    format!(
        "{:#}",
        Model::load(dir)
            .map(|_| ())
            .expect_err("loading a broken checkpoint must fail")
    )
}

#[test]
fn loader_errors_name_the_problem() {
    let tmp = TempDir::new("errors");
    let src = model_dir("tiny-gpt2");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let tensors = read_st(&src.join("model.safetensors"));

    // Unknown model_type.
    let d = tmp.0.join("unknown");
    std::fs::create_dir_all(&d).unwrap();
    let mut c = cfg.clone();
    c["model_type"] = "mamba".into();
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    write_st(&d.join("model.safetensors"), &tensors);
    let e = load_err(&d);
    assert!(
        e.contains("mamba") && e.contains("model_type") && e.contains("config.json"),
        "{e}"
    );

    // Missing tensor.
    let d = tmp.0.join("missing");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    let kept: Vec<_> = tensors
        .iter()
        .filter(|t| t.0 != "transformer.h.1.mlp.c_fc.bias")
        .cloned()
        .collect();
    write_st(&d.join("model.safetensors"), &kept);
    let e = load_err(&d);
    assert!(
        e.contains("missing tensor") && e.contains("transformer.h.1.mlp.c_fc.bias") && e.contains("model.safetensors"),
        "{e}"
    );

    // Shape that disagrees with the config (n_inner 256 in the file, 128 in the config).
    let d = tmp.0.join("shape");
    std::fs::create_dir_all(&d).unwrap();
    let mut c = cfg.clone();
    c["n_inner"] = 128.into();
    std::fs::write(d.join("config.json"), c.to_string()).unwrap();
    write_st(&d.join("model.safetensors"), &tensors);
    let e = load_err(&d);
    assert!(
        e.contains("transformer.h.0.mlp.c_fc.weight") && e.contains("[64, 256]") && e.contains("[64, 128]"),
        "{e}"
    );

    // No weights at all.
    let d = tmp.0.join("empty");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    assert!(load_err(&d).contains("model.safetensors"));
}

#[test]
fn batch_errors_are_values() {
    let m = Model::load(&model_dir("tiny-gpt2")).unwrap();
    assert!(
        Batch::new(&[1, 2, 3], 1, 4, &[3], &[IGNORE_INDEX; 4]).is_err(),
        "ids length"
    );
    assert!(
        Batch::new(&[1, 2, 3, 4], 1, 4, &[5], &[IGNORE_INDEX; 4]).is_err(),
        "length > T"
    );
    let e = Batch::new(&[1, 2, 3, 4], 1, 4, &[2], &[2, 3, 4, IGNORE_INDEX]).unwrap_err();
    assert!(format!("{e}").contains("targets[0,2]"), "{e}");
    let e = Batch::new(&[1, 2, 3, 4], 1, 4, &[4], &[2, -5, 4, IGNORE_INDEX]).unwrap_err();
    assert!(format!("{e}").contains("negative"), "{e}");
    let b = Batch::causal_lm(&[1, 60000, 3, 4], 1, 4, &[4]).unwrap();
    assert!(format!("{}", m.forward(&b).unwrap_err()).contains("60000"));
    let long: Vec<i64> = vec![5; 300];
    let b = Batch::causal_lm(&long, 1, 300, &[300]).unwrap();
    assert!(format!("{}", m.forward(&b).unwrap_err()).contains("n_positions"));
    assert_eq!(Batch::lengths_from_mask(&[1, 1, 0, 1, 0, 0], 2, 3).unwrap(), vec![2, 1]);
    assert!(Batch::lengths_from_mask(&[1, 0, 1], 1, 3).is_err());
    let b = Batch::causal_lm(&[1, 2, 3, 4], 1, 4, &[4]).unwrap();
    let f = m.forward(&b).unwrap();
    let mut g = m.new_grads();
    assert!(m.backward(&f, &[1.0; 3], &mut g).is_err(), "dlogp length");
    assert!(
        m.backward(&f, &[f32::NAN, 0.0, 0.0, 0.0], &mut g).is_err(),
        "non-finite dlogp"
    );
}

fn config_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(model_dir(name).join("config.json")).unwrap()).unwrap()
}

/// Older and newer config spellings: top-level `rope_theta`, Llama-3 `rope_scaling`, Mistral
/// sliding windows, Qwen2 biases, and the errors for what is not supported.
#[test]
fn config_variants_parse() {
    use irbridge::model::config::{ModelConfig, RopeScaling};
    use irbridge::model::rope::inv_freq;
    let q = ModelConfig::from_json(config_json("tiny-qwen2")).unwrap();
    assert!(q.qkv_bias && !q.o_bias && q.tie_word_embeddings && q.sliding_window.iter().all(Option::is_none));
    assert_eq!((q.num_kv_heads, q.head_dim, q.group_size()), (2, 16, 2));

    let mut j = config_json("tiny-llama");
    j.as_object_mut().unwrap().remove("rope_parameters");
    j["rope_theta"] = 500000.0.into();
    j["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
    let c = ModelConfig::from_json(j.clone()).unwrap();
    let rope = c.rope.clone().unwrap();
    assert_eq!(rope.theta, 500000.0);
    assert!(matches!(rope.scaling, RopeScaling::Llama3 { .. }));
    let plain = inv_freq(
        &irbridge::model::config::Rope {
            theta: 500000.0,
            scaling: RopeScaling::None,
        },
        16,
    );
    let scaled = inv_freq(&rope, 16);
    // Wavelengths below 64/4 keep their frequency, above 64/1 are divided by 8, between blend.
    for (p, s) in plain.iter().zip(&scaled) {
        let wl = 2.0 * std::f32::consts::PI / p;
        if wl < 16.0 {
            assert_eq!(p, s);
        } else if wl > 64.0 {
            assert!((s - p / 8.0).abs() <= 1e-6 * p);
        } else {
            assert!(
                *s < *p && *s > p / 8.0,
                "medium band: {s} not between {} and {p}",
                p / 8.0
            );
        }
    }
    assert!(plain.iter().zip(&scaled).any(|(p, s)| p == s) && plain.iter().zip(&scaled).any(|(p, s)| p != s));

    j["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    let e = format!("{:#}", ModelConfig::from_json(j).unwrap_err());
    assert!(e.contains("yarn"), "{e}");

    let mut m = config_json("tiny-llama");
    m["model_type"] = "mistral".into();
    m["sliding_window"] = 4.into();
    let c = ModelConfig::from_json(m).unwrap();
    assert_eq!(c.sliding_window, vec![Some(4), Some(4)]);

    let mut bad = config_json("tiny-llama");
    bad["num_key_value_heads"] = 3.into();
    assert!(format!("{:#}", ModelConfig::from_json(bad).unwrap_err()).contains("num_key_value_heads"));
    let mut bad = config_json("tiny-llama");
    bad.as_object_mut().unwrap().remove("hidden_size");
    assert!(format!("{:#}", ModelConfig::from_json(bad).unwrap_err()).contains("hidden_size"));
}

/// A Mistral sliding window of 4 leaves positions 0..3 exactly as full attention and changes
/// every later one.
#[test]
fn sliding_window_masks_old_keys() {
    let tmp = TempDir::new("mistral");
    let mut cfg = config_json("tiny-llama");
    cfg["model_type"] = "mistral".into();
    cfg["sliding_window"] = 4.into();
    std::fs::write(tmp.0.join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        model_dir("tiny-llama").join("model.safetensors"),
        tmp.0.join("model.safetensors"),
    )
    .unwrap();
    let (full, win) = (
        Model::load(&model_dir("tiny-llama")).unwrap(),
        Model::load(&tmp.0).unwrap(),
    );
    let ids: Vec<i64> = vec![464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13];
    let batch = Batch::causal_lm(&ids, 1, 10, &[10]).unwrap();
    let (a, b) = (full.forward(&batch).unwrap(), win.forward(&batch).unwrap());
    for t in 0..9 {
        let (x, y) = (a.logp()[t], b.logp()[t]);
        if t < 4 {
            assert_eq!(x.to_bits(), y.to_bits(), "position {t} sees only in-window keys");
        } else {
            assert!((x - y).abs() > 1e-6, "position {t}: the window must change the result");
        }
    }
}

/// The head's per-token argmax and mean logit (token accuracy, TRL `logits/*`) agree with the
/// goldens' argmax and with the mean of the full logits.
#[test]
fn head_argmax_and_mean_logit() {
    for name in ["tiny-gpt2", "tiny-llama"] {
        let fx = fixture(name);
        let (b_n, t_n, v) = (fx.batch.batch(), fx.batch.seq(), fx.model.config().vocab_size);
        let f = fx.model.forward(&fx.batch).unwrap();
        let logits = fx.model.forward_logits(&fx.batch).unwrap();
        let want_arg = fx.g["logits_argmax"].i64();
        let mask = f.target_mask();
        let mut checked = 0;
        for i in 0..b_n * t_n {
            if !mask[i] {
                assert_eq!(f.argmax()[i], 0, "{name}: argmax at a position without a target");
                continue;
            }
            assert_eq!(f.argmax()[i] as i64, want_arg[i], "{name}: argmax at {i}");
            let mean = logits[i * v..(i + 1) * v].iter().map(|&x| x as f64).sum::<f64>() / v as f64;
            assert_close(
                &format!("{name} logit_mean[{i}]"),
                &[f.logit_mean()[i] as f64],
                &[mean],
                1e-5,
                1e-6,
            );
            checked += 1;
        }
        assert_eq!(checked, f.num_targets());
    }
}

/// A transformers-5 `rope_parameters` of type `default` next to a legacy `rope_scaling`: the
/// legacy scaling applies (as `AutoConfig` merges it); two different scalings are refused.
#[test]
fn legacy_rope_scaling_next_to_rope_parameters() {
    use irbridge::model::config::{ModelConfig, RopeScaling};
    let mut j = config_json("tiny-llama");
    assert_eq!(j["rope_parameters"]["rope_type"], "default");
    j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 4.0});
    let c = ModelConfig::from_json(j.clone()).unwrap();
    assert_eq!(c.rope.unwrap().scaling, RopeScaling::Linear { factor: 4.0 });
    j["rope_parameters"] = serde_json::json!({"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0});
    let e = ModelConfig::from_json(j.clone()).unwrap_err().to_string();
    assert!(e.contains("disagree"), "{e}");
    j["rope_scaling"] = serde_json::json!({"rope_type": "linear", "factor": 2.0});
    assert_eq!(
        ModelConfig::from_json(j).unwrap().rope.unwrap().scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
}
