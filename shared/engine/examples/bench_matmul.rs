//! Matmul throughput of `gpu::matmul` in GFLOP/s on one adapter.
//!
//! ```text
//! cargo run --release -p fedsb-engine --example bench_matmul [-- --adapter llvmpipe] [--seconds 2]
//! ```
//!
//! For each (M, K, N) it times `C[M,N] = A[M,K]·B[K,N]` (plain) and the linear
//! layer form `A·Bᵀ` (B stored N×K), after a warm-up, with enough launches per
//! submission to run for about `--seconds`, and spot-checks 64 entries of C
//! against an f64 CPU dot product.

use std::time::Instant;

use fedsb_engine::gpu::matmul::{self, Gemm};
use fedsb_engine::gpu::{GpuContext, GpuOptions};

const SHAPES: [(usize, usize, usize); 4] = [
    (2048, 384, 384),
    (2048, 384, 1536),
    (2048, 1536, 384),
    (1024, 1024, 1024),
];

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let adapter = arg("--adapter");
    let seconds: f64 = arg("--seconds")
        .map(|s| s.parse().expect("--seconds N"))
        .unwrap_or(2.0);
    let options = GpuOptions {
        adapter: adapter.as_deref(),
    };
    let ctx = pollster::block_on(GpuContext::new(&options)).expect("a wgpu adapter");
    println!(
        "adapter: {} ({:?})",
        ctx.adapter_name(),
        ctx.adapter_info().backend
    );

    let mut seed = 12345u64;
    let mut rand = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    for (m, k, n) in SHAPES {
        for trans_b in [false, true] {
            let a: Vec<f32> = (0..m * k).map(|_| rand()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rand()).collect();
            let (ga, gb, gc) = (
                ctx.buffer_f32("a", &a),
                ctx.buffer_f32("b", &b),
                ctx.buffer_zeros("c", m * n),
            );
            let g = if trans_b {
                Gemm::new(m, n, k).trans_b()
            } else {
                Gemm::new(m, n, k)
            };
            let run = |reps: usize| {
                let mut enc = ctx.encoder();
                for _ in 0..reps {
                    matmul::gemm(&ctx, &mut enc, &g, &ga, &gb, None, &gc).expect("launch");
                }
                ctx.submit(enc);
                ctx.wait_idle().expect("poll");
            };
            // Warm-up (pipeline compile, first-touch), then size the timed batch.
            run(2);
            let t = Instant::now();
            run(1);
            let one = t.elapsed().as_secs_f64();
            let reps = ((seconds / one).ceil() as usize).clamp(3, 10_000);
            let t = Instant::now();
            run(reps);
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            let gflops = g.flop_count() / dt / 1e9;

            // Spot-check 64 entries.
            let c = pollster::block_on(ctx.read_f32(&gc)).expect("read-back");
            let mut worst = 0.0f64;
            for s in 0..64 {
                let (i, j) = ((s * 7919) % m, (s * 104_729) % n);
                let exact: f64 = (0..k)
                    .map(|l| {
                        let bv = if trans_b { b[j * k + l] } else { b[l * n + j] };
                        a[i * k + l] as f64 * bv as f64
                    })
                    .sum();
                worst = worst.max((c[i * n + j] as f64 - exact).abs());
            }
            let ok = worst < 1e-3;
            println!(
                "M={m:5} K={k:5} N={n:5} {:5}: {gflops:7.1} GFLOP/s ({:.2} ms/launch, {reps} launches) spot-check max |err| {worst:.1e} {}",
                if trans_b { "A·Bᵀ" } else { "A·B" },
                dt * 1e3,
                if ok { "ok" } else { "FAILED" }
            );
            assert!(ok, "matmul spot-check failed");
        }
    }
}
