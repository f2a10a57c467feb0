// The part of the matrix multiply that every variant shares: `matmul.rs`
// puts this file (after `gelu_common.wgsl`) in front of `matmul.wgsl`,
// `matmul_subgroup.wgsl` and `matmul_texture.wgsl` (it is not a module on its
// own, and `tests/gpu_wgsl.rs` validates it in front of each file that names
// it as its prelude). It holds the parameters (the product and the batch
// strides described in `matmul.wgsl`), the overrides, the bindings every
// variant uses in the same way (the parameters, the bias, C and the
// epilogue's `aux`; each kernel declares how it reads A and B), the
// epilogue and the guarded store of 4 outputs.

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
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;
// Whether bias[N] is added and whether C is added to (instead of overwritten):
// constants of the pipeline rather than fields of `p`, so that the store
// compiles without the branches and loads it does not need. On llvmpipe a
// storage load or store is a loop over the SIMD lanes, and the uniform
// flags' untaken branches and loads cost as much as a quarter of the
// texture kernel's time at K = 384 (BENCHMARKS.md, "The store").
override HAS_BIAS: bool = false;
override ACCUMULATE: bool = false;
// What happens to an output after the bias and C are added (`Epilogue` in
// matmul.rs), so that a linear layer followed by GELU needs no pass of its
// own over its output, forward or backward:
//   0: nothing;
//   1: GELU: C = gelu(x), and aux = gelu'(x) at the same index (the slope
//      the backward pass needs);
//   2: gate: C = x · aux (the backward pass through GELU, aux the slopes).
override EPILOGUE: u32 = 0u;

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;
// The epilogue's slopes (laid out as C): written by EPILOGUE 1, read by 2.
@group(0) @binding(7) var<storage, read_write> aux: array<f32>;

// The epilogue of output `x` at index `idx` of C (and of aux).
fn epilogue(x: f32, idx: u32) -> f32 {
    if EPILOGUE == 1u {
        let g = gelu_and_slope(x);
        aux[idx] = g.y;
        return g.x;
    }
    if EPILOGUE == 2u {
        return x * aux[idx];
    }
    return x;
}

// Writes 4 consecutive outputs of row `row` from column `col` with scale, bias,
// accumulate and epilogue, skipping those outside C.
fn store4(c_base: u32, row: u32, col: u32, v: vec4<f32>) {
    if row >= p.m { return; }
    for (var j = 0u; j < 4u; j++) {
        if col + j < p.n {
            var x = p.alpha * v[j];
            if HAS_BIAS { x += bias[col + j]; }
            let idx = c_base + row * p.ldc + col + j;
            if ACCUMULATE { x += c[idx]; }
            c[idx] = epilogue(x, idx);
        }
    }
}

