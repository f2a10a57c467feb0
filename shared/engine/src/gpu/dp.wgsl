// DP-SGD clipping on per-sample gradients that stay on the device.
//
// The trained parameters are split into segments (every R, the head weight,
// the head bias); each segment's per-sample gradients lie in one buffer of
// `batch × len` values, sample n at [n·len, (n+1)·len).
//
// sq_norms:  norms[n] += Σ_j g[n·len + j]²       (one workgroup per sample,
//            dispatched once per segment, so norms ends as the squared joint
//            L2 norm of sample n over all segments)
// clip_sum:  out[offset + j] = (Σ_n g[n·len + j] · min(1, C/‖g_n‖) + noise[offset + j]) · scale
//            (one invocation per j; a zero norm keeps factor 1); with the
//            accumulate flag set (Params.accumulate ≠ 0) the value is added to
//            out[offset + j] instead, so a batch too large for one pass can be
//            clipped chunk by chunk into the same sum (later chunks with zero
//            noise).

struct Params {
    batch: u32,
    len: u32,
    offset: u32,
    clip: f32,
    scale: f32,
    // clip_sum: nonzero = add to out instead of overwriting it.
    accumulate: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> norms: array<f32>;
@group(0) @binding(3) var<storage, read> norms_in: array<f32>;
@group(0) @binding(4) var<storage, read> noise: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn sq_norms(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // Uniform control flow: every invocation of a group has the same n.
    let n = wid.x + wid.y * nwg.x;
    var s = 0.0;
    if n < p.batch {
        let base = n * p.len;
        for (var j = lid; j < p.len; j += 64u) {
            let x = g[base + j];
            s = fma(x, x, s);
        }
    }
    partial[lid] = s;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if lid < stride {
            partial[lid] += partial[lid + stride];
        }
        workgroupBarrier();
    }
    if lid == 0u && n < p.batch {
        norms[n] += partial[0];
    }
}

@compute @workgroup_size(256)
fn clip_sum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let j = (wid.x + wid.y * nwg.x) * 256u + lid;
    if j >= p.len {
        return;
    }
    var s = 0.0;
    for (var n = 0u; n < p.batch; n++) {
        let sq = norms_in[n];
        var factor = 1.0;
        if sq > 0.0 {
            factor = min(1.0, p.clip / sqrt(sq));
        }
        s = fma(g[n * p.len + j], factor, s);
    }
    let v = (s + noise[p.offset + j]) * p.scale;
    if p.accumulate != 0u {
        out[p.offset + j] += v;
    } else {
        out[p.offset + j] = v;
    }
}
