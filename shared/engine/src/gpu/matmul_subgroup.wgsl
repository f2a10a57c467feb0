// enable subgroups;
//
// (The directive is a comment here: naga 30, wgpu 30's WGSL front end, refuses
// `enable subgroups;` as "not yet supported" (gfx-rs/wgpu#5555) and instead
// allows subgroup built-ins only on a device with wgpu::Features::SUBGROUP. The
// launcher prepends the real directive for the browser's WebGPU, whose WGSL
// compiler requires it.)
//
// Subgroup variant of the matrix multiply in `matmul.wgsl` (same parameters,
// same result):
//
//     C[M, N] = alpha * op(A)[M, K] · op(B)[K, N]  (+ bias[N])  (+ C if accumulate)
//
// op(A) is A (stored M×K, row stride lda) or, with TRANS_A, Aᵀ (A stored K×M);
// op(B) is B (stored K×N) or, with TRANS_B, Bᵀ (B stored N×K). Batches:
// workgroup_id.z = outer * batch_inner + inner, every matrix starting at
// off + outer * bs0 + inner * bs1 (elements).
//
// A separate module because subgroup built-ins make the whole module need
// wgpu::Features::SUBGROUP (wgpu validates a module as a whole). The launcher
// (`matmul.rs`, Variant::Subgroup) only compiles it when the device has that
// feature and a fixed subgroup size of 8 (min = max = 8; lavapipe/llvmpipe: the
// 8-lane SIMD vector): the workgroup of 8 invocations must be one whole
// subgroup, or the broadcasts would read lanes that do not exist.
//
// Preconditions (as for `main_direct`, checked by Gemm::vec4_aligned): K, the
// stored row lengths of A and B, lda, ldb, the offsets and batch strides of A
// and B are multiples of 4, so A and B are read as vec4 along their stored rows.
//
// One workgroup = one subgroup of 8 lanes computes a 32×32 tile of C; lane l
// owns its 32 rows × columns 4l .. 4l+3 (32 vec4 accumulators). Per 4 k the 32
// rows of op(A) are loaded once per subgroup, each lane loading 4 of the 32
// vec4 pieces (instead of all 32 as every lane would alone), and handed to all
// lanes with subgroupBroadcast (a register shuffle on llvmpipe, whose storage
// loads are per-lane scalar loops); B is read per lane (4 vec4 loads). So 8
// vec4 loads feed 512 FMAs per lane, against 24 for 576 in `main_direct`.
// Edge rows and columns are clamped (not masked) in the K loop and skipped when
// storing; the K loop branches only on the override constants, so the
// broadcasts are in uniform control flow.
//
// Fully unrolled (32 rows × 4 columns per lane): the lanes' loads, broadcasts
// and accumulators are named values, never arrays (llvmpipe lowers array
// locals to memory).

