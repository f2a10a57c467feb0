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

use fedsb_engine::gpu::adamw::{self, AdamW};
use fedsb_engine::gpu::attention::{self, AttentionShape};
use fedsb_engine::gpu::embeddings::{self, EmbeddingTables};
use fedsb_engine::gpu::gelu;
use fedsb_engine::gpu::head::{self, HeadShape};
use fedsb_engine::gpu::layernorm::{self, LayerNormShape};
use fedsb_engine::gpu::lora_sb::{self, LoraSbDims};
use fedsb_engine::gpu::matmul::{self, Gemm};
use fedsb_engine::gpu::{cpu_ref, dp, GpuBuffer, GpuContext, GpuOptions, RowLayout};

/// One device for the whole test binary (pipelines are cached on it).
fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let name = std::env::var("FEDSB_ADAPTER").ok();
        let options = GpuOptions {
            adapter: name.as_deref(),
        };
        let ctx = pollster::block_on(GpuContext::new(&options)).unwrap_or_else(|e| {
            panic!("GPU kernel tests need a wgpu adapter (lavapipe is enough): {e}")
        });
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
        // NaN anywhere counts as a mismatch.
        if diff.is_nan() || diff > atol + rtol * e.abs() {
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
    eprintln!(
        "{what}: {} values, max abs difference {worst:e}",
        actual.len()
    );
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
    matmul::gemm(
        ctx,
        &mut enc,
        &g,
        &ga,
        &gb,
        with_bias.then_some(&gbias),
        &gc,
    )
    .expect("gemm launch");
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
    for (m, k, n) in [
        (37, 61, 53),
        (1, 1, 1),
        (130, 200, 70),
        (64, 16, 64),
        (5, 300, 3),
    ] {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let mut g = Gemm::new(m, n, k);
            if ta {
                g = g.trans_a();
            }
            if tb {
                g = g.trans_b();
            }
            check_gemm(&mut rng, g, false, m * k, k * n, m * n);
            check_gemm(
                &mut rng,
                g.alpha(0.5).accumulate(),
                true,
                m * k,
                k * n,
                m * n,
            );
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
            y[r * outf + o] = bias[o]
                + (0..inf)
                    .map(|i| x[r * inf + i] * w[o * inf + i])
                    .sum::<f32>();
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
    check_gemm(
        &mut rng,
        g,
        false,
        bsz * t * hidden,
        bsz * t * hidden,
        bsz * h * t * t,
    );
    // With offsets (B starts one row in).
    let g2 = Gemm::new(t - 1, 7, d)
        .ld(hidden, hidden, 9)
        .offsets(d, hidden, 2)
        .batched(bsz, h, [t * hidden, d], [t * hidden, d], [h * 9 * t, 9 * t]);
    check_gemm(
        &mut rng,
        g2,
        true,
        bsz * t * hidden,
        bsz * t * hidden,
        bsz * h * 9 * t,
    );
}

#[test]
fn matmul_rejects_short_buffers() {
    let ctx = ctx();
    let a = ctx.buffer_zeros("a", 10);
    let b = ctx.buffer_zeros("b", 10);
    let c = ctx.buffer_zeros("c", 10);
    let mut enc = ctx.encoder();
    let err = matmul::gemm(ctx, &mut enc, &Gemm::new(4, 4, 4), &a, &b, None, &c);
    assert!(
        err.is_err(),
        "a 4x4x4 product on 10-element buffers must be rejected"
    );
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
    // The forward pass replaces x by the slopes; the backward pass multiplies
    // the gradient by them in place.
    let (gx, gd, gy) = (
        ctx.buffer_f32("x", &x),
        ctx.buffer_f32("d", &dy),
        ctx.buffer_zeros("y", n),
    );
    let mut enc = ctx.encoder();
    gelu::gelu_forward(ctx, &mut enc, &gx, &gy, n).unwrap();
    gelu::gelu_backward(ctx, &mut enc, &gx, &gd, n).unwrap();
    ctx.submit(enc);
    let y: Vec<f32> = x.iter().map(|&v| cpu_ref::gelu(v)).collect();
    let slope: Vec<f32> = x.iter().map(|&v| cpu_ref::gelu_grad(v)).collect();
    let dx: Vec<f32> = slope.iter().zip(&dy).map(|(&s, &d)| d * s).collect();
    // erf approximation error 1.5e-7, times |x|/2 <= 5 for the forward.
    assert_close("gelu forward", &read(&gy), &y, 1e-6, 1e-5);
    assert_close("gelu slope", &read(&gx), &slope, 1e-6, 1e-5);
    assert_close("gelu backward", &read(&gd), &dx, 1e-6, 1e-5);
    // A buffer shorter than n is refused with its name.
    let short = ctx.buffer_zeros("short", n - 1);
    let mut enc = ctx.encoder();
    let err = gelu::gelu_backward(ctx, &mut enc, &short, &gd, n).unwrap_err();
    assert!(err.to_string().contains("slope has 1002"), "{err}");
}

#[test]
fn gelu_reference_is_exact() {
    // The f64 erf behind the reference, against tabulated values.
    for (x, e) in [
        (0.5, 0.520_499_877_813_046_5),
        (1.0, 0.842_700_792_949_714_9),
        (2.0, 0.995_322_265_018_952_7),
        (3.0, 0.999_977_909_503_001_4),
    ] {
        assert!(
            (cpu_ref::erf(x) - e).abs() < 1e-14,
            "erf({x}) = {} != {e}",
            cpu_ref::erf(x)
        );
        assert!((cpu_ref::erf(-x) + e).abs() < 1e-14);
    }
}

// ---------------------------------------------------------------- profiling

/// Kernel profiling submits every launch alone and times it, and changes no
/// result: GELU of GELU, with a buffer copy recorded between the two launches
/// in the same encoder, equals the reference, and both launches are counted.
/// (Its own device: profiling slows every launch of the device it is on.)
#[test]
fn profiling_times_each_launch_and_keeps_the_results() {
    let name = std::env::var("FEDSB_ADAPTER").ok();
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: name.as_deref(),
    }))
    .expect("a wgpu adapter");
    let n = 1000;
    let x: Vec<f32> = Rng(23).vec(n).iter().map(|v| 3.0 * v).collect();
    let want: Vec<f32> = x.iter().map(|&v| cpu_ref::gelu(cpu_ref::gelu(v))).collect();
    let run = || {
        let (gx, gy, gz, gw) = (
            ctx.buffer_f32("x", &x),
            ctx.buffer_zeros("y", n),
            ctx.buffer_zeros("z", n),
            ctx.buffer_zeros("w", n),
        );
        let mut enc = ctx.encoder();
        gelu::gelu_forward(&ctx, &mut enc, &gx, &gy, n).unwrap();
        enc.copy_buffer_to_buffer(&gy.buffer, 0, &gz.buffer, 0, 4 * n as u64);
        gelu::gelu_forward(&ctx, &mut enc, &gz, &gw, n).unwrap();
        ctx.submit(enc);
        pollster::block_on(ctx.read_f32(&gw)).expect("read-back")
    };
    ctx.set_profiling(true);
    assert_close("gelu(gelu(x)), profiled", &run(), &want, 1e-6, 1e-5);
    let times = ctx.kernel_times();
    assert_eq!(times.len(), 1, "{times:?}");
    assert_eq!(times[0].kernel, "gelu/forward");
    assert_eq!(times[0].workgroups, [4, 1, 1]);
    assert_eq!(times[0].launches, 2);
    assert!(times[0].seconds > 0.0, "{times:?}");
    // Off: nothing is recorded, and the results are the same.
    ctx.set_profiling(false);
    assert_close("gelu(gelu(x))", &run(), &want, 1e-6, 1e-5);
    assert!(ctx.kernel_times().is_empty());
}

