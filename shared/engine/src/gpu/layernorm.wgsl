// LayerNorm over the last dimension (h) of `rows` rows, optionally of a sum with
// a residual (the BERT "add & norm"):
//
//     s     = x + residual            (residual optional)
//     mean  = Σ s / h,  var = Σ (s - mean)² / h,  rstd = 1 / sqrt(var + eps)
//     y     = (s - mean) · rstd · gamma + beta
//
// forward also stores (mean, rstd) per row in `stats` for the backward:
//
//     ŝ  = (s - mean) · rstd,  g = dy · gamma
//     ds = rstd · (g - mean(g) - ŝ · mean(g · ŝ))
//
// gamma and beta are frozen, so only the input gradient ds (= dx = dresidual) is
// computed.
//
// Two layouts of the same computation (RowLayout in context.rs):
// - `forward` / `backward`: one workgroup of 64 invocations per row, sums
//   reduced through workgroup memory; row = group x + y · groups x. For GPUs.
// - `forward_rows` / `backward_rows`: one invocation per row, which walks
//   its row alone; no workgroup memory, no barriers; row = global id x +
//   y · 8 · groups x. For CPU adapters, where every barrier is a coroutine
//   switch and every workgroup-memory access a per-lane loop (llvmpipe):
//   the 8 lanes of a SIMD vector then do 8 rows side by side.

struct Params {
    rows: u32,
    h: u32,
    eps: f32,
    _pad: u32,
}

// Whether a residual is added before the norm: a pipeline constant, so that
// the kernels compile without the branch (on llvmpipe both sides of a branch
// run under a mask, and their storage loads loop over the lanes either way).
override HAS_RESIDUAL: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> residual: array<f32>;
@group(0) @binding(3) var<storage, read> gamma: array<f32>;
@group(0) @binding(4) var<storage, read> beta: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
// stats[2 * row] = mean, stats[2 * row + 1] = rstd.
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
@group(0) @binding(7) var<storage, read> dy: array<f32>;
@group(0) @binding(8) var<storage, read_write> dx: array<f32>;

const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;
var<workgroup> red2: array<f32, 64>;

// Sums v over the workgroup (every invocation gets the total). Must be called
// in uniform control flow.
fn wg_sum(tid: u32, v: f32) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if tid < s {
            red[tid] += red[tid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

// Two sums at once (saves a round of barriers in the backward).
fn wg_sum2(tid: u32, v: vec2<f32>) -> vec2<f32> {
    red[tid] = v.x;
    red2[tid] = v.y;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if tid < s {
            red[tid] += red[tid + s];
            red2[tid] += red2[tid + s];
        }
        workgroupBarrier();
    }
    let total = vec2<f32>(red[0], red2[0]);
    workgroupBarrier();
    return total;
}

fn input(i: u32) -> f32 {
    if HAS_RESIDUAL {
        return x[i] + residual[i];
    }
    return x[i];
}

@compute @workgroup_size(64)
fn forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.h;
    var s = 0.0;
    for (var j = tid; j < p.h; j += WG) {
        s += input(base + j);
    }
    let mean = wg_sum(tid, s) / f32(p.h);
    var q = 0.0;
    for (var j = tid; j < p.h; j += WG) {
        let d = input(base + j) - mean;
        q += d * d;
    }
    let rstd = inverseSqrt(wg_sum(tid, q) / f32(p.h) + p.eps);
    for (var j = tid; j < p.h; j += WG) {
        y[base + j] = (input(base + j) - mean) * rstd * gamma[j] + beta[j];
    }
    if tid == 0u {
        stats[2u * row] = mean;
        stats[2u * row + 1u] = rstd;
    }
}

@compute @workgroup_size(64)
fn backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let row = wid.x + wid.y * nwg.x;
    if row >= p.rows {
        return;
    }
    let base = row * p.h;
    let mean = stats[2u * row];
    let rstd = stats[2u * row + 1u];
    var acc = vec2<f32>(0.0);
    for (var j = tid; j < p.h; j += WG) {
        let g = dy[base + j] * gamma[j];
        let xhat = (input(base + j) - mean) * rstd;
        acc += vec2<f32>(g, g * xhat);
    }
    let sums = wg_sum2(tid, acc) / f32(p.h);
    for (var j = tid; j < p.h; j += WG) {
        let g = dy[base + j] * gamma[j];
        let xhat = (input(base + j) - mean) * rstd;
        dx[base + j] = rstd * (g - sums.x - xhat * sums.y);
    }
}

const ROWS_PER_GROUP: u32 = 8u;

// (The row kernels read the parameters into locals before their loops: on
// llvmpipe a uniform load inside a loop is a gather over the lanes.)
@compute @workgroup_size(8)
fn forward_rows(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = gid.x + gid.y * nwg.x * ROWS_PER_GROUP;
    let h = p.h;
    let eps = p.eps;
    if row >= p.rows {
        return;
    }
    let base = row * h;
    var s = 0.0;
    for (var j = 0u; j < h; j++) {
        s += input(base + j);
    }
    let mean = s / f32(h);
    var q = 0.0;
    for (var j = 0u; j < h; j++) {
        let d = input(base + j) - mean;
        q += d * d;
    }
    let rstd = inverseSqrt(q / f32(h) + eps);
    for (var j = 0u; j < h; j++) {
        y[base + j] = (input(base + j) - mean) * rstd * gamma[j] + beta[j];
    }
    stats[2u * row] = mean;
    stats[2u * row + 1u] = rstd;
}

@compute @workgroup_size(8)
fn backward_rows(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let row = gid.x + gid.y * nwg.x * ROWS_PER_GROUP;
    let h = p.h;
    if row >= p.rows {
        return;
    }
    let base = row * h;
    let mean = stats[2u * row];
    let rstd = stats[2u * row + 1u];
    var acc = vec2<f32>(0.0);
    for (var j = 0u; j < h; j++) {
        let g = dy[base + j] * gamma[j];
        let xhat = (input(base + j) - mean) * rstd;
        acc += vec2<f32>(g, g * xhat);
    }
    let sums = acc / f32(h);
    for (var j = 0u; j < h; j++) {
        let g = dy[base + j] * gamma[j];
        let xhat = (input(base + j) - mean) * rstd;
        dx[base + j] = rstd * (g - sums.x - xhat * sums.y);
    }
}
