// prelude: gelu_common.wgsl
// prelude: matmul_common.wgsl
//
// (`matmul.rs` puts `gelu_common.wgsl` and `matmul_common.wgsl` in front of
// this file: `Params`, the TRANS_A / TRANS_B / HAS_BIAS / ACCUMULATE /
// EPILOGUE overrides, the bindings `p`, `bias`, `c` and `aux`, and `store4`.)
//
// General matrix multiply, two entry points over the same parameters:
//
//     C[M, N] = alpha * op(A)[M, K] · op(B)[K, N]  (+ bias[N])  (+ C if accumulate)
//
// op(A) is A (stored M×K, row stride lda) or, with TRANS_A, Aᵀ (A stored K×M).
// op(B) is B (stored K×N, row stride ldb) or, with TRANS_B, Bᵀ (B stored N×K).
// So the linear layer forward X·Wᵀ + b is TRANS_B with W stored out×in, the input
// gradient dY·W is plain, and the weight gradient dYᵀ·X is TRANS_A.
//
// Batches: workgroup_id.z = outer * batch_inner + inner, and every matrix starts at
// off + outer * bs0 + inner * bs1 (elements). Attention uses outer = sequence,
// inner = head.
//
// `main` (tiled, any shape; the kernel for real GPUs): each workgroup of 8×8
// invocations computes a 64×64 tile of C; each invocation an 8×8 block held in
// 16 vec4 registers (register blocking). A and B tiles of depth
// BK = 16 are staged in workgroup memory in their stored orientation, as vec4
// along the contiguous dimension, and the inner loop consumes 4 k at a time: 16
// vec4 reads of workgroup memory feed 256 FMAs.
//
// Why this shape: on lavapipe (Mesa 22.3 llvmpipe) every load from storage or
// workgroup memory is a per-lane scalar loop, so the cost is the number of load
// instructions, and a vec4 load moves four values for about the price of one.
// Array-typed locals are also lowered to memory there, so the accumulators are a
// struct of named vec4 fields, never an array. The same code is an ordinary
// shared-memory tiled GEMM on real GPUs.
//
// Out-of-range elements load as 0 and out-of-range outputs are not written, so
// any shape works.
//
// `main_direct` (at the end of the file) is the variant the launcher picks on CPU
// adapters without usable subgroups: no workgroup memory and no barriers, about
// 2x faster on lavapipe. Where the device has subgroups of exactly 8 lanes the
// launcher picks `matmul_subgroup.wgsl` instead (a separate module, since
// subgroup built-ins need wgpu::Features::SUBGROUP), about 2x `main_direct`.

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const THREADS: u32 = 64u;

@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;

// Tiles in the stored orientation, vec4 along the contiguous dimension:
// A: [BM][BK/4] (k contiguous) or, TRANS_A, [BK][BM/4] (m contiguous).
// B: [BK][BN/4] (n contiguous) or, TRANS_B, [BN][BK/4] (k contiguous).
var<workgroup> a_tile: array<vec4<f32>, BM * BK / 4u>;
var<workgroup> b_tile: array<vec4<f32>, BN * BK / 4u>;

// 4 consecutive elements of row `row` of a stored rows×cols matrix starting at
// column `col`, zero outside.
fn ld4_a(base: u32, row: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
    if row >= rows { return vec4<f32>(0.0); }
    let i = base + row * p.lda + col;
    var v = vec4<f32>(0.0);
    if col < cols { v.x = a[i]; }
    if col + 1u < cols { v.y = a[i + 1u]; }
    if col + 2u < cols { v.z = a[i + 2u]; }
    if col + 3u < cols { v.w = a[i + 3u]; }
    return v;
}
// Same for B.
fn ld4_b(base: u32, row: u32, col: u32, rows: u32, cols: u32) -> vec4<f32> {
    if row >= rows { return vec4<f32>(0.0); }
    let i = base + row * p.ldb + col;
    var v = vec4<f32>(0.0);
    if col < cols { v.x = b[i]; }
    if col + 1u < cols { v.y = b[i + 1u]; }
    if col + 2u < cols { v.z = b[i + 2u]; }
    if col + 3u < cols { v.w = b[i + 3u]; }
    return v;
}

