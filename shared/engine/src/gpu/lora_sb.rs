//! LoRA-SB branch of one adapted linear layer (`lora_sb.wgsl` + matmul launches).
//!
//! With `A` (r×in) and `B` (out×r) frozen and `R` (r×r) trained:
//! - forward: `XA = X·Aᵀ` (kept for the backward), `Y += (XA·Rᵀ)·Bᵀ`;
//! - backward: `U = dY·B`, `dX += (U·R)·A`, and per sample
//!   `G_n = (dY_n·B)ᵀ·(X_n·Aᵀ) = Σ_{t∈n} U_tᵀ·XA_t`, an r×r matrix.
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels lora_sb`.

use super::context::{GpuBuffer, GpuContext};
use super::matmul::{gemm, Gemm};
use super::GpuError;

const SOURCE: &str = include_str!("lora_sb.wgsl");

/// Sizes of one adapted layer applied to `rows` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoraSbDims {
    /// Tokens (rows of X and Y).
    pub rows: usize,
    /// Input features (columns of A).
    pub in_features: usize,
    /// Output features (rows of B).
    pub out_features: usize,
    /// Rank r.
    pub rank: usize,
}

/// `xa = X·Aᵀ`, `tmp = xa·Rᵀ`, `y += tmp·Bᵀ`. `xa` and `tmp` are rows×r
/// buffers owned by the caller; keep `xa` for [`lora_sb_grad_r`].
#[allow(clippy::too_many_arguments)]
pub fn lora_sb_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    d: &LoraSbDims,
    x: &GpuBuffer,
    a: &GpuBuffer,
    r: &GpuBuffer,
    b: &GpuBuffer,
    xa: &GpuBuffer,
    tmp: &GpuBuffer,
    y: &GpuBuffer,
) -> Result<(), GpuError> {
    gemm(
        ctx,
        encoder,
        &Gemm::new(d.rows, d.rank, d.in_features).trans_b(),
        x,
        a,
        None,
        xa,
    )?;
    gemm(
        ctx,
        encoder,
        &Gemm::new(d.rows, d.rank, d.rank).trans_b(),
        xa,
        r,
        None,
        tmp,
    )?;
    gemm(
        ctx,
        encoder,
        &Gemm::new(d.rows, d.out_features, d.rank)
            .trans_b()
            .accumulate(),
        tmp,
        b,
        None,
        y,
    )
}

/// `u = dY·B`, `tmp = u·R`, `dx += tmp·A`. Keep `u` for [`lora_sb_grad_r`].
#[allow(clippy::too_many_arguments)]
pub fn lora_sb_backward_input(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    d: &LoraSbDims,
    dy: &GpuBuffer,
    a: &GpuBuffer,
    r: &GpuBuffer,
    b: &GpuBuffer,
    u: &GpuBuffer,
    tmp: &GpuBuffer,
    dx: &GpuBuffer,
) -> Result<(), GpuError> {
    gemm(
        ctx,
        encoder,
        &Gemm::new(d.rows, d.rank, d.out_features),
        dy,
        b,
        None,
        u,
    )?;
    gemm(
        ctx,
        encoder,
        &Gemm::new(d.rows, d.rank, d.rank),
        u,
        r,
        None,
        tmp,
    )?;
    gemm(
        ctx,
        encoder,
        &Gemm::new(d.rows, d.in_features, d.rank).accumulate(),
        tmp,
        a,
        None,
        dx,
    )
}

/// Per-sample R gradients `grad[n] = Σ_{t: sample_of[t] = n} u[t]ᵀ·xa[t]`
/// (`batch·r·r` elements, overwritten).
///
/// `sample_of[t]` is token t's sample (padding: `u32::MAX`). Only tokens
/// `n·window .. (n+1)·window` are scanned for sample n: pass the sequence length
/// for the padded `[batch, seq]` layout, or `rows` for any token order.
#[allow(clippy::too_many_arguments)]
pub fn lora_sb_grad_r(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    d: &LoraSbDims,
    u: &GpuBuffer,
    xa: &GpuBuffer,
    sample_of: &GpuBuffer,
    batch: usize,
    window: usize,
    grad: &GpuBuffer,
) -> Result<(), GpuError> {
    let need = [
        ("u", u, d.rows * d.rank),
        ("xa", xa, d.rows * d.rank),
        ("sample_of", sample_of, d.rows),
        ("grad", grad, batch * d.rank * d.rank),
    ];
    for (name, buf, n) in need {
        if buf.len < n {
            return Err(GpuError::Shape(format!(
                "lora_sb_grad_r {d:?}: {name} has {} < {n} elements",
                buf.len
            )));
        }
    }
    if batch > 65_535 || window == 0 {
        return Err(GpuError::Shape(format!(
            "lora_sb_grad_r: batch {batch} or window {window} out of range"
        )));
    }
    let kernel = ctx.pipeline("lora_sb/grad_r", SOURCE, "grad_r", &[]);
    let params = ctx.uniform(&[d.rows as u32, d.rank as u32, batch as u32, window as u32]);
    let g = d.rank.div_ceil(8) as u32;
    ctx.dispatch(
        encoder,
        &kernel,
        &[
            params.as_entire_binding(),
            u.binding(),
            xa.binding(),
            sample_of.binding(),
            grad.binding(),
        ],
        [g, g, batch as u32],
    );
    Ok(())
}
