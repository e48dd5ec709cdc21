//! Datasets for dpo-cluster: reading preference files, validating every line, and
//! turning text into token ids with the model's own tokenizer — shared by the
//! coordinator (which tokenizes once) and the worker (which scores and trains).

mod error;
pub mod pairs;
pub mod tokenizer;

pub use error::{Error, Result};
pub use pairs::{Pair, PairFormat, Record, TokenizedPair, read_pairs, tokenize_pairs};
pub use tokenizer::TextTokenizer;