// The 8×8 accumulator block of one invocation: rN = row N, l/h = columns 0-3 / 4-7.
struct Acc {
    r0l: vec4<f32>, r0h: vec4<f32>, r1l: vec4<f32>, r1h: vec4<f32>,
    r2l: vec4<f32>, r2h: vec4<f32>, r3l: vec4<f32>, r3h: vec4<f32>,
    r4l: vec4<f32>, r4h: vec4<f32>, r5l: vec4<f32>, r5h: vec4<f32>,
    r6l: vec4<f32>, r6h: vec4<f32>, r7l: vec4<f32>, r7h: vec4<f32>,
}

// acc += a_col ⊗ b_row for one k: a_col = rows 0-3 (al) and 4-7 (ah), b_row = columns.
fn outer(acc: ptr<function, Acc>, al: vec4<f32>, ah: vec4<f32>, bl: vec4<f32>, bh: vec4<f32>) {
    (*acc).r0l = fma(vec4<f32>(al.x), bl, (*acc).r0l); (*acc).r0h = fma(vec4<f32>(al.x), bh, (*acc).r0h);
    (*acc).r1l = fma(vec4<f32>(al.y), bl, (*acc).r1l); (*acc).r1h = fma(vec4<f32>(al.y), bh, (*acc).r1h);
    (*acc).r2l = fma(vec4<f32>(al.z), bl, (*acc).r2l); (*acc).r2h = fma(vec4<f32>(al.z), bh, (*acc).r2h);
    (*acc).r3l = fma(vec4<f32>(al.w), bl, (*acc).r3l); (*acc).r3h = fma(vec4<f32>(al.w), bh, (*acc).r3h);
    (*acc).r4l = fma(vec4<f32>(ah.x), bl, (*acc).r4l); (*acc).r4h = fma(vec4<f32>(ah.x), bh, (*acc).r4h);
    (*acc).r5l = fma(vec4<f32>(ah.y), bl, (*acc).r5l); (*acc).r5h = fma(vec4<f32>(ah.y), bh, (*acc).r5h);
    (*acc).r6l = fma(vec4<f32>(ah.z), bl, (*acc).r6l); (*acc).r6h = fma(vec4<f32>(ah.z), bh, (*acc).r6h);
    (*acc).r7l = fma(vec4<f32>(ah.w), bl, (*acc).r7l); (*acc).r7h = fma(vec4<f32>(ah.w), bh, (*acc).r7h);
}