// ---------------------------------------------------------------- layernorm

#[test]
fn layernorm_matches_reference() {
    let ctx = ctx();
    let mut rng = Rng(5);
    // h = 61 (< 64 invocations) and 389 (several per invocation).
    for (rows, h, with_residual) in [(37, 61, false), (37, 61, true), (5, 389, true)] {
        let shape = LayerNormShape {
            rows,
            h,
            eps: 1e-12,
        };
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
        let r = with_residual.then_some(&gres);
        let rr = with_residual.then_some(&res[..]);
        let (y, stats) = cpu_ref::layernorm_forward(&x, rr, &gamma, &beta, h, 1e-12);
        let dx = cpu_ref::layernorm_backward(&x, rr, &gamma, &dy, h, 1e-12);
        // Both row layouts; rows = 37 and 5 are not multiples of 8.
        for layout in [RowLayout::Workgroup, RowLayout::Invocation] {
            let (gy, gstats, gdx) = (
                ctx.buffer_zeros("y", n),
                ctx.buffer_zeros("stats", 2 * rows),
                ctx.buffer_zeros("dx", n),
            );
            let mut enc = ctx.encoder();
            layernorm::layernorm_forward(
                ctx, &mut enc, layout, &shape, &gx, r, &gg, &gb, &gy, &gstats,
            )
            .unwrap();
            layernorm::layernorm_backward(
                ctx, &mut enc, layout, &shape, &gx, r, &gg, &gstats, &gdy, &gdx,
            )
            .unwrap();
            ctx.submit(enc);
            let what = format!("layernorm {layout:?} rows={rows} h={h} residual={with_residual}");
            assert_close(&format!("{what} y"), &read(&gy), &y, 1e-5, 1e-5);
            assert_close(&format!("{what} stats"), &read(&gstats), &stats, 1e-5, 1e-5);
            assert_close(&format!("{what} dx"), &read(&gdx), &dx, 1e-5, 1e-4);
        }
    }
}

