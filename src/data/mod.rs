//! The data layer: dataset files → typed rows → token ids and loss masks with TRL v1.9 semantics
//! (REFERENCE §2) → padded batches with next-token targets.
//!
//! Typical use: [`Tokenizer::from_dir`], [`read_records`], [`tokenize_sft`] / [`tokenize_dpo`]
//! with [`TokenizeOptions`], then [`Batch::from_seqs`] / [`Batch::from_pairs`] over the kept
//! examples; [`inspect_sft`] / [`inspect_dpo`] show what the model will be trained on.

pub mod batch;
pub mod formats;
pub mod inspect;
pub mod template;
pub mod tokenize;
pub mod tokenizer;

pub use batch::Batch;
pub use formats::{parse_records, read_records, Content, Message, Record, Row, Turn};
pub use inspect::{inspect_dpo, inspect_sft};
pub use template::ChatTemplate;
pub use tokenize::{
    tokenize_dpo, tokenize_sft, DpoDataset, DpoExample, DropReason, MessagesLoss, SeqInfo, SftDataset, SftExample,
    TokenizeOptions, TokenizeReport, TokenizedSeq, DEFAULT_MAX_LENGTH, DEFAULT_PROMPT_TEMPLATE,
};
pub use tokenizer::{SpecialToken, Tokenizer};