@compute @workgroup_size(8, 8, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let outer_b = wid.z / p.batch_inner;
    let inner_b = wid.z % p.batch_inner;
    let a_base = p.a_off + outer_b * p.a_bs0 + inner_b * p.a_bs1;
    let b_base = p.b_off + outer_b * p.b_bs0 + inner_b * p.b_bs1;
    let c_base = p.c_off + outer_b * p.c_bs0 + inner_b * p.c_bs1;
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;
    let tm = 8u * lid.y; // first row of this invocation's block within the tile
    let tn = 8u * lid.x; // first column

    var acc: Acc;
    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Stage the tiles with vec4 reads: BM*BK/4 = BN*BK/4 vec4 each.
        for (var i = tid; i < BM * BK / 4u; i += THREADS) {
            if TRANS_A {
                let kk = i / (BM / 4u);
                let mq = i % (BM / 4u);
                a_tile[i] = ld4_a(a_base, k0 + kk, m0 + 4u * mq, p.k, p.m);
            } else {
                let mm = i / (BK / 4u);
                let kq = i % (BK / 4u);
                a_tile[i] = ld4_a(a_base, m0 + mm, k0 + 4u * kq, p.m, p.k);
            }
        }
        for (var i = tid; i < BN * BK / 4u; i += THREADS) {
            if TRANS_B {
                let nn = i / (BK / 4u);
                let kq = i % (BK / 4u);
                b_tile[i] = ld4_b(b_base, n0 + nn, k0 + 4u * kq, p.n, p.k);
            } else {
                let kk = i / (BN / 4u);
                let nq = i % (BN / 4u);
                b_tile[i] = ld4_b(b_base, k0 + kk, n0 + 4u * nq, p.k, p.n);
            }
        }
        workgroupBarrier();

        for (var kq = 0u; kq < BK / 4u; kq++) {
            // Columns of op(A) for k = 4kq .. 4kq+3: al_k rows 0-3, ah_k rows 4-7.
            var al0: vec4<f32>; var ah0: vec4<f32>; var al1: vec4<f32>; var ah1: vec4<f32>;
            var al2: vec4<f32>; var ah2: vec4<f32>; var al3: vec4<f32>; var ah3: vec4<f32>;
            if TRANS_A {
                let r = (4u * kq) * (BM / 4u) + tm / 4u;
                al0 = a_tile[r]; ah0 = a_tile[r + 1u];
                al1 = a_tile[r + BM / 4u]; ah1 = a_tile[r + BM / 4u + 1u];
                al2 = a_tile[r + BM / 2u]; ah2 = a_tile[r + BM / 2u + 1u];
                al3 = a_tile[r + 3u * BM / 4u]; ah3 = a_tile[r + 3u * BM / 4u + 1u];
            } else {
                let r = tm * (BK / 4u) + kq;
                let x0 = a_tile[r]; let x1 = a_tile[r + BK / 4u];
                let x2 = a_tile[r + 2u * BK / 4u]; let x3 = a_tile[r + 3u * BK / 4u];
                let x4 = a_tile[r + 4u * BK / 4u]; let x5 = a_tile[r + 5u * BK / 4u];
                let x6 = a_tile[r + 6u * BK / 4u]; let x7 = a_tile[r + 7u * BK / 4u];
                al0 = vec4<f32>(x0.x, x1.x, x2.x, x3.x); ah0 = vec4<f32>(x4.x, x5.x, x6.x, x7.x);
                al1 = vec4<f32>(x0.y, x1.y, x2.y, x3.y); ah1 = vec4<f32>(x4.y, x5.y, x6.y, x7.y);
                al2 = vec4<f32>(x0.z, x1.z, x2.z, x3.z); ah2 = vec4<f32>(x4.z, x5.z, x6.z, x7.z);
                al3 = vec4<f32>(x0.w, x1.w, x2.w, x3.w); ah3 = vec4<f32>(x4.w, x5.w, x6.w, x7.w);
            }
            // Rows of op(B) for the same k: bl_k columns 0-3, bh_k columns 4-7.
            var bl0: vec4<f32>; var bh0: vec4<f32>; var bl1: vec4<f32>; var bh1: vec4<f32>;
            var bl2: vec4<f32>; var bh2: vec4<f32>; var bl3: vec4<f32>; var bh3: vec4<f32>;
            if TRANS_B {
                let r = tn * (BK / 4u) + kq;
                let y0 = b_tile[r]; let y1 = b_tile[r + BK / 4u];
                let y2 = b_tile[r + 2u * BK / 4u]; let y3 = b_tile[r + 3u * BK / 4u];
                let y4 = b_tile[r + 4u * BK / 4u]; let y5 = b_tile[r + 5u * BK / 4u];
                let y6 = b_tile[r + 6u * BK / 4u]; let y7 = b_tile[r + 7u * BK / 4u];
                bl0 = vec4<f32>(y0.x, y1.x, y2.x, y3.x); bh0 = vec4<f32>(y4.x, y5.x, y6.x, y7.x);
                bl1 = vec4<f32>(y0.y, y1.y, y2.y, y3.y); bh1 = vec4<f32>(y4.y, y5.y, y6.y, y7.y);
                bl2 = vec4<f32>(y0.z, y1.z, y2.z, y3.z); bh2 = vec4<f32>(y4.z, y5.z, y6.z, y7.z);
                bl3 = vec4<f32>(y0.w, y1.w, y2.w, y3.w); bh3 = vec4<f32>(y4.w, y5.w, y6.w, y7.w);
            } else {
                let r = (4u * kq) * (BN / 4u) + tn / 4u;
                bl0 = b_tile[r]; bh0 = b_tile[r + 1u];
                bl1 = b_tile[r + BN / 4u]; bh1 = b_tile[r + BN / 4u + 1u];
                bl2 = b_tile[r + BN / 2u]; bh2 = b_tile[r + BN / 2u + 1u];
                bl3 = b_tile[r + 3u * BN / 4u]; bh3 = b_tile[r + 3u * BN / 4u + 1u];
            }
            outer(&acc, al0, ah0, bl0, bh0);
            outer(&acc, al1, ah1, bl1, bh1);
            outer(&acc, al2, ah2, bl2, bh2);
            outer(&acc, al3, ah3, bl3, bh3);
        }
        workgroupBarrier();
    }

    let r = m0 + tm;
    let q = n0 + tn;
    store4(c_base, r, q, acc.r0l); store4(c_base, r, q + 4u, acc.r0h);
    store4(c_base, r + 1u, q, acc.r1l); store4(c_base, r + 1u, q + 4u, acc.r1h);
    store4(c_base, r + 2u, q, acc.r2l); store4(c_base, r + 2u, q + 4u, acc.r2h);
    store4(c_base, r + 3u, q, acc.r3l); store4(c_base, r + 3u, q + 4u, acc.r3h);
    store4(c_base, r + 4u, q, acc.r4l); store4(c_base, r + 4u, q + 4u, acc.r4h);
    store4(c_base, r + 5u, q, acc.r5l); store4(c_base, r + 5u, q + 4u, acc.r5h);
    store4(c_base, r + 6u, q, acc.r6l); store4(c_base, r + 6u, q + 4u, acc.r6h);
    store4(c_base, r + 7u, q, acc.r7l); store4(c_base, r + 7u, q + 4u, acc.r7h);
}

