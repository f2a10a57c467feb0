//! Classification head (`head.wgsl` + a matmul): mean pooling over valid tokens,
//! `logits = pooled·Wᵀ + b`, softmax cross-entropy with `dlogits`, the pooling
//! backward and per-sample head gradients.
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels head`.

use super::context::{GpuBuffer, GpuContext};
use super::matmul::linear_forward;
use super::GpuError;

const SOURCE: &str = include_str!("head.wgsl");

/// Sizes of the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence (padded).
    pub seq: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Classes.
    pub classes: usize,
}

fn check(s: &HeadShape, bufs: &[(&str, &GpuBuffer, usize)]) -> Result<(), GpuError> {
    for (name, b, need) in bufs {
        if b.len < *need {
            return Err(GpuError::Shape(format!(
                "head {s:?}: {name} has {} < {need} elements",
                b.len
            )));
        }
    }
    if s.batch * s.classes > 65_535 || s.classes == 0 {
        return Err(GpuError::Shape(format!(
            "head {s:?}: batch·classes above 65535, or no class"
        )));
    }
    Ok(())
}

fn params(ctx: &GpuContext, s: &HeadShape, scale: f32) -> wgpu::Buffer {
    ctx.uniform(&[
        s.batch as u32,
        s.seq as u32,
        s.hidden as u32,
        s.classes as u32,
        scale.to_bits(),
        0,
        0,
        0,
    ])
}

/// `pooled[n] = mean of x[n, t] over tokens with mask[n·seq + t] != 0`
/// (`x` is `[batch, seq, hidden]`, `mask` u32 `[batch, seq]`).
pub fn mean_pool_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    s: &HeadShape,
    mask: &GpuBuffer,
    x: &GpuBuffer,
    pooled: &GpuBuffer,
) -> Result<(), GpuError> {
    check(
        s,
        &[
            ("mask", mask, s.batch * s.seq),
            ("x", x, s.batch * s.seq * s.hidden),
            ("pooled", pooled, s.batch * s.hidden),
        ],
    )?;
    let kernel = ctx.pipeline("head/mean_pool_forward", SOURCE, "mean_pool_forward", &[]);
    let p = params(ctx, s, 1.0);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, p.as_entire_binding()),
            (1, mask.binding()),
            (2, x.binding()),
            (3, pooled.binding()),
        ],
        [s.hidden.div_ceil(64) as u32, s.batch as u32, 1],
    );
    Ok(())
}

/// `dx[n, t] = dpooled[n] / count_n` for valid tokens, 0 for padding (overwrites `dx`).
pub fn mean_pool_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    s: &HeadShape,
    mask: &GpuBuffer,
    dpooled: &GpuBuffer,
    dx: &GpuBuffer,
) -> Result<(), GpuError> {
    check(
        s,
        &[
            ("mask", mask, s.batch * s.seq),
            ("dpooled", dpooled, s.batch * s.hidden),
            ("dx", dx, s.batch * s.seq * s.hidden),
        ],
    )?;
    let kernel = ctx.pipeline("head/mean_pool_backward", SOURCE, "mean_pool_backward", &[]);
    let p = params(ctx, s, 1.0);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, p.as_entire_binding()),
            (1, mask.binding()),
            (4, dpooled.binding()),
            (5, dx.binding()),
        ],
        [s.hidden.div_ceil(64) as u32, s.batch as u32, 1],
    );
    Ok(())
}

/// `logits = pooled·Wᵀ + b` with `w` stored `classes×hidden`.
pub fn head_logits(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    s: &HeadShape,
    pooled: &GpuBuffer,
    w: &GpuBuffer,
    b: &GpuBuffer,
    logits: &GpuBuffer,
) -> Result<(), GpuError> {
    linear_forward(
        ctx,
        encoder,
        pooled,
        w,
        Some(b),
        logits,
        s.batch,
        s.hidden,
        s.classes,
    )
}

/// Per-sample `loss[n] = -log softmax(logits[n])[label_n]` and
/// `dlogits[n] = scale·(softmax(logits[n]) - onehot(label_n))`.
/// Use `scale = 1/batch` for the gradient of the batch mean, 1 for per-sample
/// gradients. Labels must be below `classes`.
#[allow(clippy::too_many_arguments)]
pub fn softmax_cross_entropy(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    s: &HeadShape,
    logits: &GpuBuffer,
    labels: &GpuBuffer,
    scale: f32,
    loss: &GpuBuffer,
    dlogits: &GpuBuffer,
) -> Result<(), GpuError> {
    let nc = s.batch * s.classes;
    check(
        s,
        &[
            ("logits", logits, nc),
            ("labels", labels, s.batch),
            ("loss", loss, s.batch),
            ("dlogits", dlogits, nc),
        ],
    )?;
    let kernel = ctx.pipeline("head/softmax_xent", SOURCE, "softmax_xent", &[]);
    let p = params(ctx, s, scale);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, p.as_entire_binding()),
            (6, logits.binding()),
            (7, labels.binding()),
            (8, loss.binding()),
            (9, dlogits.binding()),
        ],
        [s.batch.div_ceil(64) as u32, 1, 1],
    );
    Ok(())
}

/// Per-sample head gradients: `dw[n] = dlogits[n] ⊗ pooled[n]` (`batch·classes·hidden`)
/// and `db[n] = dlogits[n]` (`batch·classes`).
#[allow(clippy::too_many_arguments)]
pub fn head_grad_per_sample(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    s: &HeadShape,
    pooled: &GpuBuffer,
    dlogits: &GpuBuffer,
    dw: &GpuBuffer,
    db: &GpuBuffer,
) -> Result<(), GpuError> {
    let nc = s.batch * s.classes;
    check(
        s,
        &[
            ("pooled", pooled, s.batch * s.hidden),
            ("dlogits", dlogits, nc),
            ("dw", dw, nc * s.hidden),
            ("db", db, nc),
        ],
    )?;
    let kernel = ctx.pipeline("head/head_grad", SOURCE, "head_grad", &[]);
    let p = params(ctx, s, 1.0);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, p.as_entire_binding()),
            (3, pooled.binding()),
            (9, dlogits.binding()),
            (10, dw.binding()),
            (11, db.binding()),
        ],
        [s.hidden.div_ceil(64) as u32, nc as u32, 1],
    );
    Ok(())
}
