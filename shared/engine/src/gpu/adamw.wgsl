// AdamW (decoupled weight decay, as torch.optim.AdamW) on a flat parameter buffer:
//
//     param ← param · (1 - lr · weight_decay)
//     m     ← β1 · m + (1 - β1) · g
//     v     ← β2 · v + (1 - β2) · g²
//     param ← param - (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps)
//
// with bias corrections bc1 = 1 - β1^step, bc2 = 1 - β2^step computed on the CPU
// in f64. Elements from `split` on (the classification head) use `lr2` instead
// of `lr`, in the decay as in the step, as a second torch parameter group
// would. One invocation per element; the grid may be 2-D for large n.

struct Params {
    n: u32,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    weight_decay: f32,
    bc1: f32,
    bc2: f32,
    split: u32,
    lr2: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> param: array<f32>;
@group(0) @binding(3) var<storage, read_write> m: array<f32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;

@compute @workgroup_size(256)
fn step(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    if i >= p.n {
        return;
    }
    let g = grad[i];
    let m1 = p.beta1 * m[i] + (1.0 - p.beta1) * g;
    let v1 = p.beta2 * v[i] + (1.0 - p.beta2) * g * g;
    m[i] = m1;
    v[i] = v1;
    let lr = select(p.lr, p.lr2, i >= p.split);
    let decayed = param[i] * (1.0 - lr * p.weight_decay);
    param[i] = decayed - (lr / p.bc1) * m1 / (sqrt(v1) / sqrt(p.bc2) + p.eps);
}
