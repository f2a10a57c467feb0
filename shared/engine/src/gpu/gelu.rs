//! Exact GELU (`gelu.wgsl`, after `gelu_common.wgsl`) for a linear layer whose
//! output is not final when its matrix product ends: `y = gelu(x)` with `x`
//! replaced by the slope `gelu'(x)`, and the backward pass `d = d·slope` in
//! place. Where the product's output is final, the matmul's epilogue does both
//! instead ([`super::matmul::Epilogue`]).
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels gelu`.

use super::context::{groups_1d, GpuBuffer, GpuContext};
use super::GpuError;

const SOURCE: &str = concat!(include_str!("gelu_common.wgsl"), include_str!("gelu.wgsl"));

fn check(n: usize, bufs: &[(&str, &GpuBuffer)]) -> Result<(), GpuError> {
    for (name, b) in bufs {
        if b.len < n {
            return Err(GpuError::Shape(format!(
                "gelu: {name} has {} < {n} elements",
                b.len
            )));
        }
    }
    Ok(())
}

/// `y[i] = gelu(x[i])` and `x[i] = gelu'(x[i])` (the slope, in place of the
/// pre-activation) for `i < n`.
pub fn gelu_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    x: &GpuBuffer,
    y: &GpuBuffer,
    n: usize,
) -> Result<(), GpuError> {
    check(n, &[("x", x), ("y", y)])?;
    let kernel = ctx.pipeline("gelu/forward", SOURCE, "forward", &[]);
    let params = ctx.uniform(&[n as u32, 0, 0, 0]);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, params.as_entire_binding()),
            (1, x.binding()),
            (2, y.binding()),
        ],
        groups_1d(n, 256),
    );
    Ok(())
}

/// `d[i] = d[i] · slope[i]` for `i < n`: the gradient through GELU, given the
/// slopes [`gelu_forward`] (or the matmul's GELU epilogue) left.
pub fn gelu_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    slope: &GpuBuffer,
    d: &GpuBuffer,
    n: usize,
) -> Result<(), GpuError> {
    check(n, &[("slope", slope), ("d", d)])?;
    let kernel = ctx.pipeline("gelu/gate", SOURCE, "gate", &[]);
    let params = ctx.uniform(&[n as u32, 0, 0, 0]);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, params.as_entire_binding()),
            (3, slope.binding()),
            (4, d.binding()),
        ],
        groups_1d(n, 256),
    );
    Ok(())
}
