//! WGSL compute kernels and their launchers on wgpu.
//!
//! The same code runs natively (Vulkan, Metal, DX12; lavapipe in CI) and in the
//! browser (WebGPU). Every launcher records into a caller-owned
//! [`wgpu::CommandEncoder`]; results come back with the asynchronous
//! [`GpuContext::read_f32`]. All matrices are row-major `f32`.
//!
//! Kernel families, one `.wgsl` file next to each launcher:
//! - [`matmul`]: `C = alpha·op(A)·op(B) (+ bias) (+ C)`, tiled 64×64 with 8×8
//!   register blocking; transposes for `X·Wᵀ + b`, `dY·W`, `dYᵀ·X`; batched and
//!   strided (attention heads).
//! - [`gelu`]: exact erf-based GELU forward and backward.
//! - [`layernorm`]: LayerNorm of `x (+ residual)` forward (saving mean and
//!   1/std per row) and input gradient.
//! - [`lora_sb`]: the LoRA-SB branch `Y += ((X·Aᵀ)·Rᵀ)·Bᵀ`, its input gradient
//!   and per-sample `G_n = (dY_n·B)ᵀ·(X_n·Aᵀ)`.
//! - [`attention`]: masked multi-head self-attention forward and backward.
//! - [`adamw`]: AdamW step on a flat buffer.
//! - [`head`]: mean pooling (and backward), logits, softmax cross-entropy with
//!   `dlogits`, per-sample head gradients.
//! - [`embeddings`]: word + position + token-type gather.
//!
//! Every kernel has a plain-Rust reference in [`cpu_ref`] and a test
//! `<kernel>_matches_reference` in `tests/gpu_kernels.rs`:
//!
//! ```text
//! cargo test -p fedsb-engine --test gpu_kernels      # needs an adapter (lavapipe works)
//! cargo test -p fedsb-engine --test gpu_wgsl         # naga validation, CPU only
//! cargo run --release -p fedsb-engine --example bench_matmul
//! ```

pub mod adamw;
pub mod attention;
pub mod context;
pub mod cpu_ref;
pub mod embeddings;
pub mod encoder;
pub mod gelu;
pub mod head;
pub mod layernorm;
pub mod lora_sb;
pub mod matmul;

pub use context::{GpuBuffer, GpuContext, GpuOptions};

/// Errors of the GPU engine.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// No adapter, or none matching the requested name.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// Device request or poll failed.
    #[error("GPU device: {0}")]
    Device(String),
    /// Buffer mapping for read-back failed.
    #[error("buffer read-back: {0}")]
    Map(String),
    /// Buffer sizes or shapes do not fit the kernel's arguments.
    #[error("shape: {0}")]
    Shape(String),
}
