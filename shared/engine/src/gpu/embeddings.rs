//! BERT input embeddings (`embeddings.wgsl`): word + position + token type.
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels embeddings`.

use super::context::{GpuBuffer, GpuContext};
use super::GpuError;

const SOURCE: &str = include_str!("embeddings.wgsl");

/// Embedding tables: `word` (`vocab×hidden`), `position` (`positions×hidden`),
/// `token_type` (`types×hidden`).
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingTables<'a> {
    /// Word embeddings.
    pub word: &'a GpuBuffer,
    /// Position embeddings (position = token index within its sequence).
    pub position: &'a GpuBuffer,
    /// Token-type embeddings.
    pub token_type: &'a GpuBuffer,
    /// Rows of `word`.
    pub vocab: usize,
    /// Rows of `position`.
    pub positions: usize,
    /// Rows of `token_type`.
    pub types: usize,
    /// Hidden size.
    pub hidden: usize,
}

/// `out[row] = word[ids[row]] + position[row % seq] + token_type[type_ids[row]]`
/// for `rows = batch·seq` tokens. Ids must be below their table's size (larger
/// ones are clamped to the last row).
#[allow(clippy::too_many_arguments)]
pub fn embeddings_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    t: &EmbeddingTables<'_>,
    ids: &GpuBuffer,
    type_ids: &GpuBuffer,
    rows: usize,
    seq: usize,
    out: &GpuBuffer,
) -> Result<(), GpuError> {
    let h = t.hidden;
    let need = [
        ("ids", ids, rows),
        ("type_ids", type_ids, rows),
        ("word", t.word, t.vocab * h),
        ("position", t.position, t.positions * h),
        ("token_type", t.token_type, t.types * h),
        ("out", out, rows * h),
    ];
    for (name, b, n) in need {
        if b.len < n {
            return Err(GpuError::Shape(format!(
                "embeddings: {name} has {} < {n} elements",
                b.len
            )));
        }
    }
    if t.vocab == 0 || t.positions == 0 || t.types == 0 || seq == 0 {
        return Err(GpuError::Shape("embeddings: empty table or seq = 0".into()));
    }
    let kernel = ctx.pipeline("embeddings/gather", SOURCE, "gather", &[]);
    let params = ctx.uniform(&[
        rows as u32,
        seq as u32,
        h as u32,
        t.vocab as u32,
        t.positions as u32,
        t.types as u32,
        0,
        0,
    ]);
    ctx.dispatch(
        encoder,
        &kernel,
        &[
            params.as_entire_binding(),
            ids.binding(),
            type_ids.binding(),
            t.word.binding(),
            t.position.binding(),
            t.token_type.binding(),
            out.binding(),
        ],
        [
            h.div_ceil(64) as u32,
            rows.min(65_535) as u32,
            rows.div_ceil(65_535) as u32,
        ],
    );
    Ok(())
}