// ---------------------------------------------------------------- lora_sb

#[test]
fn lora_sb_matches_reference() {
    let ctx = ctx();
    let mut rng = Rng(6);
    // 3 sequences of 13 tokens (rows 39); the last tokens of each are padding.
    let (batch, seq) = (3, 13);
    let d = LoraSbDims {
        rows: batch * seq,
        in_features: 61,
        out_features: 53,
        rank: 11,
    };
    let lengths = [13, 7, 1];
    let sample_of: Vec<u32> = (0..d.rows)
        .map(|t| {
            if t % seq < lengths[t / seq] {
                (t / seq) as u32
            } else {
                u32::MAX
            }
        })
        .collect();
    let x = rng.vec(d.rows * d.in_features);
    let a = rng.vec(d.rank * d.in_features);
    let r = rng.vec(d.rank * d.rank);
    let b = rng.vec(d.out_features * d.rank);
    let y0 = rng.vec(d.rows * d.out_features);
    let mut dy = rng.vec(d.rows * d.out_features);
    // Padding tokens carry a gradient here on purpose: G must still ignore them.
    dy[d.rows * d.out_features - 1] = 5.0;
    let dx0 = rng.vec(d.rows * d.in_features);
    let g = |name: &str, v: &[f32]| ctx.buffer_f32(name, v);
    let (gx, ga, gr, gb, gy, gdy, gdx) = (
        g("x", &x),
        g("a", &a),
        g("r", &r),
        g("b", &b),
        g("y", &y0),
        g("dy", &dy),
        g("dx", &dx0),
    );
    let gsample = ctx.buffer_u32("sample_of", &sample_of);
    let rr = d.rows * d.rank;
    let (gxa, gtmp, gu, ggrad) = (
        ctx.buffer_zeros("xa", rr),
        ctx.buffer_zeros("tmp", rr),
        ctx.buffer_zeros("u", rr),
        ctx.buffer_zeros("grad", batch * d.rank * d.rank),
    );
    let mut enc = ctx.encoder();
    lora_sb::lora_sb_forward(ctx, &mut enc, &d, &gx, &ga, &gr, &gb, &gxa, &gtmp, &gy).unwrap();
    lora_sb::lora_sb_backward_input(ctx, &mut enc, &d, &gdy, &ga, &gr, &gb, &gu, &gtmp, &gdx)
        .unwrap();
    lora_sb::lora_sb_grad_r(ctx, &mut enc, &d, &gu, &gxa, &gsample, batch, seq, &ggrad).unwrap();
    ctx.submit(enc);
    let (xa, y) = cpu_ref::lora_sb_forward(&x, &a, &r, &b, &y0, &d);
    let (dx, grads) = cpu_ref::lora_sb_backward(&x, &dy, &a, &r, &b, &dx0, &sample_of, batch, &d);
    // Sums of up to 61·11·11 products of values in [-1, 1].
    assert_close("lora_sb xa", &read(&gxa), &xa, 1e-4, 1e-4);
    assert_close("lora_sb y", &read(&gy), &y, 1e-3, 1e-4);
    assert_close("lora_sb dx", &read(&gdx), &dx, 1e-3, 1e-4);
    assert_close(
        "lora_sb per-sample grad R",
        &read(&ggrad),
        &grads,
        1e-3,
        1e-4,
    );
    // The one-token sample: G_2 = u_t ⊗ xa_t of its single valid token only.
    assert!(read(&ggrad)[2 * d.rank * d.rank..]
        .iter()
        .any(|&v| v != 0.0));
}

// ---------------------------------------------------------------- attention

