//! WGSL compute kernels and their launchers on wgpu.
//!
//! The same code runs natively (Vulkan, Metal, DX12; lavapipe in CI) and in the
//! browser (WebGPU). Every launcher records into a caller-owned
//! [`wgpu::CommandEncoder`]; results come back with the asynchronous
//! [`GpuContext::read_f32`]. All matrices are row-major `f32`.
//!
//! Kernel families, one `.wgsl` file next to each launcher:
//! - [`matmul`]: `C = alpha·op(A)·op(B) (+ bias) (+ C)`, tiled 64×64 with 8×8
//!   register blocking, or on CPU adapters barrier-free with 12×12 register
//!   blocks read straight from storage, or (with subgroups of 8) 32×4 per lane
//!   sharing A through `subgroupBroadcast` (`matmul_subgroup.wgsl`), or the
//!   same reading A and B from storage textures (`matmul_texture.wgsl`), each
//!   also in a 16-lane form for llvmpipe's 512-bit vectors
//!   (`matmul_subgroup16.wgsl`, `matmul_texture16.wgsl`);
//!   transposes for `X·Wᵀ + b`, `dY·W`, `dYᵀ·X`; batched and strided
//!   (attention heads). Every module starts with `gelu_common.wgsl` and
//!   `matmul_common.wgsl` (parameters, shared bindings, the epilogue: GELU
//!   and its slope, or the gradient through it, as outputs are stored; the
//!   guarded store).
//! - [`gelu`]: exact erf-based GELU with its slope kept for the backward
//!   pass, and that backward pass, where a product's epilogue cannot do it.
//! - [`layernorm`]: LayerNorm of `x (+ residual)` forward (saving mean and
//!   1/std per row) and input gradient. Like the attention softmax, in one of
//!   two [`RowLayout`]s: a 64-invocation workgroup per row on GPUs, one
//!   invocation per row (no workgroup memory, no barriers) on CPU adapters.
//! - [`lora_sb`]: the LoRA-SB branch `Y += ((X·Aᵀ)·Rᵀ)·Bᵀ`, its input gradient
//!   and per-sample `G_n = (dY_n·B)ᵀ·(X_n·Aᵀ)`.
//! - [`attention`]: masked multi-head self-attention forward and backward
//!   (the products on [`matmul`], the masked row softmax and its backward in
//!   `attention.wgsl`).
//! - [`adamw`]: AdamW step on a flat buffer.
//! - [`head`]: mean pooling (and backward), logits, softmax cross-entropy with
//!   `dlogits`, per-sample head gradients.
//! - [`embeddings`]: word + position + token-type gather.
//! - [`dp`]: DP-SGD per-sample joint norms and the clipped, noised sum
//!   (written, or added for the later chunks of a batch split into passes).
//!
//! Every kernel has a plain-Rust reference in [`cpu_ref`] and a test
//! `<kernel>_matches_reference` in `tests/gpu_kernels.rs`:
//!
//! ```text
//! cargo test -p fedsb-engine --test gpu_kernels      # needs an adapter (lavapipe works)
//! cargo test -p fedsb-engine --test gpu_wgsl         # naga validation, CPU only (subgroup file with the capability)
//! cargo run --release -p fedsb-engine --example bench_matmul
//! ```
//!
//! # Where the time goes
//!
//! [`GpuContext::set_profiling`] submits every launch on its own and times it
//! ([`GpuContext::kernel_times`]); `FEDSB_PROFILE_KERNELS=1 cargo run
//! --release -p fedsb-engine --example bench_encoder` prints the table for one
//! forward pass and one training step of all-MiniLM-L6-v2. On lavapipe it
//! showed the attention softmax, one 64-invocation workgroup per row with 16
//! barriers, at a quarter of the forward pass (202 ms per launch for 24,576
//! rows of 64); one invocation per row ([`RowLayout::Invocation`]) takes
//! 16.5 ms, and LayerNorm 15 ms instead of 35. The matmuls are now 85 % of a
//! forward pass and of a training step (BENCHMARKS.md).
//!
//! # Performance on lavapipe
//!
//! `examples/bench_matmul.rs` prints GFLOP/s of all matmul variants back to back.
//! On the 2-core CI/dev machine (Xeon Sapphire Rapids, Mesa 22.3.6 llvmpipe, LLVM
//! 15, 256-bit) numpy/OpenBLAS sgemm on the same cores reaches 100–340 GFLOP/s;
//! the 30 % goal is therefore about 30–100 GFLOP/s, and it is **not met**.
//!
//! Cause (Mesa's gallivm source, `lp_bld_nir_soa.c`, and micro-benchmarks here):
//! this llvmpipe compiles every storage- and workgroup-memory load into a loop
//! over the 8 SIMD lanes with a branch per lane (a vec4 costs about as much as a
//! scalar: the components share the loop), and every barrier into a coroutine
//! switch. A GEMM is bound by load instructions per FMA, not by FMAs: FMAs are
//! cheap (8 lanes per AVX op), and accumulator spills only start to cost beyond
//! about 16×12 accumulators per invocation (see the sweep below).
//!
//! Four variants, picked by [`matmul::Variant::for_gemm`] (on CPU adapters
//! `Texture` for the linear layers' products where subgroups of 8 or 16 are
//! available, `Subgroup` for the other vec4-aligned products there, else
//! `Direct`; `Tiled` otherwise and on real GPUs):
//! - `Tiled` (`main`, any shape; real GPUs): 64×64 workgroup tiles staged in
//!   workgroup memory, 8×8 register blocks, vec4 reads of workgroup memory:
//!   2.1–4.6 GFLOP/s on lavapipe (1–4 % of numpy). Removing all its inner-loop
//!   loads (wrong results) only doubled the speed, removing the barriers 1.7×.
//! - `Direct` (`main_direct`, CPU adapters, vec4-aligned A and B): no workgroup
//!   memory, no barriers, no branches in the K loop (edge rows and columns are
//!   clamped, not masked); each invocation reads a 12×12 block's rows of A and
//!   columns of B straight from storage as vec4 and the CPU caches do the
//!   tiling. 1.6–2.8× `Tiled` in the same runs (mostly about 2×): 4.1–9.6
//!   GFLOP/s at load average 5–6 (medians of two `bench_matmul` runs; 7–11 at
//!   load 2–4), still 2–8 % of numpy's quiet sgemm. End to end (`bench_encoder
//!   32 64 32 1`, BENCHMARKS.md) a training step got about 2.4× faster.
//! - `Subgroup` (`matmul_subgroup.wgsl`, CPU adapters with subgroups of exactly
//!   8 lanes, vec4-aligned A and B): every lane of a `Direct` block row loads the
//!   same A values (8× redundant loads); here a workgroup is one 8-lane subgroup
//!   (llvmpipe's subgroup is its SIMD vector, and `subgroupBroadcast` a register
//!   shuffle), each lane loads a distinct eighth of a 32-row A block and
//!   broadcasts it, so a lane needs TM/8 + TN = 4 + 4 instead of TM + TN vec4
//!   loads per 4 k, for a 32×4 block per lane (32×32 per workgroup).
//!   [`GpuContext::new`] requests `wgpu::Features::SUBGROUP` where the adapter
//!   offers it ([`GpuContext::has_subgroups`]); the kernel is a separate module
//!   (wgpu validates a whole module against the device's features) and runs
//!   only where the subgroup size is fixed at 8 ([`GpuContext::subgroup_sizes`],
//!   min = max), since it assumes one whole subgroup per workgroup, or at 16
//!   (`matmul_subgroup16.wgsl`: 2 rows per lane, a 32×64 tile; llvmpipe with
//!   `LP_NATIVE_VECTOR_WIDTH=512`, which lavapipe honours but never picks
//!   itself); elsewhere `Direct`/`Tiled` run. In the browser wgpu 30 does not pass WebGPU's
//!   `"subgroups"` feature through yet, so there it is never used.
//!   Measured (`bench_matmul`, all three in alternation, two runs at load
//!   average 5–8, BENCHMARKS.md): 1.4–2.7× `Direct` (mostly 1.6–2.0×) and
//!   2.9–5.6× `Tiled` (medians), 8.6–12.8 GFLOP/s at load 5–6 (the throw-away
//!   harness had 16–19.5 for `A·B`/`A·Bᵀ` and 14–15.6 for `Aᵀ·B` at load 2–4;
//!   32×8 per lane reached 22.4 for `A·Bᵀ` there but only 10–12 for `Aᵀ·B`,
//!   so the kernel keeps 32×4 for all orientations); a training step
//!   of `bench_encoder 32 64 32 1` about 1.7× faster than with `Direct`
//!   (medians of 5 alternated runs; 41–44 % less CPU time per run).
//!
//! Barrier-free sweep (a throw-away harness timing generated WGSL variants back
//! to back, best of 2 rounds, load average 2–4, GFLOP/s for the four BERT
//! shapes; `Tiled` gave 4.0–4.9 in the same runs): per-invocation block 4×4:
//! 3.5–5.0; 4×8: 4.2–6.0; 8×4: 4.3–5.8; 8×8: 5.9–8.2; 8×12 / 12×8: 6.2–8.9;
//! 8×16 / 16×8: 8.3–9.7; 12×12: 7.2–11.2; 16×12: 8.3–11.2; 16×16: 7.8–8.6
//! (accumulator spills start to cost). Workgroups of 8×1, 8×2, 8×8 or 16×4
//! invocations made no difference beyond the noise, so `Direct` uses 8 (one SIMD
//! vector, the smallest tile for attention's small products). The loads per FMA,
//! `(TM + TN) / (TM·TN)` per lane, explain the order.
//!
//! Uniform addresses are not cheaper here: in `Direct` the 8 lanes of a
//! workgroup share their rows of A, so every A load has the same address in all
//! lanes. Replacing those loads by arithmetic (wrong results) made the 12×12
//! block 1.3–1.6× faster, replacing the per-lane B loads 1.3–1.9× (`A·Bᵀ`, same
//! run, load average 11): both cost about the same, this llvmpipe has no
//! single-load path for them.
//!
//! On a quiet machine `Subgroup` reaches 10–13 % of numpy's sgemm (28–39
//! GFLOP/s against about 300, BENCHMARKS.md); 30 % would need either a Mesa
//! whose memory access is vectorised or a native (non-WGSL) sgemm on CPU
//! adapters.
//!
//! How far loads are from the whole cost, on a quiet machine (2026-11-28,
//! load average 0.8, `bench_matmul` restricted to `Subgroup`, medians of 3
//! rounds over the 12 products; every change below was a throw-away edit
//! of `matmul_subgroup.wgsl` with wrong results, reverted):
//! - as committed: 28.0–38.2 GFLOP/s;
//! - B's loads replaced by arithmetic on `kq` and the lane: 38.8–58.9
//!   (1.13–1.77×, median 1.47×);
//! - A's and B's loads replaced: 67.1–103.8 (2.0–3.0×, median 2.5×). This is
//!   the ceiling of this kernel's FMAs, broadcasts and accumulator spills:
//!   22–35 % of numpy's quiet sgemm (about 300 GFLOP/s). Even with free
//!   loads the 30 % target would be met on the K = 1536 and 1024³ shapes
//!   only;
//! - B read through a uniform binding (`var<uniform> b4: array<vec4<f32>,
//!   4096>`, a 64 KiB window, the most lavapipe allows, indices wrapped):
//!   32.1–41.4 (1.04–1.25×, median 1.10×). Mesa's source compiles
//!   non-uniform UBO reads to a branch-free gather instead of the storage
//!   path's per-lane loop, but that gather is barely cheaper, and a real
//!   kernel would also need its operand split into 64 KiB windows, one
//!   dispatch each. Not adopted.
//!
//! The `Texture` variant (`matmul_texture.wgsl`, where `Subgroup` runs, for
//!   products with A not transposed, unbatched, N a multiple of 4, `lda` and
//!   `ldb` multiples of 64 and operands within 8192 texels: the linear
//!   layers' `X·Wᵀ` and `dY·W`): the `Subgroup` kernel's tile and broadcasts
//!   with A and B read by `textureLoad` from rgba32float read-only storage
//!   textures, into which the launcher copies them before every product
//!   ([`GpuContext`] keeps one scratch texture per operand slot and width and
//!   reuses it). An image load compiles to a branch-free gather of 8 × 16
//!   bytes, where a storage load is the per-lane loop above; a sampled
//!   texture's `textureLoad` was a called function that works out every
//!   lane's mip level (about 140 instructions per fetch), so storage
//!   textures made the kernel 1.2–1.3× faster. Its store reads the
//!   parameters once, outside every branch (a uniform load inside a branch
//!   becomes a per-lane gather on llvmpipe), and stores whole vec4s. With
//!   the bias and accumulate flags as pipeline constants
//!   (`matmul_common.wgsl`) instead of uniform fields, the stores lost their
//!   untaken branches; `bench_matmul` medians went from 39–48 to 58–71
//!   GFLOP/s on machine E (BENCHMARKS.md). What is left is mostly the
//!   multiply-adds themselves: llvmpipe lowers `fma` to a multiply and an
//!   add, two instructions on the same two ports, and 128 accumulators spill.
//!
//! Beside the kernels, the encoder multiplies by the merged weight
//! `W0 + B·R·A` of each adapted linear (`encoder::AdapterMerge`), which removes the LoRA-SB branch's products
//! with inner dimension r (about 10 GFLOP/s on lavapipe, their stores
//! dominating) from the forward and input-gradient passes.

pub mod adamw;
pub mod attention;
pub mod context;
pub mod cpu_ref;
pub mod dp;
pub mod embeddings;
pub mod encoder;
pub mod gelu;
pub mod head;
pub mod layernorm;
pub mod lora_sb;
pub mod matmul;

pub use context::{GpuBuffer, GpuContext, GpuOptions, KernelTime, RowLayout};

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
    /// A pass would need a storage buffer larger than the device allows
    /// ([`GpuContext::max_buffer_bytes`]): the batch (or its sequences) is too
    /// large for one pass.
    #[error("device buffer limit: {0}")]
    BufferLimit(String),
}
