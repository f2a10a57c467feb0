//! Plain-Rust CPU reference of the whole LoRA-SB training path, generic over
//! the element type ([`Float`]: `f32` or `f64`).
//!
//! It is the oracle for the GPU kernels and for the gradient checks:
//! - [`ReferenceEncoder`]: embeddings + LayerNorm, encoder layers whose six
//!   linears (query, key, value, attention output, intermediate, output) carry
//!   LoRA-SB adapters `y = W0·x + b + B·R·A·x`, masked multi-head
//!   self-attention, exact GELU, residual + LayerNorm, mean pooling over
//!   non-padding tokens, a linear classification head and softmax
//!   cross-entropy (mean over the batch) — `transformers.BertModel` in eval
//!   mode plus sentence-transformers' mean pooling.
//! - Backward to every `R` and the head, per batch and per sample
//!   (`G_n = (dY_n·B)ᵀ·(X_n·Aᵀ)`, for DP-SGD clipping), and to every `W0`
//!   for [`lora_sb_init`] (LoRA-SB, Ponkshe et al. 2024).
//! - [`ops`]: the building blocks one by one, for per-kernel tests.
//!
//! Written for clarity, not speed: single-threaded loops over row-major data.

mod adapter;
mod encoder;
mod float;
mod init;
mod matrix;
pub mod ops;

pub use adapter::{ClassifierHead, LoraSbAdapters, LoraSbModule, TrainableGradients};
pub use encoder::{
    head_forward, lora_sb_linear, lora_sb_linear_backward, BackwardOptions, LinearGradients,
    ReferenceEncoder, TrainingStep,
};
pub use float::Float;
pub use init::{accumulate_weight_gradients, adapter_from_update, lora_sb_init, LoraSbInitOptions};
pub use matrix::{matmul_nn_acc, matmul_nt_acc, matmul_tn_acc, Matrix};