#[test]
fn attention_matches_reference() {
    let ctx = ctx();
    let mut rng = Rng(7);
    // 3 sequences of 37 tokens, 3 heads of 13; padding at the ends.
    let s = AttentionShape {
        batch: 3,
        seq: 37,
        heads: 3,
        head_dim: 13,
    };
    let lengths = [37, 20, 1];
    let mask: Vec<u32> = (0..s.batch * s.seq)
        .map(|i| u32::from(i % s.seq < lengths[i / s.seq]))
        .collect();
    let n = s.batch * s.seq * s.heads * s.head_dim;
    let (q, k, v, dctx) = (rng.vec(n), rng.vec(n), rng.vec(n), rng.vec(n));
    let g = |name: &str, x: &[f32]| ctx.buffer_f32(name, x);
    let (gq, gk, gv, gdctx) = (g("q", &q), g("k", &k), g("v", &v), g("dctx", &dctx));
    let gmask = ctx.buffer_u32("mask", &mask);
    let (gp, gdp, gc) = (
        ctx.buffer_zeros("probs", s.probs_len()),
        ctx.buffer_zeros("dprobs", s.probs_len()),
        ctx.buffer_zeros("ctx", n),
    );
    let (gdq, gdk, gdv) = (
        ctx.buffer_zeros("dq", n),
        ctx.buffer_zeros("dk", n),
        ctx.buffer_zeros("dv", n),
    );
    let mut enc = ctx.encoder();
    attention::attention_forward(ctx, &mut enc, &s, &gq, &gk, &gv, &gmask, &gp, &gc).unwrap();
    attention::attention_backward(
        ctx, &mut enc, &s, &gq, &gk, &gv, &gp, &gdctx, &gdp, &gdq, &gdk, &gdv,
    )
    .unwrap();
    ctx.submit(enc);
    let (probs, context) = cpu_ref::attention_forward(&q, &k, &v, &mask, &s);
    let (dq, dk, dv) = cpu_ref::attention_backward(&q, &k, &v, &mask, &dctx, &s);
    assert_close("attention probs", &read(&gp), &probs, 1e-6, 1e-4);
    assert_close("attention context", &read(&gc), &context, 1e-5, 1e-4);
    assert_close("attention dq", &read(&gdq), &dq, 1e-5, 1e-4);
    assert_close("attention dk", &read(&gdk), &dk, 1e-5, 1e-4);
    assert_close("attention dv", &read(&gdv), &dv, 1e-5, 1e-4);
    // Padding keys get exactly zero probability and zero gradient.
    let p = read(&gp);
    assert!(
        p[((2 * s.heads) * s.seq) * s.seq + 1..((2 * s.heads) * s.seq) * s.seq + s.seq]
            .iter()
            .all(|&x| x == 0.0)
    );
}

/// The attention softmax and its backward alone, in both row layouts (the
/// attention test above runs the device's): 3 sequences × 2 heads × 13
/// queries = 78 rows (not a multiple of 8 or 64) of 13 keys; the last
/// sequence has no valid key at all.
#[test]
fn attention_softmax_matches_reference() {
    let ctx = ctx();
    let mut rng = Rng(17);
    let s = AttentionShape {
        batch: 3,
        seq: 13,
        heads: 2,
        head_dim: 7,
    };
    let lengths = [13, 5, 0];
    let mask: Vec<u32> = (0..s.batch * s.seq)
        .map(|i| u32::from(i % s.seq < lengths[i / s.seq]))
        .collect();
    // Scores of a few units, so the max subtraction matters.
    let scores: Vec<f32> = rng.vec(s.probs_len()).iter().map(|v| 8.0 * v).collect();
    let dprobs = rng.vec(s.probs_len());
    let probs = cpu_ref::masked_softmax(&scores, &mask, &s);
    let ds = cpu_ref::masked_softmax_backward(&probs, &dprobs, &s);
    for layout in [RowLayout::Workgroup, RowLayout::Invocation] {
        let (gp, gdp) = (
            ctx.buffer_f32("scores", &scores),
            ctx.buffer_f32("dprobs", &dprobs),
        );
        let gmask = ctx.buffer_u32("mask", &mask);
        let mut enc = ctx.encoder();
        attention::softmax_forward(ctx, &mut enc, &s, layout, &gmask, &gp).unwrap();
        ctx.submit(enc);
        let got = read(&gp);
        assert_close(&format!("softmax {layout:?}"), &got, &probs, 1e-6, 1e-5);
        // Padding keys and the row without keys: exactly 0.
        for (r, row) in got.chunks(s.seq).enumerate() {
            let b = r / (s.heads * s.seq);
            assert!(
                row[lengths[b]..].iter().all(|&x| x == 0.0),
                "{layout:?} row {r}"
            );
        }
        // The backward from the reference probabilities.
        let gp = ctx.buffer_f32("probs", &probs);
        let mut enc = ctx.encoder();
        attention::softmax_backward(ctx, &mut enc, &s, layout, &gp, &gdp).unwrap();
        ctx.submit(enc);
        assert_close(
            &format!("softmax backward {layout:?}"),
            &read(&gdp),
            &ds,
            1e-6,
            1e-5,
        );
    }
}

// ---------------------------------------------------------------- adamw

