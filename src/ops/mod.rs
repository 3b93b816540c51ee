//! The loss-side ops. Each module holds one op family with its CPU twin and its CUDA launcher side
//! by side, with the same semantics (see `REFERENCE.md` §2–§8).

pub mod logsoftmax;
pub mod prefloss;
pub mod seqreduce;
pub mod sftloss;
