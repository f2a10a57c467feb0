//! Exact GELU (`gelu.wgsl`): `y = x·Φ(x)` and its derivative `dx = dy·(Φ(x) + x·φ(x))`.
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels gelu`.

use super::context::{groups_1d, GpuBuffer, GpuContext};
use super::GpuError;

const SOURCE: &str = include_str!("gelu.wgsl");

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

/// `y[i] = gelu(x[i])` for `i < n`.
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
            (3, y.binding()),
        ],
        groups_1d(n, 256),
    );
    Ok(())
}

/// `dx[i] = dy[i] · gelu'(x[i])` for `i < n`.
pub fn gelu_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    x: &GpuBuffer,
    dy: &GpuBuffer,
    dx: &GpuBuffer,
    n: usize,
) -> Result<(), GpuError> {
    check(n, &[("x", x), ("dy", dy), ("dx", dx)])?;
    let kernel = ctx.pipeline("gelu/backward", SOURCE, "backward", &[]);
    let params = ctx.uniform(&[n as u32, 0, 0, 0]);
    ctx.dispatch(
        encoder,
        &kernel,
        &[
            params.as_entire_binding(),
            x.binding(),
            dy.binding(),
            dx.binding(),
        ],
        groups_1d(n, 256),
    );
    Ok(())
}