struct Params {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    batch_inner: u32,
    a_bs0: u32,
    a_bs1: u32,
    b_bs0: u32,
    b_bs1: u32,
    c_bs0: u32,
    c_bs1: u32,
    alpha: f32,
    accumulate: u32,
    has_bias: u32,
    _pad: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> b4: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// Writes 4 consecutive outputs of row `row` from column `col` with scale, bias
// and accumulate, skipping those outside C.
fn store4(c_base: u32, row: u32, col: u32, v: vec4<f32>) {
    if row >= p.m { return; }
    for (var j = 0u; j < 4u; j++) {
        if col + j < p.n {
            var x = p.alpha * v[j];
            if p.has_bias != 0u { x += bias[col + j]; }
            let idx = c_base + row * p.ldc + col + j;
            if p.accumulate != 0u { x += c[idx]; }
            c[idx] = x;
        }
    }
}

@compute @workgroup_size(8, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(subgroup_invocation_id) l: u32) {
    let outer_b = wid.z / p.batch_inner;
    let inner_b = wid.z % p.batch_inner;
    // A and B indices in vec4 units.
    let a_base = (p.a_off + outer_b * p.a_bs0 + inner_b * p.a_bs1) / 4u;
    let b_base = (p.b_off + outer_b * p.b_bs0 + inner_b * p.b_bs1) / 4u;
    let c_base = p.c_off + outer_b * p.c_bs0 + inner_b * p.c_bs1;
    let lda4 = p.lda / 4u;
    let ldb4 = p.ldb / 4u;
    let m0 = wid.y * 32u; // first row of the tile
    let c0 = wid.x * 32u + l * 4u; // first column of this lane

    // What this lane loads of A per 4 k (clamped), in vec4 units:
    // ra_t: row m0 + l + 8t of the stored A at k = 4kq .. 4kq+3 (row i of the tile
    //       is lane i % 8's ra_{i / 8});
    // ca_t (TRANS_A): rows m0 + 4(l/4 + 2t) .. +3 of op(A) at k = 4kq + l % 4 (quad Q
    //       of the tile at k = 4kq + kk is lane kk + 4(Q % 2)'s ca_{Q / 2}).
    let ra0 = a_base + min(m0 + l + 0u, p.m - 1u) * lda4;
    let ra1 = a_base + min(m0 + l + 8u, p.m - 1u) * lda4;
    let ra2 = a_base + min(m0 + l + 16u, p.m - 1u) * lda4;
    let ra3 = a_base + min(m0 + l + 24u, p.m - 1u) * lda4;
    let ca0 = a_base + (l % 4u) * lda4 + min(m0 / 4u + l / 4u + 0u, p.m / 4u - 1u);
    let ca1 = a_base + (l % 4u) * lda4 + min(m0 / 4u + l / 4u + 2u, p.m / 4u - 1u);
    let ca2 = a_base + (l % 4u) * lda4 + min(m0 / 4u + l / 4u + 4u, p.m / 4u - 1u);
    let ca3 = a_base + (l % 4u) * lda4 + min(m0 / 4u + l / 4u + 6u, p.m / 4u - 1u);
    // B: this lane's columns c0 .. c0+3 as one n-quad, or (TRANS_B) stored rows.
    let rb0 = b_base + min(c0 + 0u, p.n - 1u) * ldb4;
    let rb1 = b_base + min(c0 + 1u, p.n - 1u) * ldb4;
    let rb2 = b_base + min(c0 + 2u, p.n - 1u) * ldb4;
    let rb3 = b_base + min(c0 + 3u, p.n - 1u) * ldb4;
    let cb0 = b_base + min(c0 / 4u, p.n / 4u - 1u);

    // accI = row I, columns c0 .. c0+3.
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    var acc4 = vec4<f32>(0.0);
    var acc5 = vec4<f32>(0.0);
    var acc6 = vec4<f32>(0.0);
    var acc7 = vec4<f32>(0.0);
    var acc8 = vec4<f32>(0.0);
    var acc9 = vec4<f32>(0.0);
    var acc10 = vec4<f32>(0.0);
    var acc11 = vec4<f32>(0.0);
    var acc12 = vec4<f32>(0.0);
    var acc13 = vec4<f32>(0.0);
    var acc14 = vec4<f32>(0.0);
    var acc15 = vec4<f32>(0.0);
    var acc16 = vec4<f32>(0.0);
    var acc17 = vec4<f32>(0.0);
    var acc18 = vec4<f32>(0.0);
    var acc19 = vec4<f32>(0.0);
    var acc20 = vec4<f32>(0.0);
    var acc21 = vec4<f32>(0.0);
    var acc22 = vec4<f32>(0.0);
    var acc23 = vec4<f32>(0.0);
    var acc24 = vec4<f32>(0.0);
    var acc25 = vec4<f32>(0.0);
    var acc26 = vec4<f32>(0.0);
    var acc27 = vec4<f32>(0.0);
    var acc28 = vec4<f32>(0.0);
    var acc29 = vec4<f32>(0.0);
    var acc30 = vec4<f32>(0.0);
    var acc31 = vec4<f32>(0.0);
    for (var kq = 0u; kq < p.k / 4u; kq++) {
        var av0: vec4<f32>;
        var av1: vec4<f32>;
        var av2: vec4<f32>;
        var av3: vec4<f32>;
        if TRANS_A {
            let k0 = 4u * kq * lda4;
            av0 = a4[ca0 + k0];
            av1 = a4[ca1 + k0];
            av2 = a4[ca2 + k0];
            av3 = a4[ca3 + k0];
        } else {
            av0 = a4[ra0 + kq];
            av1 = a4[ra1 + kq];
            av2 = a4[ra2 + kq];
            av3 = a4[ra3 + kq];
        }
        // bK = row 4kq + K of op(B), columns c0 .. c0+3.
        var b0: vec4<f32>;
        var b1: vec4<f32>;
        var b2: vec4<f32>;
        var b3: vec4<f32>;
        if TRANS_B {
            let y0 = b4[rb0 + kq];
            let y1 = b4[rb1 + kq];
            let y2 = b4[rb2 + kq];
            let y3 = b4[rb3 + kq];
            b0 = vec4<f32>(y0.x, y1.x, y2.x, y3.x);
            b1 = vec4<f32>(y0.y, y1.y, y2.y, y3.y);
            b2 = vec4<f32>(y0.z, y1.z, y2.z, y3.z);
            b3 = vec4<f32>(y0.w, y1.w, y2.w, y3.w);
        } else {
            let k0 = 4u * kq * ldb4;
            b0 = b4[cb0 + k0];
            b1 = b4[cb0 + k0 + 1u * ldb4];
            b2 = b4[cb0 + k0 + 2u * ldb4];
            b3 = b4[cb0 + k0 + 3u * ldb4];
        }
        if TRANS_A {
            // sK_Q = rows 4Q .. 4Q+3 of the tile at k = 4kq + K.
            let s0_0 = subgroupBroadcast(av0, 0u);
            acc0 = fma(vec4<f32>(s0_0.x), b0, acc0);
            acc1 = fma(vec4<f32>(s0_0.y), b0, acc1);
            acc2 = fma(vec4<f32>(s0_0.z), b0, acc2);
            acc3 = fma(vec4<f32>(s0_0.w), b0, acc3);
            let s0_1 = subgroupBroadcast(av0, 4u);
            acc4 = fma(vec4<f32>(s0_1.x), b0, acc4);
            acc5 = fma(vec4<f32>(s0_1.y), b0, acc5);
            acc6 = fma(vec4<f32>(s0_1.z), b0, acc6);
            acc7 = fma(vec4<f32>(s0_1.w), b0, acc7);
            let s0_2 = subgroupBroadcast(av1, 0u);
            acc8 = fma(vec4<f32>(s0_2.x), b0, acc8);
            acc9 = fma(vec4<f32>(s0_2.y), b0, acc9);
            acc10 = fma(vec4<f32>(s0_2.z), b0, acc10);
            acc11 = fma(vec4<f32>(s0_2.w), b0, acc11);
            let s0_3 = subgroupBroadcast(av1, 4u);
            acc12 = fma(vec4<f32>(s0_3.x), b0, acc12);
            acc13 = fma(vec4<f32>(s0_3.y), b0, acc13);
            acc14 = fma(vec4<f32>(s0_3.z), b0, acc14);
            acc15 = fma(vec4<f32>(s0_3.w), b0, acc15);
            let s0_4 = subgroupBroadcast(av2, 0u);
            acc16 = fma(vec4<f32>(s0_4.x), b0, acc16);
            acc17 = fma(vec4<f32>(s0_4.y), b0, acc17);
            acc18 = fma(vec4<f32>(s0_4.z), b0, acc18);
            acc19 = fma(vec4<f32>(s0_4.w), b0, acc19);
            let s0_5 = subgroupBroadcast(av2, 4u);
            acc20 = fma(vec4<f32>(s0_5.x), b0, acc20);
            acc21 = fma(vec4<f32>(s0_5.y), b0, acc21);
            acc22 = fma(vec4<f32>(s0_5.z), b0, acc22);
            acc23 = fma(vec4<f32>(s0_5.w), b0, acc23);
            let s0_6 = subgroupBroadcast(av3, 0u);
            acc24 = fma(vec4<f32>(s0_6.x), b0, acc24);
            acc25 = fma(vec4<f32>(s0_6.y), b0, acc25);
            acc26 = fma(vec4<f32>(s0_6.z), b0, acc26);
            acc27 = fma(vec4<f32>(s0_6.w), b0, acc27);
            let s0_7 = subgroupBroadcast(av3, 4u);
            acc28 = fma(vec4<f32>(s0_7.x), b0, acc28);
            acc29 = fma(vec4<f32>(s0_7.y), b0, acc29);
            acc30 = fma(vec4<f32>(s0_7.z), b0, acc30);
            acc31 = fma(vec4<f32>(s0_7.w), b0, acc31);
            let s1_0 = subgroupBroadcast(av0, 1u);
            acc0 = fma(vec4<f32>(s1_0.x), b1, acc0);
            acc1 = fma(vec4<f32>(s1_0.y), b1, acc1);
            acc2 = fma(vec4<f32>(s1_0.z), b1, acc2);
            acc3 = fma(vec4<f32>(s1_0.w), b1, acc3);
            let s1_1 = subgroupBroadcast(av0, 5u);
            acc4 = fma(vec4<f32>(s1_1.x), b1, acc4);
            acc5 = fma(vec4<f32>(s1_1.y), b1, acc5);
            acc6 = fma(vec4<f32>(s1_1.z), b1, acc6);
            acc7 = fma(vec4<f32>(s1_1.w), b1, acc7);
            let s1_2 = subgroupBroadcast(av1, 1u);
            acc8 = fma(vec4<f32>(s1_2.x), b1, acc8);
            acc9 = fma(vec4<f32>(s1_2.y), b1, acc9);
            acc10 = fma(vec4<f32>(s1_2.z), b1, acc10);
            acc11 = fma(vec4<f32>(s1_2.w), b1, acc11);
            let s1_3 = subgroupBroadcast(av1, 5u);
            acc12 = fma(vec4<f32>(s1_3.x), b1, acc12);
            acc13 = fma(vec4<f32>(s1_3.y), b1, acc13);
            acc14 = fma(vec4<f32>(s1_3.z), b1, acc14);
            acc15 = fma(vec4<f32>(s1_3.w), b1, acc15);
            let s1_4 = subgroupBroadcast(av2, 1u);
            acc16 = fma(vec4<f32>(s1_4.x), b1, acc16);
            acc17 = fma(vec4<f32>(s1_4.y), b1, acc17);
            acc18 = fma(vec4<f32>(s1_4.z), b1, acc18);
            acc19 = fma(vec4<f32>(s1_4.w), b1, acc19);
            let s1_5 = subgroupBroadcast(av2, 5u);
            acc20 = fma(vec4<f32>(s1_5.x), b1, acc20);
            acc21 = fma(vec4<f32>(s1_5.y), b1, acc21);
            acc22 = fma(vec4<f32>(s1_5.z), b1, acc22);
            acc23 = fma(vec4<f32>(s1_5.w), b1, acc23);
            let s1_6 = subgroupBroadcast(av3, 1u);
            acc24 = fma(vec4<f32>(s1_6.x), b1, acc24);
            acc25 = fma(vec4<f32>(s1_6.y), b1, acc25);
            acc26 = fma(vec4<f32>(s1_6.z), b1, acc26);
            acc27 = fma(vec4<f32>(s1_6.w), b1, acc27);
            let s1_7 = subgroupBroadcast(av3, 5u);
            acc28 = fma(vec4<f32>(s1_7.x), b1, acc28);
            acc29 = fma(vec4<f32>(s1_7.y), b1, acc29);
            acc30 = fma(vec4<f32>(s1_7.z), b1, acc30);
            acc31 = fma(vec4<f32>(s1_7.w), b1, acc31);
            let s2_0 = subgroupBroadcast(av0, 2u);
            acc0 = fma(vec4<f32>(s2_0.x), b2, acc0);
            acc1 = fma(vec4<f32>(s2_0.y), b2, acc1);
            acc2 = fma(vec4<f32>(s2_0.z), b2, acc2);
            acc3 = fma(vec4<f32>(s2_0.w), b2, acc3);
            let s2_1 = subgroupBroadcast(av0, 6u);
            acc4 = fma(vec4<f32>(s2_1.x), b2, acc4);
            acc5 = fma(vec4<f32>(s2_1.y), b2, acc5);
            acc6 = fma(vec4<f32>(s2_1.z), b2, acc6);
            acc7 = fma(vec4<f32>(s2_1.w), b2, acc7);
            let s2_2 = subgroupBroadcast(av1, 2u);
            acc8 = fma(vec4<f32>(s2_2.x), b2, acc8);
            acc9 = fma(vec4<f32>(s2_2.y), b2, acc9);
            acc10 = fma(vec4<f32>(s2_2.z), b2, acc10);
            acc11 = fma(vec4<f32>(s2_2.w), b2, acc11);
            let s2_3 = subgroupBroadcast(av1, 6u);
            acc12 = fma(vec4<f32>(s2_3.x), b2, acc12);
            acc13 = fma(vec4<f32>(s2_3.y), b2, acc13);
            acc14 = fma(vec4<f32>(s2_3.z), b2, acc14);
            acc15 = fma(vec4<f32>(s2_3.w), b2, acc15);
            let s2_4 = subgroupBroadcast(av2, 2u);
            acc16 = fma(vec4<f32>(s2_4.x), b2, acc16);
            acc17 = fma(vec4<f32>(s2_4.y), b2, acc17);
            acc18 = fma(vec4<f32>(s2_4.z), b2, acc18);
            acc19 = fma(vec4<f32>(s2_4.w), b2, acc19);
            let s2_5 = subgroupBroadcast(av2, 6u);
            acc20 = fma(vec4<f32>(s2_5.x), b2, acc20);
            acc21 = fma(vec4<f32>(s2_5.y), b2, acc21);
            acc22 = fma(vec4<f32>(s2_5.z), b2, acc22);
            acc23 = fma(vec4<f32>(s2_5.w), b2, acc23);
            let s2_6 = subgroupBroadcast(av3, 2u);
            acc24 = fma(vec4<f32>(s2_6.x), b2, acc24);
            acc25 = fma(vec4<f32>(s2_6.y), b2, acc25);
            acc26 = fma(vec4<f32>(s2_6.z), b2, acc26);
            acc27 = fma(vec4<f32>(s2_6.w), b2, acc27);
            let s2_7 = subgroupBroadcast(av3, 6u);
            acc28 = fma(vec4<f32>(s2_7.x), b2, acc28);
            acc29 = fma(vec4<f32>(s2_7.y), b2, acc29);
            acc30 = fma(vec4<f32>(s2_7.z), b2, acc30);
            acc31 = fma(vec4<f32>(s2_7.w), b2, acc31);
            let s3_0 = subgroupBroadcast(av0, 3u);
            acc0 = fma(vec4<f32>(s3_0.x), b3, acc0);
            acc1 = fma(vec4<f32>(s3_0.y), b3, acc1);
            acc2 = fma(vec4<f32>(s3_0.z), b3, acc2);
            acc3 = fma(vec4<f32>(s3_0.w), b3, acc3);
            let s3_1 = subgroupBroadcast(av0, 7u);
            acc4 = fma(vec4<f32>(s3_1.x), b3, acc4);
            acc5 = fma(vec4<f32>(s3_1.y), b3, acc5);
            acc6 = fma(vec4<f32>(s3_1.z), b3, acc6);
            acc7 = fma(vec4<f32>(s3_1.w), b3, acc7);
            let s3_2 = subgroupBroadcast(av1, 3u);
            acc8 = fma(vec4<f32>(s3_2.x), b3, acc8);
            acc9 = fma(vec4<f32>(s3_2.y), b3, acc9);
            acc10 = fma(vec4<f32>(s3_2.z), b3, acc10);
            acc11 = fma(vec4<f32>(s3_2.w), b3, acc11);
            let s3_3 = subgroupBroadcast(av1, 7u);
            acc12 = fma(vec4<f32>(s3_3.x), b3, acc12);
            acc13 = fma(vec4<f32>(s3_3.y), b3, acc13);
            acc14 = fma(vec4<f32>(s3_3.z), b3, acc14);
            acc15 = fma(vec4<f32>(s3_3.w), b3, acc15);
            let s3_4 = subgroupBroadcast(av2, 3u);
            acc16 = fma(vec4<f32>(s3_4.x), b3, acc16);
            acc17 = fma(vec4<f32>(s3_4.y), b3, acc17);
            acc18 = fma(vec4<f32>(s3_4.z), b3, acc18);
            acc19 = fma(vec4<f32>(s3_4.w), b3, acc19);
            let s3_5 = subgroupBroadcast(av2, 7u);
            acc20 = fma(vec4<f32>(s3_5.x), b3, acc20);
            acc21 = fma(vec4<f32>(s3_5.y), b3, acc21);
            acc22 = fma(vec4<f32>(s3_5.z), b3, acc22);
            acc23 = fma(vec4<f32>(s3_5.w), b3, acc23);
            let s3_6 = subgroupBroadcast(av3, 3u);
            acc24 = fma(vec4<f32>(s3_6.x), b3, acc24);
            acc25 = fma(vec4<f32>(s3_6.y), b3, acc25);
            acc26 = fma(vec4<f32>(s3_6.z), b3, acc26);
            acc27 = fma(vec4<f32>(s3_6.w), b3, acc27);
            let s3_7 = subgroupBroadcast(av3, 7u);
            acc28 = fma(vec4<f32>(s3_7.x), b3, acc28);
            acc29 = fma(vec4<f32>(s3_7.y), b3, acc29);
            acc30 = fma(vec4<f32>(s3_7.z), b3, acc30);
            acc31 = fma(vec4<f32>(s3_7.w), b3, acc31);
        } else {
            // sI = row I of the tile at k = 4kq .. 4kq+3.
            let s0 = subgroupBroadcast(av0, 0u);
            acc0 = fma(vec4<f32>(s0.x), b0, acc0);
            acc0 = fma(vec4<f32>(s0.y), b1, acc0);
            acc0 = fma(vec4<f32>(s0.z), b2, acc0);
            acc0 = fma(vec4<f32>(s0.w), b3, acc0);
            let s1 = subgroupBroadcast(av0, 1u);
            acc1 = fma(vec4<f32>(s1.x), b0, acc1);
            acc1 = fma(vec4<f32>(s1.y), b1, acc1);
            acc1 = fma(vec4<f32>(s1.z), b2, acc1);
            acc1 = fma(vec4<f32>(s1.w), b3, acc1);
            let s2 = subgroupBroadcast(av0, 2u);
            acc2 = fma(vec4<f32>(s2.x), b0, acc2);
            acc2 = fma(vec4<f32>(s2.y), b1, acc2);
            acc2 = fma(vec4<f32>(s2.z), b2, acc2);
            acc2 = fma(vec4<f32>(s2.w), b3, acc2);
            let s3 = subgroupBroadcast(av0, 3u);
            acc3 = fma(vec4<f32>(s3.x), b0, acc3);
            acc3 = fma(vec4<f32>(s3.y), b1, acc3);
            acc3 = fma(vec4<f32>(s3.z), b2, acc3);
            acc3 = fma(vec4<f32>(s3.w), b3, acc3);
            let s4 = subgroupBroadcast(av0, 4u);
            acc4 = fma(vec4<f32>(s4.x), b0, acc4);
            acc4 = fma(vec4<f32>(s4.y), b1, acc4);
            acc4 = fma(vec4<f32>(s4.z), b2, acc4);
            acc4 = fma(vec4<f32>(s4.w), b3, acc4);
            let s5 = subgroupBroadcast(av0, 5u);
            acc5 = fma(vec4<f32>(s5.x), b0, acc5);
            acc5 = fma(vec4<f32>(s5.y), b1, acc5);
            acc5 = fma(vec4<f32>(s5.z), b2, acc5);
            acc5 = fma(vec4<f32>(s5.w), b3, acc5);
            let s6 = subgroupBroadcast(av0, 6u);
            acc6 = fma(vec4<f32>(s6.x), b0, acc6);
            acc6 = fma(vec4<f32>(s6.y), b1, acc6);
            acc6 = fma(vec4<f32>(s6.z), b2, acc6);
            acc6 = fma(vec4<f32>(s6.w), b3, acc6);
            let s7 = subgroupBroadcast(av0, 7u);
            acc7 = fma(vec4<f32>(s7.x), b0, acc7);
            acc7 = fma(vec4<f32>(s7.y), b1, acc7);
            acc7 = fma(vec4<f32>(s7.z), b2, acc7);
            acc7 = fma(vec4<f32>(s7.w), b3, acc7);
            let s8 = subgroupBroadcast(av1, 0u);
            acc8 = fma(vec4<f32>(s8.x), b0, acc8);
            acc8 = fma(vec4<f32>(s8.y), b1, acc8);
            acc8 = fma(vec4<f32>(s8.z), b2, acc8);
            acc8 = fma(vec4<f32>(s8.w), b3, acc8);
            let s9 = subgroupBroadcast(av1, 1u);
            acc9 = fma(vec4<f32>(s9.x), b0, acc9);
            acc9 = fma(vec4<f32>(s9.y), b1, acc9);
            acc9 = fma(vec4<f32>(s9.z), b2, acc9);
            acc9 = fma(vec4<f32>(s9.w), b3, acc9);
            let s10 = subgroupBroadcast(av1, 2u);
            acc10 = fma(vec4<f32>(s10.x), b0, acc10);
            acc10 = fma(vec4<f32>(s10.y), b1, acc10);
            acc10 = fma(vec4<f32>(s10.z), b2, acc10);
            acc10 = fma(vec4<f32>(s10.w), b3, acc10);
            let s11 = subgroupBroadcast(av1, 3u);
            acc11 = fma(vec4<f32>(s11.x), b0, acc11);
            acc11 = fma(vec4<f32>(s11.y), b1, acc11);
            acc11 = fma(vec4<f32>(s11.z), b2, acc11);
            acc11 = fma(vec4<f32>(s11.w), b3, acc11);
            let s12 = subgroupBroadcast(av1, 4u);
            acc12 = fma(vec4<f32>(s12.x), b0, acc12);
            acc12 = fma(vec4<f32>(s12.y), b1, acc12);
            acc12 = fma(vec4<f32>(s12.z), b2, acc12);
            acc12 = fma(vec4<f32>(s12.w), b3, acc12);
            let s13 = subgroupBroadcast(av1, 5u);
            acc13 = fma(vec4<f32>(s13.x), b0, acc13);
            acc13 = fma(vec4<f32>(s13.y), b1, acc13);
            acc13 = fma(vec4<f32>(s13.z), b2, acc13);
            acc13 = fma(vec4<f32>(s13.w), b3, acc13);
            let s14 = subgroupBroadcast(av1, 6u);
            acc14 = fma(vec4<f32>(s14.x), b0, acc14);
            acc14 = fma(vec4<f32>(s14.y), b1, acc14);
            acc14 = fma(vec4<f32>(s14.z), b2, acc14);
            acc14 = fma(vec4<f32>(s14.w), b3, acc14);
            let s15 = subgroupBroadcast(av1, 7u);
            acc15 = fma(vec4<f32>(s15.x), b0, acc15);
            acc15 = fma(vec4<f32>(s15.y), b1, acc15);
            acc15 = fma(vec4<f32>(s15.z), b2, acc15);
            acc15 = fma(vec4<f32>(s15.w), b3, acc15);
            let s16 = subgroupBroadcast(av2, 0u);
            acc16 = fma(vec4<f32>(s16.x), b0, acc16);
            acc16 = fma(vec4<f32>(s16.y), b1, acc16);
            acc16 = fma(vec4<f32>(s16.z), b2, acc16);
            acc16 = fma(vec4<f32>(s16.w), b3, acc16);
            let s17 = subgroupBroadcast(av2, 1u);
            acc17 = fma(vec4<f32>(s17.x), b0, acc17);
            acc17 = fma(vec4<f32>(s17.y), b1, acc17);
            acc17 = fma(vec4<f32>(s17.z), b2, acc17);
            acc17 = fma(vec4<f32>(s17.w), b3, acc17);
            let s18 = subgroupBroadcast(av2, 2u);
            acc18 = fma(vec4<f32>(s18.x), b0, acc18);
            acc18 = fma(vec4<f32>(s18.y), b1, acc18);
            acc18 = fma(vec4<f32>(s18.z), b2, acc18);
            acc18 = fma(vec4<f32>(s18.w), b3, acc18);
            let s19 = subgroupBroadcast(av2, 3u);
            acc19 = fma(vec4<f32>(s19.x), b0, acc19);
            acc19 = fma(vec4<f32>(s19.y), b1, acc19);
            acc19 = fma(vec4<f32>(s19.z), b2, acc19);
            acc19 = fma(vec4<f32>(s19.w), b3, acc19);
            let s20 = subgroupBroadcast(av2, 4u);
            acc20 = fma(vec4<f32>(s20.x), b0, acc20);
            acc20 = fma(vec4<f32>(s20.y), b1, acc20);
            acc20 = fma(vec4<f32>(s20.z), b2, acc20);
            acc20 = fma(vec4<f32>(s20.w), b3, acc20);
            let s21 = subgroupBroadcast(av2, 5u);
            acc21 = fma(vec4<f32>(s21.x), b0, acc21);
            acc21 = fma(vec4<f32>(s21.y), b1, acc21);
            acc21 = fma(vec4<f32>(s21.z), b2, acc21);
            acc21 = fma(vec4<f32>(s21.w), b3, acc21);
            let s22 = subgroupBroadcast(av2, 6u);
            acc22 = fma(vec4<f32>(s22.x), b0, acc22);
            acc22 = fma(vec4<f32>(s22.y), b1, acc22);
            acc22 = fma(vec4<f32>(s22.z), b2, acc22);
            acc22 = fma(vec4<f32>(s22.w), b3, acc22);
            let s23 = subgroupBroadcast(av2, 7u);
            acc23 = fma(vec4<f32>(s23.x), b0, acc23);
            acc23 = fma(vec4<f32>(s23.y), b1, acc23);
            acc23 = fma(vec4<f32>(s23.z), b2, acc23);
            acc23 = fma(vec4<f32>(s23.w), b3, acc23);
            let s24 = subgroupBroadcast(av3, 0u);
            acc24 = fma(vec4<f32>(s24.x), b0, acc24);
            acc24 = fma(vec4<f32>(s24.y), b1, acc24);
            acc24 = fma(vec4<f32>(s24.z), b2, acc24);
            acc24 = fma(vec4<f32>(s24.w), b3, acc24);
            let s25 = subgroupBroadcast(av3, 1u);
            acc25 = fma(vec4<f32>(s25.x), b0, acc25);
            acc25 = fma(vec4<f32>(s25.y), b1, acc25);
            acc25 = fma(vec4<f32>(s25.z), b2, acc25);
            acc25 = fma(vec4<f32>(s25.w), b3, acc25);
            let s26 = subgroupBroadcast(av3, 2u);
            acc26 = fma(vec4<f32>(s26.x), b0, acc26);
            acc26 = fma(vec4<f32>(s26.y), b1, acc26);
            acc26 = fma(vec4<f32>(s26.z), b2, acc26);
            acc26 = fma(vec4<f32>(s26.w), b3, acc26);
            let s27 = subgroupBroadcast(av3, 3u);
            acc27 = fma(vec4<f32>(s27.x), b0, acc27);
            acc27 = fma(vec4<f32>(s27.y), b1, acc27);
            acc27 = fma(vec4<f32>(s27.z), b2, acc27);
            acc27 = fma(vec4<f32>(s27.w), b3, acc27);
            let s28 = subgroupBroadcast(av3, 4u);
            acc28 = fma(vec4<f32>(s28.x), b0, acc28);
            acc28 = fma(vec4<f32>(s28.y), b1, acc28);
            acc28 = fma(vec4<f32>(s28.z), b2, acc28);
            acc28 = fma(vec4<f32>(s28.w), b3, acc28);
            let s29 = subgroupBroadcast(av3, 5u);
            acc29 = fma(vec4<f32>(s29.x), b0, acc29);
            acc29 = fma(vec4<f32>(s29.y), b1, acc29);
            acc29 = fma(vec4<f32>(s29.z), b2, acc29);
            acc29 = fma(vec4<f32>(s29.w), b3, acc29);
            let s30 = subgroupBroadcast(av3, 6u);
            acc30 = fma(vec4<f32>(s30.x), b0, acc30);
            acc30 = fma(vec4<f32>(s30.y), b1, acc30);
            acc30 = fma(vec4<f32>(s30.z), b2, acc30);
            acc30 = fma(vec4<f32>(s30.w), b3, acc30);
            let s31 = subgroupBroadcast(av3, 7u);
            acc31 = fma(vec4<f32>(s31.x), b0, acc31);
            acc31 = fma(vec4<f32>(s31.y), b1, acc31);
            acc31 = fma(vec4<f32>(s31.z), b2, acc31);
            acc31 = fma(vec4<f32>(s31.w), b3, acc31);
        }
    }

    store4(c_base, m0 + 0u, c0, acc0);
    store4(c_base, m0 + 1u, c0, acc1);
    store4(c_base, m0 + 2u, c0, acc2);
    store4(c_base, m0 + 3u, c0, acc3);
    store4(c_base, m0 + 4u, c0, acc4);
    store4(c_base, m0 + 5u, c0, acc5);
    store4(c_base, m0 + 6u, c0, acc6);
    store4(c_base, m0 + 7u, c0, acc7);
    store4(c_base, m0 + 8u, c0, acc8);
    store4(c_base, m0 + 9u, c0, acc9);
    store4(c_base, m0 + 10u, c0, acc10);
    store4(c_base, m0 + 11u, c0, acc11);
    store4(c_base, m0 + 12u, c0, acc12);
    store4(c_base, m0 + 13u, c0, acc13);
    store4(c_base, m0 + 14u, c0, acc14);
    store4(c_base, m0 + 15u, c0, acc15);
    store4(c_base, m0 + 16u, c0, acc16);
    store4(c_base, m0 + 17u, c0, acc17);
    store4(c_base, m0 + 18u, c0, acc18);
    store4(c_base, m0 + 19u, c0, acc19);
    store4(c_base, m0 + 20u, c0, acc20);
    store4(c_base, m0 + 21u, c0, acc21);
    store4(c_base, m0 + 22u, c0, acc22);
    store4(c_base, m0 + 23u, c0, acc23);
    store4(c_base, m0 + 24u, c0, acc24);
    store4(c_base, m0 + 25u, c0, acc25);
    store4(c_base, m0 + 26u, c0, acc26);
    store4(c_base, m0 + 27u, c0, acc27);
    store4(c_base, m0 + 28u, c0, acc28);
    store4(c_base, m0 + 29u, c0, acc29);
    store4(c_base, m0 + 30u, c0, acc30);
    store4(c_base, m0 + 31u, c0, acc31);
}
