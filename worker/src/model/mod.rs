//! The Llama-family causal LM: configuration, rotary embeddings, the decoder, and
//! Hugging Face checkpoint I/O.

pub mod checkpoint;
pub mod config;
pub mod llama;
pub mod rope;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use llama::CausalLm;
