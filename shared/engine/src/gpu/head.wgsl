// Sentence-classification head pieces (hidden size h, classes c, batch b, seq t):
//
// mean_pool_forward:  pooled[n, k] = Σ_{t valid} X[n, t, k] / count_n,
//                     count_n = number of valid tokens (mask[n·seq + t] != 0), at least 1.
// mean_pool_backward: dX[n, t, k] = dpooled[n, k] / count_n for valid t, else 0.
// softmax_xent:       p = softmax(logits[n]), loss[n] = -log p[label_n],
//                     dlogits[n] = scale · (p - onehot(label_n)).
// head_grad:          per-sample head gradients dW[n, c, k] = dlogits[n, c] · pooled[n, k],
//                     db[n, c] = dlogits[n, c].
//
// logits = pooled·Wᵀ + b itself runs on matmul.wgsl.

struct Params {
    batch: u32,
    seq: u32,
    h: u32,
    classes: u32,
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> mask: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> pooled: array<f32>;
@group(0) @binding(4) var<storage, read> dpooled: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(6) var<storage, read> logits: array<f32>;
@group(0) @binding(7) var<storage, read> labels: array<u32>;
@group(0) @binding(8) var<storage, read_write> loss: array<f32>;
@group(0) @binding(9) var<storage, read_write> dlogits: array<f32>;
@group(0) @binding(10) var<storage, read_write> dw: array<f32>;
@group(0) @binding(11) var<storage, read_write> db: array<f32>;

fn count(n: u32) -> f32 {
    var c = 0u;
    for (var t = 0u; t < p.seq; t++) {
        c += select(0u, 1u, mask[n * p.seq + t] != 0u);
    }
    return f32(max(c, 1u));
}

// One invocation per (n, k): x = k, y = n.
@compute @workgroup_size(64)
fn mean_pool_forward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let n = gid.y;
    if k >= p.h || n >= p.batch {
        return;
    }
    var s = 0.0;
    for (var t = 0u; t < p.seq; t++) {
        if mask[n * p.seq + t] != 0u {
            s += x[(n * p.seq + t) * p.h + k];
        }
    }
    pooled[n * p.h + k] = s / count(n);
}

// One invocation per (n, k): x = k, y = n, writing column k of sample n's
// seq rows. (One invocation per output counted sample n's valid tokens once
// per output, seq loads each: on lavapipe, where every storage load is a loop
// over the SIMD lanes, that took 38 ms for batch 32 × seq 64 × 384.)
@compute @workgroup_size(64)
fn mean_pool_backward(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let n = gid.y;
    if k >= p.h || n >= p.batch {
        return;
    }
    let g = dpooled[n * p.h + k] / count(n);
    for (var t = 0u; t < p.seq; t++) {
        let row = n * p.seq + t;
        dx[row * p.h + k] = select(0.0, g, mask[row] != 0u);
    }
}

// One invocation per sample.
@compute @workgroup_size(64)
fn softmax_xent(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n = gid.x;
    if n >= p.batch {
        return;
    }
    let base = n * p.classes;
    var mx = -3.0e38;
    for (var c = 0u; c < p.classes; c++) {
        mx = max(mx, logits[base + c]);
    }
    var s = 0.0;
    for (var c = 0u; c < p.classes; c++) {
        s += exp(logits[base + c] - mx);
    }
    let label = labels[n];
    let lse = mx + log(s);
    loss[n] = lse - logits[base + min(label, p.classes - 1u)];
    for (var c = 0u; c < p.classes; c++) {
        let prob = exp(logits[base + c] - lse);
        dlogits[base + c] = p.scale * (prob - select(0.0, 1.0, c == label));
    }
}

// One invocation per (c, k) of sample n: x = k, y = n·classes + c.
@compute @workgroup_size(64)
fn head_grad(@builtin(global_invocation_id) gid: vec3<u32>) {
    let k = gid.x;
    let nc = gid.y;
    if k >= p.h || nc >= p.batch * p.classes {
        return;
    }
    let n = nc / p.classes;
    let g = dlogits[nc];
    dw[nc * p.h + k] = g * pooled[n * p.h + k];
    if k == 0u {
        db[nc] = g;
    }
}
