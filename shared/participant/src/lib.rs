//! The fedsb participant's procedure, shared by `fedsb join` (natively, on
//! wgpu's Vulkan/Metal/DX12 backends) and the browser participant
//! (`fedsb-wasm-client`'s `WasmParticipant`, on WebGPU), so both send
//! updates computed the same way:
//!
//! * [`adapter_file`]: the LoRA-SB adapter file (A, B, R₀, head) that `fedsb
//!   init` writes and participants read, and the conversions between the
//!   wire's [`fedsb_protocol::AdapterState`] and the engine's adapters;
//! * [`task`]: checking a task's files against its announced shapes
//!   ([`TaskModel::load`]) and reading a participant's labelled data with the
//!   task's classes ([`read_task_data`]);
//! * [`train`]: one local round ([`train_round`]): set the global `R`s and
//!   head, take K AdamW steps on shuffled batches, read the result back;
//!   [`LocalOptimizer`] says whether AdamW's moments carry into the next round.
//!
//! Everything here is target-agnostic: no file system access (bytes in), no
//! blocking (the GPU calls are `async`; natively `pollster::block_on` them).
//! * [`dp`]: differential privacy: σ calibrated for the planned steps, the
//!   privacy ledger (a serializable value the caller persists), DP-SGD
//!   rounds ([`train_round_dp`]);
//! * [`init`]: the participant's half of the federated initialization
//!   ([`init_gradients`]).

pub mod adapter_file;
pub mod dp;
pub mod init;
pub mod task;
pub mod train;

pub use adapter_file::{
    check_base_model, engine_to_state, parse_linear, parse_module_name, parse_module_names,
    read_adapter_file, state_to_engine, write_adapter_file, write_file_atomically,
    AdapterFileError, ModuleRef, BASE_MODEL_SHA256, MAX_SEQ_LEN,
};
pub use dp::{train_round_dp, train_steps_dp, DpStepsOutcome, DpTraining};
pub use init::{centre_logits, init_frames, init_gradients};
pub use task::{read_task_data, TaskModel};
pub use train::{task_adamw, train_round, LocalOptimizer, LocalRound};

use safetensors::SafeTensors;

/// Why a participant could not load its task, read its data or train.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    #[error(transparent)]
    Adapter(#[from] AdapterFileError),
    #[error("cannot load the task's model: {0}")]
    Model(#[from] fedsb_engine::model::ModelLoadError),
    #[error("GPU: {0}")]
    Gpu(#[from] fedsb_engine::gpu::GpuError),
    #[error(transparent)]
    Train(#[from] fedsb_engine::train::TrainError),
    #[error(transparent)]
    Data(#[from] fedsb_engine::data::DataError),
    #[error("differential privacy: {0}")]
    Privacy(#[from] fedsb_privacy::PrivacyError),
    #[error(transparent)]
    Dp(#[from] fedsb_engine::dp::DpError),
    /// The task, the data or a message does not fit; the text says how.
    #[error("{0}")]
    Invalid(String),
}

/// The values of the F32 tensor `name` of an adapter file, checked to have
/// `shape`; the error says what is missing or wrong. Shared by the
/// aggregator's round-0 state and the participants' reading of A and B.
pub fn read_f32_tensor(
    st: &SafeTensors<'_>,
    name: &str,
    shape: &[usize],
) -> Result<Vec<f32>, String> {
    let view = st
        .tensor(name)
        .map_err(|_| format!("tensor {name} is missing"))?;
    if view.shape() != shape {
        return Err(format!(
            "tensor {name} has shape {:?}, expected {shape:?}",
            view.shape()
        ));
    }
    if view.dtype() != safetensors::Dtype::F32 {
        return Err(format!("tensor {name} is {:?}, expected F32", view.dtype()));
    }
    Ok(view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}
