//! DP-SGD clipping on the device (`dp.wgsl`): per-sample joint L2 norms over
//! segments of per-sample gradients, then the clipped sum plus noise, scaled,
//! written into the gradient buffer. Per-sample gradients are never read back.
//!
//! A DP step over segments `s = 1..S` (every `R`, the head weight and bias),
//! each a buffer of `batch × len_s` per-sample values:
//!
//! 1. clear `norms` (`batch` values), then [`dp_sq_norms`] once per segment:
//!    `norms[n] = Σ_s ‖g_{s,n}‖²`;
//! 2. [`dp_clip_sum`] once per segment:
//!    `out[off_s + j] = (Σ_n g_{s,n,j}·min(1, C/√norms[n]) + noise[off_s + j])·scale`.
//!
//! Clipping is per sample, so a batch too large for one pass is processed in
//! chunks of samples with the same result: steps 1–2 per chunk, the first
//! chunk with [`dp_clip_sum`] ([`SumInto::Overwrite`]) and the real noise,
//! every later one with [`SumInto::Accumulate`] (`out[off_s + j] += (…)·scale`)
//! and zero noise.
//! In `dp.wgsl` the flag is the `accumulate` word of the parameters.
//!
//! Plain-Rust references: [`sq_norms_reference`], [`clip_sum_reference`].
//! Test: `cargo test -p fedsb-engine --test gpu_kernels dp_`.

use super::context::{groups_1d, GpuBuffer, GpuContext};
use super::GpuError;

const SOURCE: &str = include_str!("dp.wgsl");

fn uniform(
    ctx: &GpuContext,
    batch: usize,
    len: usize,
    offset: usize,
    clip: f32,
    scale: f32,
    accumulate: bool,
) -> wgpu::Buffer {
    ctx.uniform(&[
        batch as u32,
        len as u32,
        offset as u32,
        clip.to_bits(),
        scale.to_bits(),
        u32::from(accumulate),
        0,
        0,
    ])
}

fn check(what: &str, buf: &GpuBuffer, need: usize) -> Result<(), GpuError> {
    if buf.len < need {
        return Err(GpuError::Shape(format!(
            "dp: {what} has {} < {need} elements",
            buf.len
        )));
    }
    Ok(())
}

/// Adds the squared L2 norm of each sample's `len` values in `per_sample`
/// (`batch × len`) to `norms[n]`.
pub fn dp_sq_norms(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    per_sample: &GpuBuffer,
    batch: usize,
    len: usize,
    norms: &GpuBuffer,
) -> Result<(), GpuError> {
    check("per-sample gradients", per_sample, batch * len)?;
    check("norms", norms, batch)?;
    if batch == 0 {
        return Ok(());
    }
    let kernel = ctx.pipeline("dp/sq_norms", SOURCE, "sq_norms", &[]);
    let p = uniform(ctx, batch, len, 0, 0.0, 0.0, false);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, p.as_entire_binding()),
            (1, per_sample.binding()),
            (2, norms.binding()),
        ],
        groups_1d(batch, 1),
    );
    Ok(())
}

/// Whether [`dp_clip_sum`] writes its result or adds it to what `out` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SumInto {
    /// `out[offset + j] = …` (one pass, or the first chunk of a batch).
    Overwrite,
    /// `out[offset + j] += …` (the later chunks of a batch clipped in chunks,
    /// with zero `noise`).
    Accumulate,
}

/// Writes (or with [`SumInto::Accumulate`] adds) `out[offset + j] =
/// (Σ_n per_sample[n·len + j]·min(1, clip/√norms[n]) + noise[offset + j])·scale`
/// for `j < len` (a zero norm keeps factor 1).
#[allow(clippy::too_many_arguments)]
pub fn dp_clip_sum(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    per_sample: &GpuBuffer,
    batch: usize,
    len: usize,
    norms: &GpuBuffer,
    clip: f32,
    noise: &GpuBuffer,
    scale: f32,
    out: &GpuBuffer,
    offset: usize,
    into: SumInto,
) -> Result<(), GpuError> {
    check("per-sample gradients", per_sample, batch * len)?;
    check("norms", norms, batch)?;
    check("noise", noise, offset + len)?;
    check("output", out, offset + len)?;
    if !(clip > 0.0 && clip.is_finite()) {
        return Err(GpuError::Shape(format!(
            "dp: clip norm must be positive and finite, got {clip}"
        )));
    }
    if len == 0 {
        return Ok(());
    }
    let kernel = ctx.pipeline("dp/clip_sum", SOURCE, "clip_sum", &[]);
    let accumulate = into == SumInto::Accumulate;
    let p = uniform(ctx, batch, len, offset, clip, scale, accumulate);
    ctx.dispatch_at(
        encoder,
        &kernel,
        &[
            (0, p.as_entire_binding()),
            (1, per_sample.binding()),
            (3, norms.binding()),
            (4, noise.binding()),
            (5, out.binding()),
        ],
        groups_1d(len, 256),
    );
    Ok(())
}

/// Reference of [`dp_sq_norms`]: adds each sample's squared norm to `norms`.
pub fn sq_norms_reference(per_sample: &[f32], batch: usize, len: usize, norms: &mut [f32]) {
    for (n, norm) in norms.iter_mut().enumerate().take(batch) {
        let s: f64 = per_sample[n * len..(n + 1) * len]
            .iter()
            .map(|&x| x as f64 * x as f64)
            .sum();
        *norm += s as f32;
    }
}

/// Reference of [`dp_clip_sum`].
#[allow(clippy::too_many_arguments)]
pub fn clip_sum_reference(
    per_sample: &[f32],
    batch: usize,
    len: usize,
    norms: &[f32],
    clip: f32,
    noise: &[f32],
    scale: f32,
    out: &mut [f32],
    offset: usize,
    into: SumInto,
) {
    let factors: Vec<f64> = norms[..batch]
        .iter()
        .map(|&sq| {
            if sq > 0.0 {
                (clip as f64 / (sq as f64).sqrt()).min(1.0)
            } else {
                1.0
            }
        })
        .collect();
    for j in 0..len {
        let s: f64 = (0..batch)
            .map(|n| per_sample[n * len + j] as f64 * factors[n])
            .sum();
        let v = ((s + noise[offset + j] as f64) * scale as f64) as f32;
        if into == SumInto::Accumulate {
            out[offset + j] += v;
        } else {
            out[offset + j] = v;
        }
    }
}
