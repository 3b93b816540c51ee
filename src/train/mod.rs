//! Training: the SFT and DPO trainers and everything around them (REFERENCE §2, §3, §5, §6, §9).
//!
//! - [`engine`]: the [`Engine`] trait the trainers drive (CPU: [`CpuEngine`]), AdamW with no
//!   decay on 1-D tensors; [`cuda_engine`]: the same trait on a GPU ([`CudaEngine`]).
//! - [`config`]: [`TrainConfig`] from TOML + flags, validated, written back resolved.
//! - [`data`]: the one bridge from data batches to model batches, the eval split, the seeded
//!   order of examples and accumulation windows.
//! - [`schedule`]: `linear` / `cosine` / `constant` with warmup (transformers semantics).
//! - [`trainer`]: the loop (clipping, schedule, logging, eval, checkpoints, exact resume).
//! - [`sft`], [`dpo`]: the two objectives and their metrics.
//! - [`checkpoint`], [`metrics`]: outputs, all written atomically ([`crate::fsutil`]).
//! - [`mod@run`]: the entry point the CLI calls.
//!
//! Output layout of `output_dir`: `config.toml` (resolved), `metrics.jsonl`,
//! `checkpoint-<step>/` (HF model files + `optimizer.safetensors` + `trainer_state.json` +
//! `config.toml`), `ref_logps-<hash>.json` (DPO with `precompute_ref_logps`), and the final model
//! in `final/` (HF layout, loadable by transformers).

pub mod checkpoint;
pub mod config;
pub mod cuda_engine;
pub mod data;
pub mod dpo;
pub mod engine;
pub mod metrics;
pub mod run;
pub mod schedule;
pub mod sft;
pub mod trainer;

pub use config::{Kind, SftLevel, SftObjective, TrainConfig};
pub use cuda_engine::CudaEngine;
pub use engine::{decays, CpuEngine, Engine, TokenOutputs};
pub use run::{run, run_with, Outcome};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{RunOptions, RunSummary};
