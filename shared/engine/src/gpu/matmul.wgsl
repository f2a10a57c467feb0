// Tiled general matrix multiply:
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
// Each workgroup computes a BM×BN tile of C; each of its 16×16 invocations a TM×TN
// block held in registers (register blocking). A and B tiles of depth BK are staged
// in workgroup memory, stored k-major as vec4 so the inner loop reads one vec4 of A
// and one of B per k and does TM vec4 FMAs. Out-of-range elements load as 0 and
// out-of-range outputs are not written, so any shape works.

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

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
const TM: u32 = 4u;
const THREADS: u32 = 256u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// a_tile[k * BM/4 + m/4][m % 4] = op(A)[m0 + m, k0 + k]
var<workgroup> a_tile: array<vec4<f32>, 256>;
// b_tile[k * BN/4 + n/4][n % 4] = op(B)[k0 + k, n0 + n]
var<workgroup> b_tile: array<vec4<f32>, 256>;

// op(A)[row, col], 0 outside the matrix.
fn load_a(base: u32, row: u32, col: u32) -> f32 {
    if row >= p.m || col >= p.k {
        return 0.0;
    }
    if TRANS_A {
        return a[base + col * p.lda + row];
    }
    return a[base + row * p.lda + col];
}

// op(B)[row, col], 0 outside the matrix.
fn load_b(base: u32, row: u32, col: u32) -> f32 {
    if row >= p.k || col >= p.n {
        return 0.0;
    }
    if TRANS_B {
        return b[base + col * p.ldb + row];
    }
    return b[base + row * p.ldb + col];
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let outer = wid.z / p.batch_inner;
    let inner = wid.z % p.batch_inner;
    let a_base = p.a_off + outer * p.a_bs0 + inner * p.a_bs1;
    let b_base = p.b_off + outer * p.b_bs0 + inner * p.b_bs1;
    let c_base = p.c_off + outer * p.c_bs0 + inner * p.c_bs1;
    let m0 = wid.y * BM;
    let n0 = wid.x * BN;

    // acc[i] holds C[m0 + 4*lid.y + i, n0 + 4*lid.x .. +4].
    var acc: array<vec4<f32>, TM>;
    for (var i = 0u; i < TM; i++) {
        acc[i] = vec4<f32>(0.0);
    }

    for (var k0 = 0u; k0 < p.k; k0 += BK) {
        // Stage the tiles: BM*BK = BN*BK = 1024 elements, 4 per invocation. The
        // index order follows the storage order so neighbouring invocations read
        // neighbouring addresses.
        for (var i = 0u; i < BM * BK / THREADS; i++) {
            let idx = tid + i * THREADS;
            var mm: u32;
            var kk: u32;
            if TRANS_A {
                kk = idx / BM;
                mm = idx % BM;
            } else {
                mm = idx / BK;
                kk = idx % BK;
            }
            a_tile[kk * (BM / 4u) + mm / 4u][mm % 4u] = load_a(a_base, m0 + mm, k0 + kk);
        }
        for (var i = 0u; i < BN * BK / THREADS; i++) {
            let idx = tid + i * THREADS;
            var nn: u32;
            var kk: u32;
            if TRANS_B {
                nn = idx / BK;
                kk = idx % BK;
            } else {
                kk = idx / BN;
                nn = idx % BN;
            }
            b_tile[kk * (BN / 4u) + nn / 4u][nn % 4u] = load_b(b_base, k0 + kk, n0 + nn);
        }
        workgroupBarrier();

        for (var kk = 0u; kk < BK; kk++) {
            let av = a_tile[kk * (BM / 4u) + lid.y];
            let bv = b_tile[kk * (BN / 4u) + lid.x];
            acc[0] = fma(vec4<f32>(av.x), bv, acc[0]);
            acc[1] = fma(vec4<f32>(av.y), bv, acc[1]);
            acc[2] = fma(vec4<f32>(av.z), bv, acc[2]);
            acc[3] = fma(vec4<f32>(av.w), bv, acc[3]);
        }
        workgroupBarrier();
    }

    // Epilogue: scale, bias, optional accumulate, bounds-checked store.
    for (var i = 0u; i < TM; i++) {
        let row = m0 + 4u * lid.y + i;
        if row >= p.m {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + 4u * lid.x + j;
            if col >= p.n {
                break;
            }
            var v = p.alpha * acc[i][j];
            if p.has_bias != 0u {
                v += bias[col];
            }
            let idx = c_base + row * p.ldc + col;
            if p.accumulate != 0u {
                v += c[idx];
            }
            c[idx] = v;
        }
    }
}
