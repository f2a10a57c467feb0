//! LayerNorm with optional residual add (`layernorm.wgsl`), forward and input
//! gradient (gamma and beta are frozen).
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels layernorm`.

use super::context::{GpuBuffer, GpuContext, Kernel, RowLayout};
use super::GpuError;

const SOURCE: &str = include_str!("layernorm.wgsl");
/// The row kernels reading textures ([`RowLayout::Texture`]).
#[cfg(not(target_arch = "wasm32"))]
const TEXTURE_SOURCE: &str = include_str!("layernorm_texture.wgsl");

/// Texture slots of [`GpuContext::copy_to_texture`] (the matmul's are 0
/// and 1).
#[cfg(not(target_arch = "wasm32"))]
mod slot {
    pub const X: u8 = 2;
    pub const RESIDUAL: u8 = 3;
    pub const GAMMA: u8 = 4;
    pub const BETA: u8 = 5;
    pub const DY: u8 = 6;
}

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

/// Whether `layout` runs `shape` on the texture kernels
/// (`layernorm_texture.wgsl`): [`RowLayout::Texture`] natively, with rows a
/// multiple of 64 floats (the texture copy's 256-byte row alignment) and the
/// matrix within the textures' 8,192 × 8,192 texels. Otherwise `Texture`
/// runs the `Invocation` kernels.
pub fn on_textures(layout: RowLayout, shape: &LayerNormShape) -> bool {
    !cfg!(target_arch = "wasm32")
        && layout == RowLayout::Texture
        && shape.h.is_multiple_of(64)
        && shape.h / 4 <= super::matmul::TEXTURE_MAX_DIM
        && shape.rows <= super::matmul::TEXTURE_MAX_DIM
}

/// The texture file's kernel `entry` ([`on_textures`]).
#[cfg(not(target_arch = "wasm32"))]
fn texture_kernel(ctx: &GpuContext, entry: &str, residual: bool) -> Kernel {
    ctx.pipeline(
        &format!("layernorm-texture/{entry}/res{}", residual as u8),
        TEXTURE_SOURCE,
        entry,
        &[("HAS_RESIDUAL", residual as u8 as f64)],
    )
}

/// Copies the `rows × h` matrix `buf` into the texture of `slot` and returns
/// a view of it ([`GpuContext::copy_to_texture`]).
#[cfg(not(target_arch = "wasm32"))]
fn texture(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    slot: u8,
    buf: &GpuBuffer,
    rows: usize,
    h: usize,
) -> wgpu::TextureView {
    // Both within TEXTURE_MAX_DIM (on_textures).
    ctx.copy_to_texture(encoder, slot, buf, 0, h, (h / 4) as u32, rows as u32)
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
    let params = params(ctx, shape);
    #[cfg(not(target_arch = "wasm32"))]
    if on_textures(layout, shape) {
        let (rows, h) = (shape.rows, shape.h);
        let kernel = texture_kernel(ctx, &entry, residual.is_some());
        let xt = texture(ctx, encoder, slot::X, x, rows, h);
        // Without a residual the kernel never reads binding 10: x again.
        let rt = residual.map_or_else(
            || xt.clone(),
            |r| texture(ctx, encoder, slot::RESIDUAL, r, rows, h),
        );
        let gt = texture(ctx, encoder, slot::GAMMA, gamma, 1, h);
        let bt = texture(ctx, encoder, slot::BETA, beta, 1, h);
        ctx.dispatch_at(
            encoder,
            &kernel,
            &[
                (0, params.as_entire_binding()),
                (6, stats.binding()),
                (9, wgpu::BindingResource::TextureView(&xt)),
                (10, wgpu::BindingResource::TextureView(&rt)),
                (11, wgpu::BindingResource::TextureView(&gt)),
                (12, wgpu::BindingResource::TextureView(&bt)),
                (14, y.binding()),
            ],
            groups,
        );
        return Ok(());
    }
    let kernel = kernel(ctx, &entry, residual.is_some());
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
    let params = params(ctx, shape);
    #[cfg(not(target_arch = "wasm32"))]
    if on_textures(layout, shape) {
        let (rows, h) = (shape.rows, shape.h);
        let kernel = texture_kernel(ctx, &entry, residual.is_some());
        let xt = texture(ctx, encoder, slot::X, x, rows, h);
        let rt = residual.map_or_else(
            || xt.clone(),
            |r| texture(ctx, encoder, slot::RESIDUAL, r, rows, h),
        );
        let gt = texture(ctx, encoder, slot::GAMMA, gamma, 1, h);
        let dyt = texture(ctx, encoder, slot::DY, dy, rows, h);
        ctx.dispatch_at(
            encoder,
            &kernel,
            &[
                (0, params.as_entire_binding()),
                (6, stats.binding()),
                (9, wgpu::BindingResource::TextureView(&xt)),
                (10, wgpu::BindingResource::TextureView(&rt)),
                (11, wgpu::BindingResource::TextureView(&gt)),
                (13, wgpu::BindingResource::TextureView(&dyt)),
                (15, dx.binding()),
            ],
            groups,
        );
        return Ok(());
    }
    let kernel = kernel(ctx, &entry, residual.is_some());
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
