//! Matmul throughput of `gpu::matmul` in GFLOP/s on one adapter, all kernel
//! variants back to back.
//!
//! ```text
//! cargo run --release -p fedsb-engine --example bench_matmul [-- --adapter llvmpipe] [--seconds 1] [--rounds 3] [--variants texture,subgroup]
//! ```
//!
//! (`FEDSB_ADAPTER=<name>` picks the adapter too, as in the GPU tests.)
//!
//! For each (M, K, N) and each orientation the encoder uses — `A·B` (input
//! gradient `dY·W`), `A·Bᵀ` (linear forward `X·Wᵀ`, B stored N×K) and `Aᵀ·B`
//! (weight gradient `dYᵀ·X`, A stored K×M) — it times the `Tiled`, the `Direct`
//! and (where the device has subgroups of size 8) the `Subgroup` and `Texture`
//! variants (each where it supports the product; `--variants` keeps a subset)
//! in alternation, `--rounds` times each with enough launches per submission
//! to run for about `--seconds`, and prints the best and the median round of
//! each. The machine may be shared, so only numbers from the same run
//! compare. Every variant's C is spot-checked in 64 entries against an f64 CPU dot
//! product. `*` marks the variant `gemm` picks on this adapter.

use std::time::Instant;

use fedsb_engine::gpu::matmul::{self, Gemm, Variant};
use fedsb_engine::gpu::{GpuBuffer, GpuContext, GpuOptions};

const SHAPES: [(usize, usize, usize); 4] = [
    (2048, 384, 384),
    (2048, 384, 1536),
    (2048, 1536, 384),
    (1024, 1024, 1024),
];
const VARIANTS: [Variant; 4] = [
    Variant::Tiled,
    Variant::Direct,
    Variant::Subgroup,
    Variant::Texture,
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    // As the GPU tests: FEDSB_ADAPTER when --adapter is not given.
    let adapter = arg("--adapter").or_else(|| std::env::var("FEDSB_ADAPTER").ok());
    let seconds: f64 = arg("--seconds")
        .map(|s| s.parse().expect("--seconds N"))
        .unwrap_or(1.0);
    let rounds: usize = arg("--rounds")
        .map(|s| s.parse().expect("--rounds N"))
        .unwrap_or(3)
        .max(1);
    let options = GpuOptions {
        adapter: adapter.as_deref(),
    };
    let ctx = pollster::block_on(GpuContext::new(&options)).expect("a wgpu adapter");
    println!(
        "adapter: {} ({:?}, {:?}); subgroups: {}, sizes {:?}; GFLOP/s best / median of {rounds} rounds",
        ctx.adapter_name(),
        ctx.adapter_info().backend,
        ctx.adapter_info().device_type,
        ctx.has_subgroups(),
        ctx.subgroup_sizes()
    );
    // --variants texture,subgroup: only these (default: all the device runs).
    let wanted: Option<Vec<String>> = arg("--variants").map(|v| {
        v.split(',')
            .map(|name| name.trim().to_lowercase())
            .collect()
    });
    let available: Vec<Variant> = VARIANTS
        .into_iter()
        .filter(|v| v.available(&ctx))
        .filter(|v| {
            wanted
                .as_ref()
                .is_none_or(|w| w.contains(&format!("{v:?}").to_lowercase()))
        })
        .collect();
    assert!(
        !available.is_empty(),
        "--variants {wanted:?}: none of tiled, direct, subgroup, texture runs here"
    );

    let mut seed = 12345u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut failed = false;
    for (m, k, n) in SHAPES {
        for (trans_a, trans_b, name) in [
            (false, false, "A·B "),
            (false, true, "A·Bᵀ"),
            (true, false, "Aᵀ·B"),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
            let (ga, gb, gc) = (
                ctx.buffer_f32("a", &a),
                ctx.buffer_f32("b", &b),
                ctx.buffer_zeros("c", m * n),
            );
            let mut g = Gemm::new(m, n, k);
            if trans_a {
                g = g.trans_a();
            }
            if trans_b {
                g = g.trans_b();
            }
            // Tiled (supports every product) stays first, the speed-ups' base.
            let variants: Vec<Variant> = available
                .iter()
                .copied()
                .filter(|v| v.supports(&g))
                .collect();
            let bench = Bench {
                ctx: &ctx,
                g,
                a: &ga,
                b: &gb,
                c: &gc,
            };
            // Warm-up (pipeline compile, first touch), spot-check, size the batches.
            let mut reps = vec![0usize; variants.len()];
            let mut errors = vec![0.0f64; variants.len()];
            for (i, &v) in variants.iter().enumerate() {
                bench.run(v, 1);
                let c = pollster::block_on(ctx.read_f32(&gc)).expect("read-back");
                errors[i] = spot_check(&g, &a, &b, &c);
                let t = Instant::now();
                bench.run(v, 1);
                reps[i] = ((seconds / t.elapsed().as_secs_f64()).ceil() as usize).clamp(1, 10_000);
            }
            let mut rates = vec![vec![]; variants.len()];
            for _ in 0..rounds {
                for (i, &v) in variants.iter().enumerate() {
                    let t = Instant::now();
                    bench.run(v, reps[i]);
                    let dt = t.elapsed().as_secs_f64() / reps[i] as f64;
                    rates[i].push(g.flop_count() / dt / 1e9);
                }
            }
            let picked = Variant::for_gemm(&ctx, &g);
            let cols: Vec<String> = variants
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    let r = &mut rates[i];
                    r.sort_by(f64::total_cmp);
                    let ok = errors[i] < 1e-3;
                    failed |= !ok;
                    format!(
                        "{v:?}{} {:6.1} / {:6.1}{}",
                        if v == picked { "*" } else { " " },
                        r[r.len() - 1],
                        r[r.len() / 2],
                        if ok { "" } else { " FAILED spot-check" }
                    )
                })
                .collect();
            let median = |i: usize| rates[i][rates[i].len() / 2];
            let speedups: Vec<String> = (1..variants.len())
                .map(|i| format!("{:?}/Tiled {:.2}x", variants[i], median(i) / median(0)))
                .collect();
            println!(
                "M={m:5} K={k:5} N={n:5} {name}: {}  (medians: {})",
                cols.join("   "),
                speedups.join(", ")
            );
        }
    }
    assert!(!failed, "matmul spot-check failed");
}

