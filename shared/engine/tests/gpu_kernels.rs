//! Every GPU kernel against its plain-Rust reference (`fedsb_engine::gpu::cpu_ref`)
//! on seeded random inputs with shapes that are not multiples of the workgroup
//! tiles.
//!
//! Needs a wgpu adapter; lavapipe is enough. A missing adapter fails the tests
//! (it is not a skip). Pick one with `FEDSB_ADAPTER=<name substring>`.
//!
//! ```text
//! cargo test -p fedsb-engine --test gpu_kernels
//! ```

use std::sync::OnceLock;

use fedsb_engine::gpu::layernorm::{self, LayerNormShape};
use fedsb_engine::gpu::matmul::{self, Gemm};
use fedsb_engine::gpu::gelu;
use fedsb_engine::gpu::{cpu_ref, GpuBuffer, GpuContext, GpuOptions};

/// One device for the whole test binary (pipelines are cached on it).
fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let name = std::env::var("FEDSB_ADAPTER").ok();
        let options = GpuOptions { adapter: name.as_deref() };
        let ctx = pollster::block_on(GpuContext::new(&options))
            .unwrap_or_else(|e| panic!("GPU kernel tests need a wgpu adapter (lavapipe is enough): {e}"));
        eprintln!("gpu tests on adapter: {}", ctx.adapter_name());
        ctx
    })
}

/// SplitMix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

fn read(buf: &GpuBuffer) -> Vec<f32> {
    pollster::block_on(ctx().read_f32(buf)).expect("read-back")
}

/// Fails listing the first mismatches (index, actual, expected, difference) where
/// `|actual - expected| > atol + rtol·|expected|`.
#[track_caller]
fn assert_close(what: &str, actual: &[f32], expected: &[f32], atol: f32, rtol: f32) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let mut bad = Vec::new();
    let mut worst = 0.0f32;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let diff = (a - e).abs();
        worst = worst.max(diff);
        if !(diff <= atol + rtol * e.abs()) {
            bad.push((i, a, e, diff));
        }
    }
    if !bad.is_empty() {
        let lines: Vec<String> = bad
            .iter()
            .take(10)
            .map(|(i, a, e, d)| format!("  index {i}: actual {a}, expected {e}, difference {d}"))
            .collect();
        panic!(
            "{what}: {} of {} values differ beyond atol {atol} + rtol {rtol}:\n{}",
            bad.len(),
            actual.len(),
            lines.join("\n")
        );
    }
    eprintln!("{what}: {} values, max abs difference {worst:e}", actual.len());
}

// ---------------------------------------------------------------- matmul

fn check_gemm(rng: &mut Rng, g: Gemm, with_bias: bool, a_len: usize, b_len: usize, c_len: usize) {
    let ctx = ctx();
    let a = rng.vec(a_len);
    let b = rng.vec(b_len);
    let bias = rng.vec(g.n);
    let c0 = rng.vec(c_len);
    let (ga, gb, gbias, gc) = (
        ctx.buffer_f32("a", &a),
        ctx.buffer_f32("b", &b),
        ctx.buffer_f32("bias", &bias),
        ctx.buffer_f32("c", &c0),
    );
    let mut enc = ctx.encoder();
    matmul::gemm(ctx, &mut enc, &g, &ga, &gb, with_bias.then_some(&gbias), &gc).expect("gemm launch");
    ctx.submit(enc);
    let mut expected = c0.clone();
    cpu_ref::gemm(&g, &a, &b, with_bias.then_some(&bias[..]), &mut expected);
    let what = format!(
        "gemm m={} n={} k={} ta={} tb={} acc={} bias={} batch={:?}",
        g.m, g.n, g.k, g.trans_a, g.trans_b, g.accumulate, with_bias, g.batch
    );
    // f32 sums of up to a few hundred products of values in [-1, 1].
    assert_close(&what, &read(&gc), &expected, 1e-4, 1e-4);
}

#[test]
fn matmul_matches_reference() {
    let mut rng = Rng(1);
    for (m, k, n) in [(37, 61, 53), (1, 1, 1), (130, 200, 70), (64, 16, 64), (5, 300, 3)] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut g = Gemm::new(m, n, k);
            if ta {
                g = g.trans_a();
            }
            if tb {
                g = g.trans_b();
            }
            check_gemm(&mut rng, g, false, m * k, k * n, m * n);
            check_gemm(&mut rng, g.alpha(0.5).accumulate(), true, m * k, k * n, m * n);
        }
    }
}

