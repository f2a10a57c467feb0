// Row softmax of attention scores with a key padding mask, and its backward.
//
// Scores and probabilities are [batch, heads, seq, seq]; row = (b·heads + h)·seq + i
// holds query i's scores over keys j. key_mask[b·seq + j] = 0 marks padding keys:
//
//     forward:  P[row, j] = exp(S[row, j] - max) / Σ_valid exp(S[row, k] - max)
//               for valid j, 0 for padding j (in place: S is overwritten by P).
//     backward: dS[row, j] = scale · P[row, j] · (dP[row, j] - Σ_k P[row, k] · dP[row, k])
//               (in place: dP is overwritten by dS; scale = 1/sqrt(head_dim) so dS is
//               the gradient of the unscaled Q·Kᵀ).
//
// The products Q·Kᵀ, P·V, dCtx·Vᵀ, Pᵀ·dCtx, dS·K and dSᵀ·Q run on matmul.wgsl.
// Two layouts (RowLayout in context.rs): `softmax_forward` / `softmax_backward`
// use one workgroup of 64 invocations per row (row = group x + y · groups x),
// for GPUs; `softmax_forward_rows` / `softmax_backward_rows` one invocation
// per row without workgroup memory or barriers (row = global id x + y · 8 ·
// groups x), for CPU adapters (see layernorm.wgsl).

struct Params {
    rows: u32,
    seq: u32,
    heads: u32,
    scale: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> key_mask: array<u32>;
// forward: S in, P out. backward: P in.
@group(0) @binding(2) var<storage, read_write> probs: array<f32>;
// backward: dP in, dS out.
@group(0) @binding(3) var<storage, read_write> grad: array<f32>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;

fn wg_reduce(tid: u32, v: f32, is_max: bool) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if tid < s {
            if is_max {
                red[tid] = max(red[tid], red[tid + s]);
            } else {
                red[tid] += red[tid + s];
            }
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

fn valid(row: u32, j: u32) -> bool {
    let b = row / (p.heads * p.seq);
    return key_mask[b * p.seq + j] != 0u;
}

@compute @workgroup_size(64)
fn softmax_forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.seq;
    var m = -3.0e38;
    for (var j = tid; j < p.seq; j += WG) {
        if valid(row, j) {
            m = max(m, probs[base + j]);
        }
    }
    m = wg_reduce(tid, m, true);
    var s = 0.0;
    for (var j = tid; j < p.seq; j += WG) {
        if valid(row, j) {
            s += exp(probs[base + j] - m);
        }
    }
    s = wg_reduce(tid, s, false);
    // A row with no valid key gets all zeros instead of NaN.
    let inv = select(0.0, 1.0 / s, s > 0.0);
    for (var j = tid; j < p.seq; j += WG) {
        var v = 0.0;
        if valid(row, j) {
            v = exp(probs[base + j] - m) * inv;
        }
        probs[base + j] = v;
    }
}

@compute @workgroup_size(64)
fn softmax_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.seq;
    var s = 0.0;
    for (var j = tid; j < p.seq; j += WG) {
        s += probs[base + j] * grad[base + j];
    }
    s = wg_reduce(tid, s, false);
    for (var j = tid; j < p.seq; j += WG) {
        grad[base + j] = p.scale * probs[base + j] * (grad[base + j] - s);
    }
}

const ROWS_PER_GROUP: u32 = 8u;

@compute @workgroup_size(8)
fn softmax_forward_rows(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = gid.x + gid.y * nwg.x * ROWS_PER_GROUP;
    if row >= p.rows {
        return;
    }
    let base = row * p.seq;
    let mask_base = row / (p.heads * p.seq) * p.seq;
    // Running max and the sum of exp(S - max) in one pass.
    var m = -3.0e38;
    var s = 0.0;
    for (var j = 0u; j < p.seq; j++) {
        if key_mask[mask_base + j] != 0u {
            let v = probs[base + j];
            let m_new = max(m, v);
            s = s * exp(m - m_new) + exp(v - m_new);
            m = m_new;
        }
    }
    // A row with no valid key gets all zeros instead of NaN.
    let inv = select(0.0, 1.0 / s, s > 0.0);
    for (var j = 0u; j < p.seq; j++) {
        var v = 0.0;
        if key_mask[mask_base + j] != 0u {
            v = exp(probs[base + j] - m) * inv;
        }
        probs[base + j] = v;
    }
}

@compute @workgroup_size(8)
fn softmax_backward_rows(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = gid.x + gid.y * nwg.x * ROWS_PER_GROUP;
    if row >= p.rows {
        return;
    }
    let base = row * p.seq;
    var s = 0.0;
    for (var j = 0u; j < p.seq; j++) {
        s += probs[base + j] * grad[base + j];
    }
    for (var j = 0u; j < p.seq; j++) {
        grad[base + j] = p.scale * probs[base + j] * (grad[base + j] - s);
    }
}
