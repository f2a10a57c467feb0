//! The fedsb aggregator: runs federated LoRA-SB rounds for browser tabs and
//! native participants.
//!
//! * [`adapter_file`]: the LoRA-SB adapter file (A, B, R₀, head) and the
//!   conversions between wire states and the engine's adapters.
//! * [`config`]: the task configuration (TOML + `FEDSB_*` environment).
//! * [`init_round`]: federated LoRA-SB initialization (gradients summed
//!   before round 1, then A, B, R₀ by sign and truncated SVD).
//! * [`round`]: one round's rules and its exact f64 weighted mean.
//! * [`coordinator`]: the round state machine (open → collecting →
//!   aggregating → committed) as a single task.
//! * [`store`]: SQLite persistence; restart resumes at the last committed round.
//! * [`evaluator`]: evaluates every committed global model on the eval set.
//! * [`export`]: a committed global model as an adapter file (A, B, R, head).
//! * [`server`] and [`connection`]: HTTP, WebSocket, JSON API, files, metrics.
//!
//! Run it with `fedsb serve --config configs/sst2-demo.toml`.

pub mod adapter_file;
pub mod config;
pub mod connection;
pub mod coordinator;
pub mod evaluator;
pub mod export;
pub mod files;
pub mod init_round;
pub mod metrics;
pub mod round;
pub mod server;
pub mod store;