// ---------------------------------------------------------------- direct variant
//
// `main_direct`: barrier-free, no workgroup memory, for CPU adapters (lavapipe).
// Each invocation computes a DM×DN = 12×12 block of C straight from storage and
// the CPU caches do the tiling; a workgroup is 8 invocations side by side along
// N (one 8-lane SIMD vector on llvmpipe), a 12×96 tile. Every load is a vec4
// (A and B bound a second time as array<vec4<f32>>, bindings 5 and 6), so the
// launcher uses it only when K, the contiguous dimensions, the row strides, the
// offsets and the batch strides of A and B are multiples of 4. Rows and columns
// past the edge are clamped to the last one (no branches, so llvmpipe runs no
// masked code in the loop) and their results are not stored.

const DM: u32 = 12u;
const DN: u32 = 12u;
const DWG: u32 = 8u;

@group(0) @binding(5) var<storage, read> a4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> b4: array<vec4<f32>>;

// The 12×12 accumulator block: rI_J = row I, columns 4J .. 4J+3.
struct Acc12 {
    r0_0: vec4<f32>, r0_1: vec4<f32>, r0_2: vec4<f32>,
    r1_0: vec4<f32>, r1_1: vec4<f32>, r1_2: vec4<f32>,
    r2_0: vec4<f32>, r2_1: vec4<f32>, r2_2: vec4<f32>,
    r3_0: vec4<f32>, r3_1: vec4<f32>, r3_2: vec4<f32>,
    r4_0: vec4<f32>, r4_1: vec4<f32>, r4_2: vec4<f32>,
    r5_0: vec4<f32>, r5_1: vec4<f32>, r5_2: vec4<f32>,
    r6_0: vec4<f32>, r6_1: vec4<f32>, r6_2: vec4<f32>,
    r7_0: vec4<f32>, r7_1: vec4<f32>, r7_2: vec4<f32>,
    r8_0: vec4<f32>, r8_1: vec4<f32>, r8_2: vec4<f32>,
    r9_0: vec4<f32>, r9_1: vec4<f32>, r9_2: vec4<f32>,
    r10_0: vec4<f32>, r10_1: vec4<f32>, r10_2: vec4<f32>,
    r11_0: vec4<f32>, r11_1: vec4<f32>, r11_2: vec4<f32>,
}

