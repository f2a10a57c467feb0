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

use fedsb_engine::gpu::matmul::{self, Gemm};
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

#[allow(dead_code)]
fn unused(rng: &mut Rng) -> u64 {
    rng.below(2)
}