struct Bench<'a> {
    ctx: &'a GpuContext,
    g: Gemm,
    a: &'a GpuBuffer,
    b: &'a GpuBuffer,
    c: &'a GpuBuffer,
}

impl Bench<'_> {
    /// `reps` launches of `variant` in one submission, waited for.
    fn run(&self, variant: Variant, reps: usize) {
        let mut enc = self.ctx.encoder();
        for _ in 0..reps {
            matmul::gemm_variant(
                self.ctx, &mut enc, &self.g, variant, self.a, self.b, None, self.c,
            )
            .expect("launch");
        }
        self.ctx.submit(enc);
        self.ctx.wait_idle().expect("poll");
    }
}

/// Largest |C - exact| over 64 entries.
fn spot_check(g: &Gemm, a: &[f32], b: &[f32], c: &[f32]) -> f64 {
    let (m, n, k) = (g.m, g.n, g.k);
    let mut worst = 0.0f64;
    for s in 0..64 {
        let (i, j) = ((s * 7919) % m, (s * 104_729) % n);
        let exact: f64 = (0..k)
            .map(|l| {
                let av = if g.trans_a {
                    a[l * m + i]
                } else {
                    a[i * k + l]
                };
                let bv = if g.trans_b {
                    b[j * k + l]
                } else {
                    b[l * n + j]
                };
                av as f64 * bv as f64
            })
            .sum();
        worst = worst.max((c[i * n + j] as f64 - exact).abs());
    }
    worst
}
