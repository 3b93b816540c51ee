//! Forward + backward throughput (tokens/s) of the CPU engine on the golden-sized batch
//! (B = 4, T = 211, lengths 211/57/128/13; fixtures README §3), for tiny-gpt2 and tiny-llama.
//!
//! `cargo bench --bench model_cpu`; criterion reports elements/s = trained tokens/s.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use irbridge::model::{Batch, Model};
use safetensors::SafeTensors;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

/// The golden batch of `name` (ids `[B, T]` and lengths), read from its golden file.
fn golden_batch(name: &str) -> Batch {
    let bytes = std::fs::read(fixtures().join(format!("golden/{name}.safetensors"))).expect("golden file");
    let st = SafeTensors::deserialize(&bytes).expect("golden safetensors");
    let i64s = |t: &str| -> (Vec<i64>, Vec<usize>) {
        let v = st.tensor(t).expect("golden tensor");
        let data = v
            .data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (data, v.shape().to_vec())
    };
    let (ids, shape) = i64s("input_ids");
    let (lengths, _) = i64s("lengths");
    let lengths: Vec<usize> = lengths.iter().map(|&l| l as usize).collect();
    Batch::causal_lm(&ids, shape[0], shape[1], &lengths).expect("golden batch")
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("model_cpu_fwd_bwd");
    group.sample_size(10);
    for name in ["tiny-gpt2", "tiny-llama"] {
        let model = Model::load(&fixtures().join("models").join(name)).expect("model");
        let batch = golden_batch(name);
        let tokens: usize = batch.lengths().iter().sum();
        group.throughput(Throughput::Elements(tokens as u64));
        let mut grads = model.new_grads();
        let mut fwd = irbridge::model::Forward::default();
        group.bench_function(name, |b| {
            b.iter(|| {
                model.forward_into(&batch, &mut fwd).expect("forward");
                let dlogp: Vec<f32> = fwd.target_mask().iter().map(|&t| if t { 1.0 } else { 0.0 }).collect();
                model.backward(&fwd, &dlogp, &mut grads).expect("backward");
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
