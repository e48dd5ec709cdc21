//! The dpo-cluster coordinator: validates and queues runs, tokenizes and shards
//! their datasets once, forms worker generations, serves batches, records every
//! step exactly once, and commits checkpoints with the data ledger.

pub mod service;
pub mod state;
pub mod store;

pub use state::{Coordinator, Settings};
pub use store::{Embedded, Etcd, EtcdSecurity, Store};