// acc += a_col ⊗ b_row for one k: a_col = rows 0-3, 4-7, 8-11 (a0, a1, a2),
// b_row = columns 0-3, 4-7, 8-11 (b0, b1, b2).
fn outer12(acc: ptr<function, Acc12>, a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>,
           b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>) {
    (*acc).r0_0 = fma(vec4<f32>(a0.x), b0, (*acc).r0_0); (*acc).r0_1 = fma(vec4<f32>(a0.x), b1, (*acc).r0_1); (*acc).r0_2 = fma(vec4<f32>(a0.x), b2, (*acc).r0_2);
    (*acc).r1_0 = fma(vec4<f32>(a0.y), b0, (*acc).r1_0); (*acc).r1_1 = fma(vec4<f32>(a0.y), b1, (*acc).r1_1); (*acc).r1_2 = fma(vec4<f32>(a0.y), b2, (*acc).r1_2);
    (*acc).r2_0 = fma(vec4<f32>(a0.z), b0, (*acc).r2_0); (*acc).r2_1 = fma(vec4<f32>(a0.z), b1, (*acc).r2_1); (*acc).r2_2 = fma(vec4<f32>(a0.z), b2, (*acc).r2_2);
    (*acc).r3_0 = fma(vec4<f32>(a0.w), b0, (*acc).r3_0); (*acc).r3_1 = fma(vec4<f32>(a0.w), b1, (*acc).r3_1); (*acc).r3_2 = fma(vec4<f32>(a0.w), b2, (*acc).r3_2);
    (*acc).r4_0 = fma(vec4<f32>(a1.x), b0, (*acc).r4_0); (*acc).r4_1 = fma(vec4<f32>(a1.x), b1, (*acc).r4_1); (*acc).r4_2 = fma(vec4<f32>(a1.x), b2, (*acc).r4_2);
    (*acc).r5_0 = fma(vec4<f32>(a1.y), b0, (*acc).r5_0); (*acc).r5_1 = fma(vec4<f32>(a1.y), b1, (*acc).r5_1); (*acc).r5_2 = fma(vec4<f32>(a1.y), b2, (*acc).r5_2);
    (*acc).r6_0 = fma(vec4<f32>(a1.z), b0, (*acc).r6_0); (*acc).r6_1 = fma(vec4<f32>(a1.z), b1, (*acc).r6_1); (*acc).r6_2 = fma(vec4<f32>(a1.z), b2, (*acc).r6_2);
    (*acc).r7_0 = fma(vec4<f32>(a1.w), b0, (*acc).r7_0); (*acc).r7_1 = fma(vec4<f32>(a1.w), b1, (*acc).r7_1); (*acc).r7_2 = fma(vec4<f32>(a1.w), b2, (*acc).r7_2);
    (*acc).r8_0 = fma(vec4<f32>(a2.x), b0, (*acc).r8_0); (*acc).r8_1 = fma(vec4<f32>(a2.x), b1, (*acc).r8_1); (*acc).r8_2 = fma(vec4<f32>(a2.x), b2, (*acc).r8_2);
    (*acc).r9_0 = fma(vec4<f32>(a2.y), b0, (*acc).r9_0); (*acc).r9_1 = fma(vec4<f32>(a2.y), b1, (*acc).r9_1); (*acc).r9_2 = fma(vec4<f32>(a2.y), b2, (*acc).r9_2);
    (*acc).r10_0 = fma(vec4<f32>(a2.z), b0, (*acc).r10_0); (*acc).r10_1 = fma(vec4<f32>(a2.z), b1, (*acc).r10_1); (*acc).r10_2 = fma(vec4<f32>(a2.z), b2, (*acc).r10_2);
    (*acc).r11_0 = fma(vec4<f32>(a2.w), b0, (*acc).r11_0); (*acc).r11_1 = fma(vec4<f32>(a2.w), b1, (*acc).r11_1); (*acc).r11_2 = fma(vec4<f32>(a2.w), b2, (*acc).r11_2);
}

