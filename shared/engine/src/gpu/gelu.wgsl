// prelude: gelu_common.wgsl
//
// (`gelu.rs` puts `gelu_common.wgsl` in front of this file: `gelu_and_slope`.)
//
// Exact GELU elementwise over n values, for a linear layer whose output is
// not final when its matrix product ends (a LoRA-SB branch still adds to
// it); otherwise the product's own epilogue does the same work (EPILOGUE in
// `matmul_common.wgsl`):
//
//     forward: y = gelu(x), and x is replaced by gelu'(x), the slope that
//              the backward pass needs (the pre-activation itself is not);
//     gate:    d = d · slope, the backward pass through GELU, in place.
//
// Invocation i handles element i; the grid may be 2-D (x·y groups) when n
// needs more than 65 535 workgroups.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// forward: the pre-activation in, its slope out.
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
// forward: gelu(x).
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
// gate: the slopes.
@group(0) @binding(3) var<storage, read> slope: array<f32>;
// gate: the gradient, multiplied in place.
@group(0) @binding(4) var<storage, read_write> d: array<f32>;

const WG: u32 = 256u;

fn index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG + lid;
}

@compute @workgroup_size(256)
fn forward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let g = gelu_and_slope(x[i]);
    y[i] = g.x;
    x[i] = g.y;
}

@compute @workgroup_size(256)
fn gate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    d[i] = d[i] * slope[i];
}
