//! dpo-cluster's worker: the Llama-family causal LM on libtorch, per-sequence
//! log-probabilities, and the `score` pipeline. Training and cluster membership
//! build on these.

pub mod cluster;
pub mod collective;
pub mod cuda;
pub mod error;
pub mod generate;
pub mod logps;
pub mod model;
pub mod objective;
pub mod optim;
pub mod packing;
pub mod ranks;
pub mod score;
pub mod threads;
pub mod train;
pub mod zero;

pub use error::{Disposition, Error, Result};

use tch::{Device, Kind};

/// Parses a dtype name as run specs and flags spell it.
pub fn parse_kind(s: &str) -> Result<Kind> {
    s.parse::<dpo_proto::Dtype>()
        .map(model::kind_of)
        .map_err(|e| Error::Input {
            context: "dtype".into(),
            reason: e.to_string(),
        })
}

/// A `--device` that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device {given:?} (expected auto, cpu, cuda or cuda:N)")]
    Unknown { given: String },
    #[error(transparent)]
    Cuda(#[from] cuda::CudaError),
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `auto` is the first GPU when
/// libtorch sees one, else the CPU; a CUDA device this machine does not have
/// is refused with the cause (no GPU, no driver, a CPU-only libtorch).
pub fn parse_device(s: &str) -> std::result::Result<Device, DeviceError> {
    let device = match s {
        "auto" => {
            return Ok(if cuda::device_count() > 0 {
                Device::Cuda(0)
            } else {
                Device::Cpu
            });
        }
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .map(Device::Cuda)
            .ok_or_else(|| DeviceError::Unknown {
                given: other.to_string(),
            })?,
    };
    cuda::check_device(device)?;
    Ok(device)
}
