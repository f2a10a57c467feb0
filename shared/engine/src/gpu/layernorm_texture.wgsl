// LayerNorm's row kernels (`forward_rows`, `backward_rows` in
// `layernorm.wgsl`: one invocation per row, 8 rows per workgroup, the same
// computation and results up to rounding) reading their rows from
// rgba32float read-only storage textures instead of storage buffers, and
// writing 4 floats per store (RowLayout::Texture in context.rs; natively on
// CPU adapters only, with h a multiple of 64).
//
// Why: Mesa 22.3's llvmpipe compiles a storage-buffer load into a loop over
// the 8 SIMD lanes with a branch per lane (each lane's row is elsewhere),
// but an image load into one branch-free gather of 8 × 16 bytes: a quarter
// of the loads, each without the per-lane loop (the texture matmul's reason,
// `matmul_texture.wgsl`). The launcher copies x, the residual, dy, gamma and
// beta into textures right before the dispatch (copy_buffer_to_texture, one
// texel = 4 consecutive floats of a row; gamma and beta are one row each).
// A separate file from `layernorm.wgsl` so that the browser, which runs the
// other entry points, never compiles read-only storage textures.
//
//     s = x + residual (HAS_RESIDUAL),  y = (s - mean) · rstd · gamma + beta
//     ds = rstd · (g - mean(g) - ŝ · mean(g · ŝ)),  g = dy · gamma

struct Params {
    rows: u32,
    h: u32,
    eps: f32,
    _pad: u32,
}

override HAS_RESIDUAL: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
// stats[2 * row] = mean, stats[2 * row + 1] = rstd.
@group(0) @binding(6) var<storage, read_write> stats: array<f32>;
@group(0) @binding(9) var xt: texture_storage_2d<rgba32float, read>;
@group(0) @binding(10) var rt: texture_storage_2d<rgba32float, read>;
@group(0) @binding(11) var gammat: texture_storage_2d<rgba32float, read>;
@group(0) @binding(12) var betat: texture_storage_2d<rgba32float, read>;
@group(0) @binding(13) var dyt: texture_storage_2d<rgba32float, read>;
@group(0) @binding(14) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read_write> dx4: array<vec4<f32>>;

const ROWS_PER_GROUP: u32 = 8u;

// Floats 4j .. 4j+3 of row `row` of x (+ residual).
fn input4(j: i32, row: i32) -> vec4<f32> {
    let v = textureLoad(xt, vec2<i32>(j, row));
    if HAS_RESIDUAL {
        return v + textureLoad(rt, vec2<i32>(j, row));
    }
    return v;
}

fn hsum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// (The parameters are read into locals before the loops: on llvmpipe a
// uniform load inside a loop is a gather over the lanes.)
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
    let r = i32(row);
    let h4 = i32(h / 4u);
    var s = vec4<f32>(0.0);
    for (var j = 0; j < h4; j++) {
        s += input4(j, r);
    }
    let mean = hsum(s) / f32(h);
    var q = vec4<f32>(0.0);
    for (var j = 0; j < h4; j++) {
        let d = input4(j, r) - mean;
        q += d * d;
    }
    let rstd = inverseSqrt(hsum(q) / f32(h) + eps);
    let base = row * u32(h4);
    for (var j = 0; j < h4; j++) {
        let g = textureLoad(gammat, vec2<i32>(j, 0));
        let b = textureLoad(betat, vec2<i32>(j, 0));
        y4[base + u32(j)] = (input4(j, r) - mean) * rstd * g + b;
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
    let r = i32(row);
    let h4 = i32(h / 4u);
    let mean = stats[2u * row];
    let rstd = stats[2u * row + 1u];
    var acc_g = vec4<f32>(0.0);
    var acc_gx = vec4<f32>(0.0);
    for (var j = 0; j < h4; j++) {
        let g = textureLoad(dyt, vec2<i32>(j, r)) * textureLoad(gammat, vec2<i32>(j, 0));
        let xhat = (input4(j, r) - mean) * rstd;
        acc_g += g;
        acc_gx += g * xhat;
    }
    let mean_g = hsum(acc_g) / f32(h);
    let mean_gx = hsum(acc_gx) / f32(h);
    let base = row * u32(h4);
    for (var j = 0; j < h4; j++) {
        let g = textureLoad(dyt, vec2<i32>(j, r)) * textureLoad(gammat, vec2<i32>(j, 0));
        let xhat = (input4(j, r) - mean) * rstd;
        dx4[base + u32(j)] = rstd * (g - mean_g - xhat * mean_gx);
    }
}
