//! Subcommand implementations of the `irbridge` binary, one module each. `main.rs` only parses.

pub mod info;
pub mod inspect;
pub mod train;
