//! The Llama-family causal LM: configuration, rotary embeddings, the decoder, and
//! Hugging Face checkpoint I/O.

pub mod checkpoint;
pub mod config;
pub mod encoder;
pub(crate) mod layers;
pub mod llama;
pub mod peft;
pub mod rope;
pub mod stack;
pub mod torch_pickle;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use encoder::{Encoder, EncoderConfig, Head};
pub use llama::CausalLm;

/// The libtorch kind of a run spec's dtype (the one mapping).
pub fn kind_of(d: dpo_proto::Dtype) -> tch::Kind {
    match d {
        dpo_proto::Dtype::F32 => tch::Kind::Float,
        dpo_proto::Dtype::Bf16 => tch::Kind::BFloat16,
        dpo_proto::Dtype::F16 => tch::Kind::Half,
    }
}
