//! Multi-head self-attention with a key padding mask (`attention.wgsl` softmax +
//! batched matmul launches), forward and backward.
//!
//! Q, K, V, the context and their gradients are `[batch, seq, heads·head_dim]`
//! (the layout the q/k/v linear layers produce); probabilities are
//! `[batch, heads, seq, seq]`; `key_mask` is `[batch, seq]` u32, 0 = padding.
//!
//! - forward: `P = softmax_masked(Q·Kᵀ/√d)`, `ctx = P·V`;
//! - backward: `dP = dctx·Vᵀ`, `dV = Pᵀ·dctx`, `dS = P⊙(dP - rowsum(P⊙dP))/√d`,
//!   `dQ = dS·K`, `dK = dSᵀ·Q`.
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels attention`.

use super::context::{GpuBuffer, GpuContext, RowLayout};
use super::matmul::{gemm, Gemm};
use super::GpuError;

const SOURCE: &str = include_str!("attention.wgsl");

/// Sizes of one attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence (padded).
    pub seq: usize,
    /// Heads.
    pub heads: usize,
    /// Size of one head.
    pub head_dim: usize,
}

impl AttentionShape {
    fn hidden(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Elements of the `[batch, heads, seq, seq]` probability buffer.
    pub fn probs_len(&self) -> usize {
        self.batch * self.heads * self.seq * self.seq
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    // Per-(sequence, head) product over [B, T, H·D] and [B, H, T, T] storage.
    fn scores_gemm(&self) -> Gemm {
        let (t, d, hd) = (self.seq, self.head_dim, self.hidden());
        // S = Q·Kᵀ: Q (T×D, ld H·D), K stored T×D (ld H·D) used transposed.
        Gemm::new(t, t, d).trans_b().ld(hd, hd, t).batched(
            self.batch,
            self.heads,
            [t * hd, d],
            [t * hd, d],
            [self.heads * t * t, t * t],
        )
    }
}

fn check(shape: &AttentionShape, bufs: &[(&str, &GpuBuffer, usize)]) -> Result<(), GpuError> {
    for (name, b, need) in bufs {
        if b.len < *need {
            return Err(GpuError::Shape(format!(
                "attention {shape:?}: {name} has {} < {need} elements",
                b.len
            )));
        }
    }
    if shape.batch * shape.heads > 65_535 {
        return Err(GpuError::Shape(format!(
            "attention {shape:?}: batch·heads above 65535"
        )));
    }
    Ok(())
}

/// In place, row by row: `probs = softmax(probs)` over the valid keys
/// (`key_mask` ≠ 0; padding keys get 0), on `batch·heads·seq` rows of
/// `seq` scores, in `layout` (the attention launchers use the device's,
/// [`RowLayout::for_device`]).
pub fn softmax_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    shape: &AttentionShape,
    layout: RowLayout,
    key_mask: &GpuBuffer,
    probs: &GpuBuffer,
) -> Result<(), GpuError> {
    check(
        shape,
        &[
            ("key_mask", key_mask, shape.batch * shape.seq),
            ("probs", probs, shape.probs_len()),
        ],
    )?;
    softmax(
        ctx,
        encoder,
        shape,
        layout,
        "softmax_forward",
        key_mask,
        probs,
        None,
    );
    Ok(())
}

/// In place: `dprobs = scale · P · (dP − Σ_k P·dP)` row by row (the gradient
/// of the unscaled scores from that of the probabilities `probs`), in
/// `layout`.
pub fn softmax_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    shape: &AttentionShape,
    layout: RowLayout,
    probs: &GpuBuffer,
    dprobs: &GpuBuffer,
) -> Result<(), GpuError> {
    check(
        shape,
        &[
            ("probs", probs, shape.probs_len()),
            ("dprobs", dprobs, shape.probs_len()),
        ],
    )?;
    softmax(
        ctx,
        encoder,
        shape,
        layout,
        "softmax_backward",
        probs,
        probs,
        Some(dprobs),
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn softmax(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    shape: &AttentionShape,
    layout: RowLayout,
    entry: &str,
    key_mask: &GpuBuffer,
    probs: &GpuBuffer,
    grad: Option<&GpuBuffer>,
) {
    let rows = shape.batch * shape.heads * shape.seq;
    let (entry, groups) = layout.launch(entry, rows);
    let kernel = ctx.pipeline(&format!("attention/{entry}"), SOURCE, &entry, &[]);
    let params = ctx.uniform(&[
        rows as u32,
        shape.seq as u32,
        shape.heads as u32,
        shape.scale().to_bits(),
    ]);
    let mut bindings = vec![(0, params.as_entire_binding()), (2, probs.binding())];
    match grad {
        Some(g) => bindings.push((3, g.binding())),
        None => bindings.push((1, key_mask.binding())),
    }
    ctx.dispatch_at(encoder, &kernel, &bindings, groups);
}

/// `probs = softmax_masked(Q·Kᵀ/√d)` and `context = probs·V`.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    shape: &AttentionShape,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    key_mask: &GpuBuffer,
    probs: &GpuBuffer,
    context: &GpuBuffer,
) -> Result<(), GpuError> {
    let n = shape.batch * shape.seq * shape.hidden();
    check(
        shape,
        &[
            ("q", q, n),
            ("k", k, n),
            ("v", v, n),
            ("key_mask", key_mask, shape.batch * shape.seq),
            ("probs", probs, shape.probs_len()),
            ("context", context, n),
        ],
    )?;
    let (t, d, hd) = (shape.seq, shape.head_dim, shape.hidden());
    gemm(
        ctx,
        encoder,
        &shape.scores_gemm().alpha(shape.scale()),
        q,
        k,
        None,
        probs,
    )?;
    softmax(
        ctx,
        encoder,
        shape,
        RowLayout::for_device(ctx),
        "softmax_forward",
        key_mask,
        probs,
        None,
    );
    // context(b, h) = P(b, h) [T×T] · V(b, h) [T×D].
    let pv = Gemm::new(t, d, t).ld(t, hd, hd).batched(
        shape.batch,
        shape.heads,
        [shape.heads * t * t, t * t],
        [t * hd, d],
        [t * hd, d],
    );
    gemm(ctx, encoder, &pv, probs, v, None, context)
}

/// Gradients of Q, K, V (overwritten) from `dcontext`, using the forward's
/// `probs`. `dprobs` is a scratch buffer of [`AttentionShape::probs_len`].
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    shape: &AttentionShape,
    q: &GpuBuffer,
    k: &GpuBuffer,
    v: &GpuBuffer,
    probs: &GpuBuffer,
    dcontext: &GpuBuffer,
    dprobs: &GpuBuffer,
    dq: &GpuBuffer,
    dk: &GpuBuffer,
    dv: &GpuBuffer,
) -> Result<(), GpuError> {
    let n = shape.batch * shape.seq * shape.hidden();
    check(
        shape,
        &[
            ("q", q, n),
            ("k", k, n),
            ("v", v, n),
            ("probs", probs, shape.probs_len()),
            ("dcontext", dcontext, n),
            ("dprobs", dprobs, shape.probs_len()),
            ("dq", dq, n),
            ("dk", dk, n),
            ("dv", dv, n),
        ],
    )?;
    let (t, d, hd, hh, b) = (
        shape.seq,
        shape.head_dim,
        shape.hidden(),
        shape.heads,
        shape.batch,
    );
    let tok = [t * hd, d]; // strides of a head's T×D slice in token-major storage
    let sq = [hh * t * t, t * t]; // strides of a head's T×T slice
                                  // dP = dctx·Vᵀ (T×D · (T×D)ᵀ).
    gemm(
        ctx,
        encoder,
        &Gemm::new(t, t, d)
            .trans_b()
            .ld(hd, hd, t)
            .batched(b, hh, tok, tok, sq),
        dcontext,
        v,
        None,
        dprobs,
    )?;
    // dV = Pᵀ·dctx (P stored T×T used transposed).
    gemm(
        ctx,
        encoder,
        &Gemm::new(t, d, t)
            .trans_a()
            .ld(t, hd, hd)
            .batched(b, hh, sq, tok, tok),
        probs,
        dcontext,
        None,
        dv,
    )?;
    // dS (scaled) in place of dP.
    softmax(
        ctx,
        encoder,
        shape,
        RowLayout::for_device(ctx),
        "softmax_backward",
        probs,
        probs,
        Some(dprobs),
    );
    // dQ = dS·K, dK = dSᵀ·Q.
    gemm(
        ctx,
        encoder,
        &Gemm::new(t, d, t)
            .ld(t, hd, hd)
            .batched(b, hh, sq, tok, tok),
        dprobs,
        k,
        None,
        dq,
    )?;
    gemm(
        ctx,
        encoder,
        &Gemm::new(t, d, t)
            .trans_a()
            .ld(t, hd, hd)
            .batched(b, hh, sq, tok, tok),
        dprobs,
        q,
        None,
        dk,
    )
}
