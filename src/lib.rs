//! irbridge: SFT and DPO post-training built around the implicit reward `β·log π/π_ref`, with
//! hand-written CUDA kernels for the loss side and a CPU twin for every kernel.
//!
//! The crate is usable as an embeddable backend: the ops in [`ops`] run on caller-owned buffers
//! (host slices on the CPU, cudarc device slices on CUDA) without the rest of the engine.

pub mod analyze;
pub mod data;
pub mod device;
pub mod dtype;
pub mod fsutil;
pub mod generate;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod plot;
pub mod score;
pub mod study;
pub mod train;

pub use device::Device;