@compute @workgroup_size(8, 1, 1)
fn main_direct(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let outer_b = wid.z / p.batch_inner;
    let inner_b = wid.z % p.batch_inner;
    // A and B indices in vec4 units.
    let a_base = (p.a_off + outer_b * p.a_bs0 + inner_b * p.a_bs1) / 4u;
    let b_base = (p.b_off + outer_b * p.b_bs0 + inner_b * p.b_bs1) / 4u;
    let c_base = p.c_off + outer_b * p.c_bs0 + inner_b * p.c_bs1;
    let lda4 = p.lda / 4u;
    let ldb4 = p.ldb / 4u;
    let r0 = wid.y * DM; // first row of this invocation's block
    let c0 = (wid.x * DWG + lid.x) * DN; // first column

    // Start of each needed row of the stored A and B (clamped), in vec4 units.
    // A: row r0+i (k contiguous) or, TRANS_A, the m-quads r0/4+q (m contiguous).
    // B: the n-quads c0/4+q (n contiguous) or, TRANS_B, row c0+j (k contiguous).
    let aq0 = a_base + min(r0 / 4u, p.m / 4u - 1u);
    let aq1 = a_base + min(r0 / 4u + 1u, p.m / 4u - 1u);
    let aq2 = a_base + min(r0 / 4u + 2u, p.m / 4u - 1u);
    let ar0 = a_base + min(r0, p.m - 1u) * lda4;
    let ar1 = a_base + min(r0 + 1u, p.m - 1u) * lda4;
    let ar2 = a_base + min(r0 + 2u, p.m - 1u) * lda4;
    let ar3 = a_base + min(r0 + 3u, p.m - 1u) * lda4;
    let ar4 = a_base + min(r0 + 4u, p.m - 1u) * lda4;
    let ar5 = a_base + min(r0 + 5u, p.m - 1u) * lda4;
    let ar6 = a_base + min(r0 + 6u, p.m - 1u) * lda4;
    let ar7 = a_base + min(r0 + 7u, p.m - 1u) * lda4;
    let ar8 = a_base + min(r0 + 8u, p.m - 1u) * lda4;
    let ar9 = a_base + min(r0 + 9u, p.m - 1u) * lda4;
    let ar10 = a_base + min(r0 + 10u, p.m - 1u) * lda4;
    let ar11 = a_base + min(r0 + 11u, p.m - 1u) * lda4;
    let bq0 = b_base + min(c0 / 4u, p.n / 4u - 1u);
    let bq1 = b_base + min(c0 / 4u + 1u, p.n / 4u - 1u);
    let bq2 = b_base + min(c0 / 4u + 2u, p.n / 4u - 1u);
    let br0 = b_base + min(c0, p.n - 1u) * ldb4;
    let br1 = b_base + min(c0 + 1u, p.n - 1u) * ldb4;
    let br2 = b_base + min(c0 + 2u, p.n - 1u) * ldb4;
    let br3 = b_base + min(c0 + 3u, p.n - 1u) * ldb4;
    let br4 = b_base + min(c0 + 4u, p.n - 1u) * ldb4;
    let br5 = b_base + min(c0 + 5u, p.n - 1u) * ldb4;
    let br6 = b_base + min(c0 + 6u, p.n - 1u) * ldb4;
    let br7 = b_base + min(c0 + 7u, p.n - 1u) * ldb4;
    let br8 = b_base + min(c0 + 8u, p.n - 1u) * ldb4;
    let br9 = b_base + min(c0 + 9u, p.n - 1u) * ldb4;
    let br10 = b_base + min(c0 + 10u, p.n - 1u) * ldb4;
    let br11 = b_base + min(c0 + 11u, p.n - 1u) * ldb4;

    var acc: Acc12;
    for (var kq = 0u; kq < p.k / 4u; kq++) {
        // Columns of op(A) for k = 4kq .. 4kq+3: ak_q = rows 4q .. 4q+3 at k = 4kq+k.
        var a0_0: vec4<f32>; var a0_1: vec4<f32>; var a0_2: vec4<f32>;
        var a1_0: vec4<f32>; var a1_1: vec4<f32>; var a1_2: vec4<f32>;
        var a2_0: vec4<f32>; var a2_1: vec4<f32>; var a2_2: vec4<f32>;
        var a3_0: vec4<f32>; var a3_1: vec4<f32>; var a3_2: vec4<f32>;
        if TRANS_A {
            let k0 = 4u * kq * lda4;
            a0_0 = a4[aq0 + k0]; a0_1 = a4[aq1 + k0]; a0_2 = a4[aq2 + k0];
            a1_0 = a4[aq0 + k0 + 1u * lda4]; a1_1 = a4[aq1 + k0 + 1u * lda4]; a1_2 = a4[aq2 + k0 + 1u * lda4];
            a2_0 = a4[aq0 + k0 + 2u * lda4]; a2_1 = a4[aq1 + k0 + 2u * lda4]; a2_2 = a4[aq2 + k0 + 2u * lda4];
            a3_0 = a4[aq0 + k0 + 3u * lda4]; a3_1 = a4[aq1 + k0 + 3u * lda4]; a3_2 = a4[aq2 + k0 + 3u * lda4];
        } else {
            let x0 = a4[ar0 + kq];
            let x1 = a4[ar1 + kq];
            let x2 = a4[ar2 + kq];
            let x3 = a4[ar3 + kq];
            let x4 = a4[ar4 + kq];
            let x5 = a4[ar5 + kq];
            let x6 = a4[ar6 + kq];
            let x7 = a4[ar7 + kq];
            let x8 = a4[ar8 + kq];
            let x9 = a4[ar9 + kq];
            let x10 = a4[ar10 + kq];
            let x11 = a4[ar11 + kq];
            a0_0 = vec4<f32>(x0.x, x1.x, x2.x, x3.x);
            a0_1 = vec4<f32>(x4.x, x5.x, x6.x, x7.x);
            a0_2 = vec4<f32>(x8.x, x9.x, x10.x, x11.x);
            a1_0 = vec4<f32>(x0.y, x1.y, x2.y, x3.y);
            a1_1 = vec4<f32>(x4.y, x5.y, x6.y, x7.y);
            a1_2 = vec4<f32>(x8.y, x9.y, x10.y, x11.y);
            a2_0 = vec4<f32>(x0.z, x1.z, x2.z, x3.z);
            a2_1 = vec4<f32>(x4.z, x5.z, x6.z, x7.z);
            a2_2 = vec4<f32>(x8.z, x9.z, x10.z, x11.z);
            a3_0 = vec4<f32>(x0.w, x1.w, x2.w, x3.w);
            a3_1 = vec4<f32>(x4.w, x5.w, x6.w, x7.w);
            a3_2 = vec4<f32>(x8.w, x9.w, x10.w, x11.w);
        }
        // Rows of op(B) for the same k: bk_q = columns 4q .. 4q+3.
        var b0_0: vec4<f32>; var b0_1: vec4<f32>; var b0_2: vec4<f32>;
        var b1_0: vec4<f32>; var b1_1: vec4<f32>; var b1_2: vec4<f32>;
        var b2_0: vec4<f32>; var b2_1: vec4<f32>; var b2_2: vec4<f32>;
        var b3_0: vec4<f32>; var b3_1: vec4<f32>; var b3_2: vec4<f32>;
        if TRANS_B {
            let y0 = b4[br0 + kq];
            let y1 = b4[br1 + kq];
            let y2 = b4[br2 + kq];
            let y3 = b4[br3 + kq];
            let y4 = b4[br4 + kq];
            let y5 = b4[br5 + kq];
            let y6 = b4[br6 + kq];
            let y7 = b4[br7 + kq];
            let y8 = b4[br8 + kq];
            let y9 = b4[br9 + kq];
            let y10 = b4[br10 + kq];
            let y11 = b4[br11 + kq];
            b0_0 = vec4<f32>(y0.x, y1.x, y2.x, y3.x);
            b0_1 = vec4<f32>(y4.x, y5.x, y6.x, y7.x);
            b0_2 = vec4<f32>(y8.x, y9.x, y10.x, y11.x);
            b1_0 = vec4<f32>(y0.y, y1.y, y2.y, y3.y);
            b1_1 = vec4<f32>(y4.y, y5.y, y6.y, y7.y);
            b1_2 = vec4<f32>(y8.y, y9.y, y10.y, y11.y);
            b2_0 = vec4<f32>(y0.z, y1.z, y2.z, y3.z);
            b2_1 = vec4<f32>(y4.z, y5.z, y6.z, y7.z);
            b2_2 = vec4<f32>(y8.z, y9.z, y10.z, y11.z);
            b3_0 = vec4<f32>(y0.w, y1.w, y2.w, y3.w);
            b3_1 = vec4<f32>(y4.w, y5.w, y6.w, y7.w);
            b3_2 = vec4<f32>(y8.w, y9.w, y10.w, y11.w);
        } else {
            let k0 = 4u * kq * ldb4;
            b0_0 = b4[bq0 + k0]; b0_1 = b4[bq1 + k0]; b0_2 = b4[bq2 + k0];
            b1_0 = b4[bq0 + k0 + 1u * ldb4]; b1_1 = b4[bq1 + k0 + 1u * ldb4]; b1_2 = b4[bq2 + k0 + 1u * ldb4];
            b2_0 = b4[bq0 + k0 + 2u * ldb4]; b2_1 = b4[bq1 + k0 + 2u * ldb4]; b2_2 = b4[bq2 + k0 + 2u * ldb4];
            b3_0 = b4[bq0 + k0 + 3u * ldb4]; b3_1 = b4[bq1 + k0 + 3u * ldb4]; b3_2 = b4[bq2 + k0 + 3u * ldb4];
        }
        outer12(&acc, a0_0, a0_1, a0_2, b0_0, b0_1, b0_2);
        outer12(&acc, a1_0, a1_1, a1_2, b1_0, b1_1, b1_2);
        outer12(&acc, a2_0, a2_1, a2_2, b2_0, b2_1, b2_2);
        outer12(&acc, a3_0, a3_1, a3_2, b3_0, b3_1, b3_2);
    }

    store4(c_base, r0, c0, acc.r0_0); store4(c_base, r0, c0 + 4u, acc.r0_1); store4(c_base, r0, c0 + 8u, acc.r0_2);
    store4(c_base, r0 + 1u, c0, acc.r1_0); store4(c_base, r0 + 1u, c0 + 4u, acc.r1_1); store4(c_base, r0 + 1u, c0 + 8u, acc.r1_2);
    store4(c_base, r0 + 2u, c0, acc.r2_0); store4(c_base, r0 + 2u, c0 + 4u, acc.r2_1); store4(c_base, r0 + 2u, c0 + 8u, acc.r2_2);
    store4(c_base, r0 + 3u, c0, acc.r3_0); store4(c_base, r0 + 3u, c0 + 4u, acc.r3_1); store4(c_base, r0 + 3u, c0 + 8u, acc.r3_2);
    store4(c_base, r0 + 4u, c0, acc.r4_0); store4(c_base, r0 + 4u, c0 + 4u, acc.r4_1); store4(c_base, r0 + 4u, c0 + 8u, acc.r4_2);
    store4(c_base, r0 + 5u, c0, acc.r5_0); store4(c_base, r0 + 5u, c0 + 4u, acc.r5_1); store4(c_base, r0 + 5u, c0 + 8u, acc.r5_2);
    store4(c_base, r0 + 6u, c0, acc.r6_0); store4(c_base, r0 + 6u, c0 + 4u, acc.r6_1); store4(c_base, r0 + 6u, c0 + 8u, acc.r6_2);
    store4(c_base, r0 + 7u, c0, acc.r7_0); store4(c_base, r0 + 7u, c0 + 4u, acc.r7_1); store4(c_base, r0 + 7u, c0 + 8u, acc.r7_2);
    store4(c_base, r0 + 8u, c0, acc.r8_0); store4(c_base, r0 + 8u, c0 + 4u, acc.r8_1); store4(c_base, r0 + 8u, c0 + 8u, acc.r8_2);
    store4(c_base, r0 + 9u, c0, acc.r9_0); store4(c_base, r0 + 9u, c0 + 4u, acc.r9_1); store4(c_base, r0 + 9u, c0 + 8u, acc.r9_2);
    store4(c_base, r0 + 10u, c0, acc.r10_0); store4(c_base, r0 + 10u, c0 + 4u, acc.r10_1); store4(c_base, r0 + 10u, c0 + 8u, acc.r10_2);
    store4(c_base, r0 + 11u, c0, acc.r11_0); store4(c_base, r0 + 11u, c0 + 4u, acc.r11_1); store4(c_base, r0 + 11u, c0 + 8u, acc.r11_2);
}
