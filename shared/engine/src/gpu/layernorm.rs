//! LayerNorm with optional residual add (`layernorm.wgsl`), forward and input
//! gradient (gamma and beta are frozen).
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels layernorm`.

use super::context::{GpuBuffer, GpuContext, Kernel, RowLayout};
use super::GpuError;

const SOURCE: &str = include_str!("layernorm.wgsl");

/// Shape of one LayerNorm launch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNormShape {
    /// Number of rows (tokens).
    pub rows: usize,
    /// Row length (hidden size).
    pub h: usize,
    /// Added to the variance (BERT: 1e-12).
    pub eps: f32,
}

fn check(shape: &LayerNormShape, bufs: &[(&str, &GpuBuffer, usize)]) -> Result<(), GpuError> {
    for (name, b, need) in bufs {
        if b.len < *need {
            return Err(GpuError::Shape(format!(
                "layernorm {shape:?}: {name} has {} < {need} elements",
                b.len
            )));
        }
    }
    Ok(())
}

fn params(ctx: &GpuContext, s: &LayerNormShape) -> wgpu::Buffer {
    ctx.uniform(&[s.rows as u32, s.h as u32, s.eps.to_bits(), 0])
}

/// The kernel `entry`, with or without the residual (`HAS_RESIDUAL`).
fn kernel(ctx: &GpuContext, entry: &str, residual: bool) -> Kernel {
    ctx.pipeline(
        &format!("layernorm/{entry}/res{}", residual as u8),
        SOURCE,
        entry,
        &[("HAS_RESIDUAL", residual as u8 as f64)],
    )
}

/// `y = LayerNorm(x (+ residual)) · gamma + beta`; writes `stats` = (mean, rstd)
/// per row (`2·rows` elements) for [`layernorm_backward`]. In `layout`
/// (the encoder uses the device's, [`RowLayout::for_device`]).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    layout: RowLayout,
    shape: &LayerNormShape,
    x: &GpuBuffer,
    residual: Option<&GpuBuffer>,
    gamma: &GpuBuffer,
    beta: &GpuBuffer,
    y: &GpuBuffer,
    stats: &GpuBuffer,
) -> Result<(), GpuError> {
    let n = shape.rows * shape.h;
    check(
        shape,
        &[
            ("x", x, n),
            ("gamma", gamma, shape.h),
            ("beta", beta, shape.h),
            ("y", y, n),
            ("stats", stats, 2 * shape.rows),
        ],
    )?;
    if let Some(r) = residual {
        check(shape, &[("residual", r, n)])?;
    }
    let (entry, groups) = layout.launch("forward", shape.rows);
    let kernel = kernel(ctx, &entry, residual.is_some());
    let params = params(ctx, shape);
    let residual = residual.unwrap_or(&ctx.dummy);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, params.as_entire_binding()),
            (1, x.binding()),
            (2, residual.binding()),
            (3, gamma.binding()),
            (4, beta.binding()),
            (5, y.binding()),
            (6, stats.binding()),
        ],
        groups,
    );
    Ok(())
}

/// `dx = ∂L/∂(x + residual)` from `dy`, the same inputs and the forward's
/// `stats`, in `layout`.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    layout: RowLayout,
    shape: &LayerNormShape,
    x: &GpuBuffer,
    residual: Option<&GpuBuffer>,
    gamma: &GpuBuffer,
    stats: &GpuBuffer,
    dy: &GpuBuffer,
    dx: &GpuBuffer,
) -> Result<(), GpuError> {
    let n = shape.rows * shape.h;
    check(
        shape,
        &[
            ("x", x, n),
            ("gamma", gamma, shape.h),
            ("stats", stats, 2 * shape.rows),
            ("dy", dy, n),
            ("dx", dx, n),
        ],
    )?;
    if let Some(r) = residual {
        check(shape, &[("residual", r, n)])?;
    }
    let (entry, groups) = layout.launch("backward", shape.rows);
    let kernel = kernel(ctx, &entry, residual.is_some());
    let params = params(ctx, shape);
    let residual = residual.unwrap_or(&ctx.dummy);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, params.as_entire_binding()),
            (1, x.binding()),
            (2, residual.binding()),
            (3, gamma.binding()),
            (6, stats.binding()),
            (7, dy.binding()),
            (8, dx.binding()),
        ],
        groups,
    );
    Ok(())
}
