//! The loss-side ops. Each module holds one op family with its CPU twin and its CUDA launcher side
//! by side, with the same semantics (see `REFERENCE.md` §2–§8).

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod embedding;
pub mod logsoftmax;
pub mod norm;
pub mod rotary;
pub mod support;