#[test]
fn adamw_matches_reference() {
    let ctx = ctx();
    let n = 1037;
    // The last 300 elements (from 737, not a multiple of the workgroup
    // size) are a head at a quarter of the rate; a split at n has none.
    for (split, head_lr_scale) in [(737, 0.25), (n, 1.0), (n, 0.25), (0, 0.5)] {
        let mut rng = Rng(8);
        let param = rng.vec(n);
        let opt = AdamW {
            lr: 1e-2,
            head_lr_scale,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let grads: Vec<Vec<f32>> = (0..3).map(|_| rng.vec(n)).collect();
        let (gp, gm, gv) = (
            ctx.buffer_f32("param", &param),
            ctx.buffer_zeros("m", n),
            ctx.buffer_zeros("v", n),
        );
        for (step, g) in grads.iter().enumerate() {
            let gg = ctx.buffer_f32("grad", g);
            let mut enc = ctx.encoder();
            adamw::adamw_step(
                ctx,
                &mut enc,
                &opt,
                step as u32 + 1,
                n,
                split,
                &gg,
                &gp,
                &gm,
                &gv,
            )
            .unwrap();
            ctx.submit(enc);
        }
        let got = read(&gp);
        let expected = cpu_ref::adamw(&param, &grads, &opt, split);
        let what = format!("adamw 3 steps, head from {split} at ×{head_lr_scale}");
        assert_close(&what, &got, &expected, 1e-6, 1e-5);
        // The head's rate really applied: three steps at the body's rate
        // would differ there by far more than the tolerance.
        if split < n && head_lr_scale != 1.0 {
            let body_rate = cpu_ref::adamw(&param, &grads, &opt, n);
            let i = n - 1;
            assert!(
                (got[i] - body_rate[i]).abs() > 1e-3,
                "{what}: element {i} moved at the body's rate"
            );
        }
    }
}

#[test]
fn adamw_refuses_a_head_past_the_parameters() {
    let ctx = ctx();
    let n = 10;
    let b = ctx.buffer_zeros("b", n);
    let mut enc = ctx.encoder();
    let e = adamw::adamw_step(
        ctx,
        &mut enc,
        &AdamW::default(),
        1,
        n,
        n + 1,
        &b,
        &b,
        &b,
        &b,
    )
    .unwrap_err();
    assert!(e.to_string().contains("head starts at 11"), "{e}");
}

// ---------------------------------------------------------------- head

#[test]
fn head_matches_reference() {
    let s = HeadShape {
        batch: 5,
        seq: 13,
        hidden: 71,
        classes: 3,
    };
    // Sample 3 has no valid token: pooled must be 0, not NaN.
    check_head(s, &[13, 4, 1, 0, 9], 9);
}

/// More than 65,535 token rows (a large DP-SGD batch: 1,031 sequences of 67
/// tokens), which no single dispatch dimension can hold.
#[test]
fn head_with_more_than_65535_token_rows_matches_reference() {
    let s = HeadShape {
        batch: 1031,
        seq: 67,
        hidden: 5,
        classes: 2,
    };
    let lengths: Vec<usize> = (0..s.batch).map(|n| (n * 7) % (s.seq + 1)).collect();
    check_head(s, &lengths, 19);
}

/// Runs every head kernel on random data with `lengths[n]` valid tokens in
/// sample `n` and compares with the CPU reference.
fn check_head(s: HeadShape, lengths: &[usize], seed: u64) {
    let ctx = ctx();
    let mut rng = Rng(seed);
    let mask: Vec<u32> = (0..s.batch * s.seq)
        .map(|i| u32::from(i % s.seq < lengths[i / s.seq]))
        .collect();
    let labels: Vec<u32> = (0..s.batch)
        .map(|_| rng.below(s.classes as u64) as u32)
        .collect();
    let x = rng.vec(s.batch * s.seq * s.hidden);
    let w = rng.vec(s.classes * s.hidden);
    let bias = rng.vec(s.classes);
    let dpooled = rng.vec(s.batch * s.hidden);
    let g = |name: &str, v: &[f32]| ctx.buffer_f32(name, v);
    let (gx, gw, gbias, gdpooled) = (
        g("x", &x),
        g("w", &w),
        g("b", &bias),
        g("dpooled", &dpooled),
    );
    let (gmask, glabels) = (
        ctx.buffer_u32("mask", &mask),
        ctx.buffer_u32("labels", &labels),
    );
    let nc = s.batch * s.classes;
    let (gpooled, glogits, gloss, gdlogits) = (
        ctx.buffer_zeros("pooled", s.batch * s.hidden),
        ctx.buffer_zeros("logits", nc),
        ctx.buffer_zeros("loss", s.batch),
        ctx.buffer_zeros("dlogits", nc),
    );
    let (gdx, gdw, gdb) = (
        ctx.buffer_zeros("dx", x.len()),
        ctx.buffer_zeros("dw", nc * s.hidden),
        ctx.buffer_zeros("db", nc),
    );
    let scale = 1.0 / s.batch as f32;
    let mut enc = ctx.encoder();
    head::mean_pool_forward(ctx, &mut enc, &s, &gmask, &gx, &gpooled).unwrap();
    head::head_logits(ctx, &mut enc, &s, &gpooled, &gw, &gbias, &glogits).unwrap();
    head::softmax_cross_entropy(
        ctx, &mut enc, &s, &glogits, &glabels, scale, &gloss, &gdlogits,
    )
    .unwrap();
    head::head_grad_per_sample(ctx, &mut enc, &s, &gpooled, &gdlogits, &gdw, &gdb).unwrap();
    head::mean_pool_backward(ctx, &mut enc, &s, &gmask, &gdpooled, &gdx).unwrap();
    ctx.submit(enc);

    let pooled = cpu_ref::mean_pool(&x, &mask, &s);
    let mut logits = vec![0.0; nc];
    let gemm = Gemm::new(s.batch, s.classes, s.hidden).trans_b();
    cpu_ref::gemm(&gemm, &pooled, &w, Some(&bias), &mut logits);
    let (loss, dlogits) = cpu_ref::softmax_cross_entropy(&logits, &labels, s.classes, scale);
    let mut dw = vec![0.0; nc * s.hidden];
    for n in 0..s.batch {
        for c in 0..s.classes {
            for k in 0..s.hidden {
                dw[(n * s.classes + c) * s.hidden + k] =
                    dlogits[n * s.classes + c] * pooled[n * s.hidden + k];
            }
        }
    }
    let dx = cpu_ref::mean_pool_backward(&dpooled, &mask, &s);
    assert_close("mean pool", &read(&gpooled), &pooled, 1e-6, 1e-5);
    assert_close("logits", &read(&glogits), &logits, 1e-5, 1e-5);
    assert_close("cross-entropy loss", &read(&gloss), &loss, 1e-5, 1e-5);
    assert_close("dlogits", &read(&gdlogits), &dlogits, 1e-6, 1e-5);
    assert_close("per-sample head dW", &read(&gdw), &dw, 1e-6, 1e-5);
    assert_close("per-sample head db", &read(&gdb), &dlogits, 1e-6, 1e-5);
    assert_close("mean pool backward", &read(&gdx), &dx, 1e-6, 1e-5);
}

// ---------------------------------------------------------------- embeddings

#[test]
fn embeddings_matches_reference() {
    let ctx = ctx();
    let mut rng = Rng(10);
    let (vocab, positions, types, hidden, batch, seq) = (101, 40, 2, 67, 3, 37);
    let rows = batch * seq;
    let ids: Vec<u32> = (0..rows).map(|_| rng.below(vocab as u64) as u32).collect();
    let type_ids: Vec<u32> = (0..rows).map(|_| rng.below(types as u64) as u32).collect();
    let (word, position, token_type) = (
        rng.vec(vocab * hidden),
        rng.vec(positions * hidden),
        rng.vec(types * hidden),
    );
    let (gw, gp, gt) = (
        ctx.buffer_f32("word", &word),
        ctx.buffer_f32("pos", &position),
        ctx.buffer_f32("type", &token_type),
    );
    let (gids, gtypes, gout) = (
        ctx.buffer_u32("ids", &ids),
        ctx.buffer_u32("type_ids", &type_ids),
        ctx.buffer_zeros("out", rows * hidden),
    );
    let tables = EmbeddingTables {
        word: &gw,
        position: &gp,
        token_type: &gt,
        vocab,
        positions,
        types,
        hidden,
    };
    let mut enc = ctx.encoder();
    embeddings::embeddings_forward(ctx, &mut enc, &tables, &gids, &gtypes, rows, seq, &gout)
        .unwrap();
    ctx.submit(enc);
    let expected = cpu_ref::embeddings(&ids, &type_ids, &word, &position, &token_type, seq, hidden);
    assert_close("embeddings", &read(&gout), &expected, 1e-6, 1e-6);
}

// ---------------------------------------------------------------- context

#[test]
fn context_picks_adapter_by_name() {
    let name = ctx().adapter_name().to_string();
    let prefix: String = name.chars().take(5).collect::<String>().to_uppercase();
    let picked = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: Some(&prefix),
    }))
    .expect("an adapter matching the current one's name prefix (case-insensitive)");
    assert_eq!(picked.adapter_name(), name);
    let missing = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: Some("no-such-adapter-7f3a"),
    }));
    assert!(
        missing.is_err(),
        "a name that matches nothing must be an error"
    );
}