#[test]
fn matmul_linear_layer_matches_reference() {
    // X·Wᵀ + b, dY·W and dYᵀ·X through the linear-layer helpers.
    let ctx = ctx();
    let mut rng = Rng(2);
    let (rows, inf, outf) = (37, 61, 53);
    let x = rng.vec(rows * inf);
    let w = rng.vec(outf * inf);
    let bias = rng.vec(outf);
    let dy = rng.vec(rows * outf);
    let (gx, gw, gbias, gdy) = (
        ctx.buffer_f32("x", &x),
        ctx.buffer_f32("w", &w),
        ctx.buffer_f32("b", &bias),
        ctx.buffer_f32("dy", &dy),
    );
    let gy = ctx.buffer_zeros("y", rows * outf);
    let gdx = ctx.buffer_zeros("dx", rows * inf);
    let gdw = ctx.buffer_zeros("dw", outf * inf);
    let mut enc = ctx.encoder();
    matmul::linear_forward(ctx, &mut enc, &gx, &gw, Some(&gbias), &gy, rows, inf, outf).unwrap();
    matmul::linear_backward_input(ctx, &mut enc, &gdy, &gw, &gdx, rows, inf, outf, false).unwrap();
    matmul::linear_backward_weight(ctx, &mut enc, &gdy, &gx, &gdw, rows, inf, outf, false).unwrap();
    ctx.submit(enc);

    let mut y = vec![0.0; rows * outf];
    let mut dx = vec![0.0; rows * inf];
    let mut dw = vec![0.0; outf * inf];
    for r in 0..rows {
        for o in 0..outf {
            y[r * outf + o] = bias[o] + (0..inf).map(|i| x[r * inf + i] * w[o * inf + i]).sum::<f32>();
        }
        for i in 0..inf {
            dx[r * inf + i] = (0..outf).map(|o| dy[r * outf + o] * w[o * inf + i]).sum();
        }
    }
    for o in 0..outf {
        for i in 0..inf {
            dw[o * inf + i] = (0..rows).map(|r| dy[r * outf + o] * x[r * inf + i]).sum();
        }
    }
    assert_close("linear forward", &read(&gy), &y, 1e-4, 1e-4);
    assert_close("linear dX", &read(&gdx), &dx, 1e-4, 1e-4);
    assert_close("linear dW", &read(&gdw), &dw, 1e-4, 1e-4);
}

#[test]
fn matmul_batched_strided_matches_reference() {
    // Attention-shaped: per (sequence, head) Q·Kᵀ on [B, T, H·D] storage.
    let mut rng = Rng(3);
    let (bsz, t, h, d) = (3, 37, 5, 13);
    let hidden = h * d;
    let g = Gemm::new(t, t, d)
        .trans_b()
        .ld(hidden, hidden, t)
        .alpha(0.25)
        .batched(bsz, h, [t * hidden, d], [t * hidden, d], [h * t * t, t * t]);
    check_gemm(&mut rng, g, false, bsz * t * hidden, bsz * t * hidden, bsz * h * t * t);
    // With offsets (B starts one row in).
    let g2 = Gemm::new(t - 1, 7, d).ld(hidden, hidden, 9).offsets(d, hidden, 2).batched(bsz, h, [t * hidden, d], [t * hidden, d], [h * 9 * t, 9 * t]);
    check_gemm(&mut rng, g2, true, bsz * t * hidden, bsz * t * hidden, bsz * h * 9 * t);
}

#[test]
fn matmul_rejects_short_buffers() {
    let ctx = ctx();
    let a = ctx.buffer_zeros("a", 10);
    let b = ctx.buffer_zeros("b", 10);
    let c = ctx.buffer_zeros("c", 10);
    let mut enc = ctx.encoder();
    let err = matmul::gemm(ctx, &mut enc, &Gemm::new(4, 4, 4), &a, &b, None, &c);
    assert!(err.is_err(), "a 4x4x4 product on 10-element buffers must be rejected");
}


// ---------------------------------------------------------------- gelu

