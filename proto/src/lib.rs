//! Types shared by every dpo-cluster binary: the run spec and the gRPC API
//! (`dpo.v1`: the run service for clients, the worker service for workers).

pub mod client;
pub mod spec;
pub mod zero;

pub use spec::{
    COLUMN_NAMES, ClusterSpec, DataFormat, DataLimits, DataSpec, Dtype, FileFormat, InvalidKey,
    LINEAR_MODULES, LoraInit, LoraSpec, Loss, ModelSpec, Negatives, ObjectiveSpec, OptimSpec,
    OptimizerName, ReferenceCache, ReferenceModel, ReferenceSpec, RunSpec, Schedule, SpecError,
    TargetModules, TaskSpec, TaskType, TrainSpec, Truncation,
};

/// The generated `dpo.v1` messages, clients and servers.
pub mod v1 {
    #![allow(missing_debug_implementations, clippy::all, clippy::unwrap_used)]
    tonic::include_proto!("dpo.v1");

    /// Serialized descriptors of `dpo.v1`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("dpo_v1_descriptor");

    impl RunState {
        /// Ended: the run will not train again.
        pub fn is_terminal(self) -> bool {
            matches!(
                self,
                RunState::Succeeded | RunState::Failed | RunState::Cancelled
            )
        }
    }

    impl Run {
        /// Whether the run has ended (a state this version does not know is not).
        pub fn ended(&self) -> bool {
            RunState::try_from(self.state).is_ok_and(RunState::is_terminal)
        }
    }
}
