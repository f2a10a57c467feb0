// Exact (erf-based) GELU, elementwise over n values:
//
//     forward:  y  = x · Φ(x),               Φ(x) = (1 + erf(x / √2)) / 2
//     backward: dx = dy · (Φ(x) + x · φ(x)),  φ(x) = exp(-x² / 2) / √(2π)
//
// erf uses Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7), the same
// accuracy class as f32 itself. Invocation i handles element i; the grid may be
// 2-D (x·y groups) when n needs more than 65 535 workgroups.

struct Params {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
// backward only: dy.
@group(0) @binding(2) var<storage, read> dy: array<f32>;
// forward: y; backward: dx.
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

const WG: u32 = 256u;
const INV_SQRT2: f32 = 0.70710678118654752;
const INV_SQRT_2PI: f32 = 0.39894228040143268;

fn erf_approx(z: f32) -> f32 {
    let s = sign(z);
    let a = abs(z);
    let t = 1.0 / (1.0 + 0.3275911 * a);
    let poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))));
    return s * (1.0 - poly * exp(-a * a));
}

fn cdf(v: f32) -> f32 {
    return 0.5 * (1.0 + erf_approx(v * INV_SQRT2));
}

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
    let v = x[i];
    out[i] = v * cdf(v);
}

@compute @workgroup_size(256)
fn backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = index(wid, nwg, lid);
    if i >= p.n {
        return;
    }
    let v = x[i];
    let pdf = INV_SQRT_2PI * exp(-0.5 * v * v);
    out[i] = dy[i] * (cdf(v) + v * pdf);
}
