//! Datasets for dpo-cluster: reading preference and labelled/negative files,
//! validating every line, turning text into token ids with the model's own
//! tokenizer, truncation and data order — shared by the coordinator (which
//! tokenizes once) and the worker (which scores and trains).

pub mod arrow_check;
pub mod atomic;
pub mod batches;
pub mod bounded_json;
pub mod chat;
pub mod confined;
pub mod dataset;
mod error;
pub mod examples;
pub mod lines;
pub mod metrics_log;
pub mod pairs;
pub mod parquet_check;
pub mod records;
pub mod refcache;
pub mod rng;
pub mod scores;
pub mod shard;
pub mod tagged;
pub mod task_data;
pub mod tensorboard;
pub mod tokenizer;

pub use dataset::{DataReport, NegativeSampler, SamplerError, check_vocabulary};
pub use error::{Error, Refusal, Result};
pub use examples::{Example, LabelledRecord, Truncation};
pub use pairs::{
    Pair, PairFormat, Record, TokenizedPair, for_each_pair, read_pairs, read_pairs_skipping,
    tokenize_pair, tokenize_pairs,
};
pub use tokenizer::TextTokenizer;
