//! The ops. Each module holds one op family with its CPU twin and its CUDA launcher side by side,
//! with the same semantics (see `REFERENCE.md` §2–§8): the loss side (`logsoftmax`, `seqreduce`,
//! `prefloss`, `sftloss`) and the transformer layers the model is built from (`embedding`, `norm`,
//! `rotary`, `attention`, `activation`, `adamw`), and `rows`: the row gathers/scatters and per-row
//! argmax/mean a chunked LM head needs.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod embedding;
pub mod logsoftmax;
pub mod norm;
pub mod prefloss;
pub mod rotary;
pub mod rows;
pub mod seqreduce;
pub mod sftloss;
pub mod support;