#[test]
fn context_buffers_round_trip() {
    let ctx = ctx();
    let f = [1.5f32, -2.0, 3.25, f32::MAX, 0.0];
    let u = [0u32, 7, u32::MAX];
    assert_eq!(read(&ctx.buffer_f32("f", &f)), f);
    assert_eq!(
        pollster::block_on(ctx.read_u32(&ctx.buffer_u32("u", &u))).unwrap(),
        u
    );
    assert!(read(&ctx.buffer_f32("empty", &[])).is_empty());
    let z = ctx.buffer_zeros("z", 3);
    ctx.write_f32(&z, &[4.0, 5.0]).unwrap();
    assert_eq!(read(&z), [4.0, 5.0, 0.0]);
    assert!(
        ctx.write_f32(&z, &[0.0; 4]).is_err(),
        "writes past the end are rejected"
    );
}

/// Random per-sample gradients: for each segment `s` of `lens[s]` values,
/// `batch` samples, sample `n` scaled by `gain(n, s)` (0 for an all-zero
/// sample, small for one below the clip norm, large for a clipped one).
fn per_sample_segments(
    rng: &mut Rng,
    batch: usize,
    lens: &[usize],
    gain: impl Fn(usize, usize) -> f32,
) -> Vec<Vec<f32>> {
    lens.iter()
        .enumerate()
        .map(|(s, &len)| {
            let mut data = rng.vec(batch * len);
            for n in 0..batch {
                for x in &mut data[n * len..(n + 1) * len] {
                    *x *= gain(n, s);
                }
            }
            data
        })
        .collect()
}

