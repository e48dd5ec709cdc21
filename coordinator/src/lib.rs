//! The dpo-cluster coordinator: validates and queues runs, tokenizes and shards
//! their datasets once, forms worker generations, serves batches, records every
//! step exactly once, and commits checkpoints with the data ledger.
//!
//! `engine` decides (no I/O, time as an argument); `coordinator` runs it
//! (`effects`: applying what it decided; `recovery`: loading it back at start;
//! `data`: the data plane); `service` is the gRPC face; `web` the HTTP port;
//! `store` keeps the state; `sim` runs the engine in a simulated cluster,
//! faults and all, in virtual time.

pub mod auth;
pub mod coordinator;
pub mod engine;
pub mod paths;
pub mod service;
pub mod sim;
pub mod store;
pub mod web;

pub use coordinator::{Coordinator, Settings};
pub use paths::Confinement;
pub use store::{Embedded, Etcd, EtcdSecurity, Store};