#[test]
fn gelu_matches_reference() {
    let ctx = ctx();
    let mut rng = Rng(4);
    // 1000 values over [-6, 6] (the erf approximation's whole range of interest),
    // plus exact points; 1003 is not a multiple of the 256-wide workgroup.
    let mut x: Vec<f32> = (0..1000).map(|_| 6.0 * rng.uniform()).collect();
    x.extend([0.0, -10.0, 10.0]);
    let dy = rng.vec(x.len());
    let n = x.len();
    let (gx, gdy, gy, gdx) = (ctx.buffer_f32("x", &x), ctx.buffer_f32("dy", &dy), ctx.buffer_zeros("y", n), ctx.buffer_zeros("dx", n));
    let mut enc = ctx.encoder();
    gelu::gelu_forward(ctx, &mut enc, &gx, &gy, n).unwrap();
    gelu::gelu_backward(ctx, &mut enc, &gx, &gdy, &gdx, n).unwrap();
    ctx.submit(enc);
    let y: Vec<f32> = x.iter().map(|&v| cpu_ref::gelu(v)).collect();
    let dx: Vec<f32> = x.iter().zip(&dy).map(|(&v, &d)| d * cpu_ref::gelu_grad(v)).collect();
    // erf approximation error 1.5e-7, times |x|/2 <= 5 for the forward.
    assert_close("gelu forward", &read(&gy), &y, 1e-6, 1e-5);
    assert_close("gelu backward", &read(&gdx), &dx, 1e-6, 1e-5);
}

#[test]
fn gelu_reference_is_exact() {
    // The f64 erf behind the reference, against tabulated values.
    for (x, e) in [(0.5, 0.520_499_877_813_046_5), (1.0, 0.842_700_792_949_714_9), (2.0, 0.995_322_265_018_952_7), (3.0, 0.999_977_909_503_001_4)] {
        assert!((cpu_ref::erf(x) - e).abs() < 1e-14, "erf({x}) = {} != {e}", cpu_ref::erf(x));
        assert!((cpu_ref::erf(-x) + e).abs() < 1e-14);
    }
}

// ---------------------------------------------------------------- layernorm

#[test]
fn layernorm_matches_reference() {
    let ctx = ctx();
    let mut rng = Rng(5);
    // h = 61 (< 64 invocations) and 389 (several per invocation).
    for (rows, h, with_residual) in [(37, 61, false), (37, 61, true), (5, 389, true)] {
        let shape = LayerNormShape { rows, h, eps: 1e-12 };
        let n = rows * h;
        // Offset the inputs so the mean matters.
        let x: Vec<f32> = rng.vec(n).iter().map(|v| 3.0 * v + 0.5).collect();
        let res = rng.vec(n);
        let gamma: Vec<f32> = rng.vec(h).iter().map(|v| 1.0 + 0.5 * v).collect();
        let beta = rng.vec(h);
        let dy = rng.vec(n);
        let (gx, gres, gg, gb, gdy) = (
            ctx.buffer_f32("x", &x),
            ctx.buffer_f32("res", &res),
            ctx.buffer_f32("gamma", &gamma),
            ctx.buffer_f32("beta", &beta),
            ctx.buffer_f32("dy", &dy),
        );
        let (gy, gstats, gdx) = (ctx.buffer_zeros("y", n), ctx.buffer_zeros("stats", 2 * rows), ctx.buffer_zeros("dx", n));
        let r = with_residual.then_some(&gres);
        let mut enc = ctx.encoder();
        layernorm::layernorm_forward(ctx, &mut enc, &shape, &gx, r, &gg, &gb, &gy, &gstats).unwrap();
        layernorm::layernorm_backward(ctx, &mut enc, &shape, &gx, r, &gg, &gstats, &gdy, &gdx).unwrap();
        ctx.submit(enc);
        let rr = with_residual.then_some(&res[..]);
        let (y, stats) = cpu_ref::layernorm_forward(&x, rr, &gamma, &beta, h, 1e-12);
        let dx = cpu_ref::layernorm_backward(&x, rr, &gamma, &dy, h, 1e-12);
        let what = format!("layernorm rows={rows} h={h} residual={with_residual}");
        assert_close(&format!("{what} y"), &read(&gy), &y, 1e-5, 1e-5);
        assert_close(&format!("{what} stats"), &read(&gstats), &stats, 1e-5, 1e-5);
        assert_close(&format!("{what} dx"), &read(&gdx), &dx, 1e-5, 1e-4);
    }
}
