//! Fresh models from a configuration alone (no weight files): what a from-scratch experiment or a
//! shape-only benchmark starts from.
//!
//! The initialisation is transformers' `_init_weights` for these architectures: every matrix
//! (embeddings, projections, an untied head) drawn from `N(0, initializer_range²)`, norm weights
//! 1, biases 0. Seeded through ChaCha, so a seed gives the same model on every platform.

use super::config::ModelConfig;
use super::params::{ParamPlan, Tensors};
use super::Model;
use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// transformers' default `initializer_range` for GPT-2 and Llama configs.
pub const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

impl Model {
    /// A randomly initialised model for `config` (see the module docs); the standard deviation is
    /// the config's `initializer_range`, 0.02 when it has none.
    pub fn init_random(config: ModelConfig, seed: u64) -> Result<Model> {
        let std = config
            .raw
            .get("initializer_range")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(DEFAULT_INITIALIZER_RANGE);
        let normal = Normal::new(0.0, std)
            .map_err(|e| anyhow::anyhow!("config.json: initializer_range {std} is not a standard deviation: {e}"))?;
        let plan = ParamPlan::new(&config);
        let mut params = Tensors::zeros(&plan.specs);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (spec, data) in plan.specs.iter().zip(params.data_mut()) {
            if spec.shape.len() >= 2 {
                data.iter_mut().for_each(|x| *x = normal.sample(&mut rng) as f32);
            } else if !spec.name.ends_with(".bias") {
                data.fill(1.0);
            }
        }
        Model::from_parts(config, params)
    }
}
