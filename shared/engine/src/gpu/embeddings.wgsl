// BERT input embeddings for rows = batch·seq tokens, hidden size h:
//
//     out[row, k] = word[ids[row], k] + position[row % seq, k] + token_type[type_ids[row], k]
//
// Ids at or beyond their table's size are clamped to the last row (the launcher
// documents that ids must be in range). The following LayerNorm runs on
// layernorm.wgsl. One invocation per (row, k): x = k, y = row.

struct Params {
    rows: u32,
    seq: u32,
    h: u32,
    vocab: u32,
    positions: u32,
    types: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read> type_ids: array<u32>;
@group(0) @binding(3) var<storage, read> word: array<f32>;
@group(0) @binding(4) var<storage, read> position: array<f32>;
@group(0) @binding(5) var<storage, read> token_type: array<f32>;
@group(0) @binding(6) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn gather(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let row = gid.y + gid.z * 65535u;
    if k >= p.h || row >= p.rows {
        return;
    }
    let w = min(ids[row], p.vocab - 1u);
    let pos = min(row % p.seq, p.positions - 1u);
    let ty = min(type_ids[row], p.types - 1u);
    out[row * p.h + k] = word[w * p.h + k] + position[pos * p.h + k] + token_type[ty * p.h + k];
}
