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

/// Fixtures the unit tests of several modules share.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::{Path, PathBuf};

    /// `dir/model`: a model directory that is enough for a task's checks
    /// and hashes (hidden size 8, 2 layers; `model.safetensors` holds the
    /// bytes `weights`, not tensors). Returns its path.
    pub fn write_fake_model(dir: &Path) -> PathBuf {
        let model = dir.join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(
            model.join("config.json"),
            r#"{"hidden_size": 8, "num_hidden_layers": 2}"#,
        )
        .unwrap();
        std::fs::write(model.join("model.safetensors"), b"weights").unwrap();
        std::fs::write(model.join("tokenizer.json"), "{}").unwrap();
        model
    }
}
