use fedsb_engine::gpu::matmul::{self, Gemm, Variant};
use fedsb_engine::gpu::{GpuContext, GpuOptions};
fn main() {
    let acc = std::env::args().nth(1).as_deref() == Some("acc");
    let reps: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(100);
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions { adapter: None })).unwrap();
    let (m, k, n) = (2048, 384, 384);
    let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
    let b: Vec<f32> = (0..k * n).map(|i| (i % 5) as f32 * 0.1).collect();
    let (ga, gb, gc) = (
        ctx.buffer_f32("a", &a),
        ctx.buffer_f32("b", &b),
        ctx.buffer_zeros("c", m * n),
    );
    let mut g = Gemm::new(m, n, k);
    g.accumulate = acc;
    for round in 0..3 {
        let t = std::time::Instant::now();
        let mut enc = ctx.encoder();
        for _ in 0..reps {
            matmul::gemm_variant(&ctx, &mut enc, &g, Variant::Texture, &ga, &gb, None, &gc)
                .unwrap();
        }
        ctx.submit(enc);
        ctx.wait_idle().unwrap();
        let dt = t.elapsed().as_secs_f64();
        if round > 0 {
            println!("acc={acc}: {:.2} ms per product", dt / reps as f64 * 1e3);
        }
    }
}
