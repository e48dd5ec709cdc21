//! Types shared by every dpo-cluster binary. Today: the run spec.

pub mod spec;

pub use spec::{
    ClusterSpec, DataFormat, DataSpec, Dtype, Loss, ModelSpec, ObjectiveSpec, OptimSpec,
    OptimizerName, ReferenceSpec, RunSpec, Schedule, SpecError, TrainSpec, Truncation,
};