/// Records the DP clipping of one batch of `batch` samples held in segment
/// buffers `bufs` (lengths `lens`): the joint squared norms into `norms`
/// (zeroed), then every segment's clipped sum at its running offset in `out`.
#[allow(clippy::too_many_arguments)]
fn record_dp_clip(
    ctx: &GpuContext,
    enc: &mut wgpu::CommandEncoder,
    bufs: &[GpuBuffer],
    lens: &[usize],
    batch: usize,
    norms: &GpuBuffer,
    clip: f32,
    noise: &GpuBuffer,
    scale: f32,
    out: &GpuBuffer,
    into: dp::SumInto,
) {
    for (buf, &len) in bufs.iter().zip(lens) {
        dp::dp_sq_norms(ctx, enc, buf, batch, len, norms).unwrap();
    }
    let mut offset = 0;
    for (buf, &len) in bufs.iter().zip(lens) {
        dp::dp_clip_sum(
            ctx, enc, buf, batch, len, norms, clip, noise, scale, out, offset, into,
        )
        .unwrap();
        offset += len;
    }
}

/// The CPU reference of [`record_dp_clip`]: the joint squared norms, and
/// `out` after the clipped sums of every segment.
#[allow(clippy::too_many_arguments)]
fn reference_dp_clip(
    segments: &[Vec<f32>],
    lens: &[usize],
    batch: usize,
    clip: f32,
    noise: &[f32],
    scale: f32,
    out: &mut [f32],
    into: dp::SumInto,
) -> Vec<f32> {
    let mut norms = vec![0.0f32; batch];
    for (d, &len) in segments.iter().zip(lens) {
        dp::sq_norms_reference(d, batch, len, &mut norms);
    }
    let mut offset = 0;
    for (d, &len) in segments.iter().zip(lens) {
        dp::clip_sum_reference(d, batch, len, &norms, clip, noise, scale, out, offset, into);
        offset += len;
    }
    norms
}

#[test]
fn dp_clip_matches_reference() {
    use dp::SumInto::Overwrite;
    let mut rng = Rng(0xD9);
    // Segments of odd lengths (not multiples of 64 or 256), 7 samples, one of
    // them all zero (factor 1), some with large norms (clipped), some small.
    let batch = 7;
    let lens = [9usize, 300, 1, 70];
    let total: usize = lens.iter().sum();
    let clip = 2.5f32;
    let scale = 1.0 / 5.3f32;
    let segments = per_sample_segments(&mut rng, batch, &lens, |n, s| match n {
        3 => 0.0,
        1 | 5 => 0.01,
        _ => 1.0 + s as f32,
    });
    let noise = rng.vec(total);
    let ctx = ctx();
    let norms_gpu = ctx.buffer_zeros("norms", batch);
    let noise_gpu = ctx.buffer_f32("noise", &noise);
    let out_gpu = ctx.buffer_zeros("out", total);
    let bufs: Vec<_> = segments.iter().map(|d| ctx.buffer_f32("g", d)).collect();
    let mut enc = ctx.encoder();
    record_dp_clip(
        ctx, &mut enc, &bufs, &lens, batch, &norms_gpu, clip, &noise_gpu, scale, &out_gpu,
        Overwrite,
    );
    ctx.submit(enc);

    let mut out = vec![0.0f32; total];
    let norms = reference_dp_clip(
        &segments, &lens, batch, clip, &noise, scale, &mut out, Overwrite,
    );
    assert_close("dp norms", &read(&norms_gpu), &norms, 1e-5, 1e-5);
    assert_close("dp clipped sum", &read(&out_gpu), &out, 1e-5, 1e-4);
    // The reference really clipped something and left small samples alone.
    assert!(norms.iter().any(|&s| s.sqrt() > clip));
    assert!(norms.iter().any(|&s| s > 0.0 && s.sqrt() < clip));

    // An empty batch writes noise · scale.
    let out0 = ctx.buffer_zeros("out0", total);
    let mut enc = ctx.encoder();
    dp::dp_clip_sum(
        ctx, &mut enc, &noise_gpu, 0, total, &norms_gpu, clip, &noise_gpu, scale, &out0, 0,
        Overwrite,
    )
    .unwrap();
    ctx.submit(enc);
    let expected: Vec<f32> = noise.iter().map(|&x| x * scale).collect();
    assert_close("dp empty batch", &read(&out0), &expected, 1e-6, 1e-6);

    // Bad arguments are refused.
    let mut enc = ctx.encoder();
    assert!(dp::dp_sq_norms(ctx, &mut enc, &bufs[0], batch + 1, lens[0], &norms_gpu).is_err());
    assert!(dp::dp_clip_sum(
        ctx, &mut enc, &bufs[0], batch, lens[0], &norms_gpu, 0.0, &noise_gpu, scale, &out_gpu, 0,
        Overwrite,
    )
    .is_err());
}

#[test]
fn dp_clip_accumulate_matches_reference() {
    use dp::SumInto::*;
    let mut rng = Rng(0xACC);
    // A batch of 7 clipped in two chunks (4 + 3 samples) into a buffer that
    // already holds values; segments of odd lengths (not multiples of 64 or
    // 256, one longer than a 256-wide workgroup, one of a single value).
    let batch = 7;
    let split = 4;
    let lens = [9usize, 300, 1, 70, 513];
    let total: usize = lens.iter().sum();
    let clip = 1.7f32;
    let scale = 1.0 / 6.1f32;
    let segments = per_sample_segments(&mut rng, batch, &lens, |n, s| match n {
        2 => 0.0,
        0 | 6 => 0.01,
        _ => 0.5 + s as f32,
    });
    let noise = rng.vec(total);
    let start = rng.vec(total);
    let ctx = ctx();
    let noise_gpu = ctx.buffer_f32("noise", &noise);
    let zeros_gpu = ctx.buffer_zeros("zero noise", total);

    // Chunk c's per-sample values of every segment.
    let chunks = [0..split, split..batch];
    let chunk_data: Vec<Vec<Vec<f32>>> = chunks
        .iter()
        .map(|r| {
            segments
                .iter()
                .zip(&lens)
                .map(|(d, &len)| d[r.start * len..r.end * len].to_vec())
                .collect()
        })
        .collect();

    // 1. Accumulating onto arbitrary values, with noise: against the reference.
    let out_gpu = ctx.buffer_f32("out", &start);
    let norms_gpu = ctx.buffer_zeros("norms", chunks[1].len());
    let bufs: Vec<_> = chunk_data[1]
        .iter()
        .map(|d| ctx.buffer_f32("g", d))
        .collect();
    let mut enc = ctx.encoder();
    record_dp_clip(
        ctx,
        &mut enc,
        &bufs,
        &lens,
        chunks[1].len(),
        &norms_gpu,
        clip,
        &noise_gpu,
        scale,
        &out_gpu,
        Accumulate,
    );
    ctx.submit(enc);
    // The reference for chunk 1 over `start`, written or added.
    let chunk1_reference = |into| {
        let mut out = start.clone();
        let norms = reference_dp_clip(
            &chunk_data[1],
            &lens,
            chunks[1].len(),
            clip,
            &noise,
            scale,
            &mut out,
            into,
        );
        (norms, out)
    };
    let (chunk_norms, expected) = chunk1_reference(Accumulate);
    assert_close(
        "dp chunk norms",
        &read(&norms_gpu),
        &chunk_norms,
        1e-5,
        1e-5,
    );
    assert_close("dp accumulated sum", &read(&out_gpu), &expected, 1e-5, 1e-4);
    // It really added: the overwriting reference differs from it.
    let (_, overwritten) = chunk1_reference(Overwrite);
    for ((e, o), s) in expected.iter().zip(&overwritten).zip(&start) {
        assert!((e - (o + s)).abs() <= 1e-5 * (1.0 + e.abs()));
    }

    // 2. Both chunks (the first overwriting with the noise, the second
    //    accumulating with zero noise) equal one pass over the whole batch.
    let chunked_gpu = ctx.buffer_f32("chunked", &start);
    let mut enc = ctx.encoder();
    for (c, (r, data)) in chunks.iter().zip(&chunk_data).enumerate() {
        let norms_gpu = ctx.buffer_zeros("norms", r.len());
        let bufs: Vec<_> = data.iter().map(|d| ctx.buffer_f32("g", d)).collect();
        let (into, noise) = if c == 0 {
            (Overwrite, &noise_gpu)
        } else {
            (Accumulate, &zeros_gpu)
        };
        record_dp_clip(
            ctx,
            &mut enc,
            &bufs,
            &lens,
            r.len(),
            &norms_gpu,
            clip,
            noise,
            scale,
            &chunked_gpu,
            into,
        );
    }
    ctx.submit(enc);
    let mut whole = vec![0.0f32; total];
    let norms = reference_dp_clip(
        &segments, &lens, batch, clip, &noise, scale, &mut whole, Overwrite,
    );
    assert!(norms.iter().any(|&s| s.sqrt() > clip));
    assert!(norms.iter().any(|&s| s > 0.0 && s.sqrt() < clip));
    assert_close("dp chunked sum", &read(&chunked_gpu), &whole, 1e-5, 1e-4);
}
