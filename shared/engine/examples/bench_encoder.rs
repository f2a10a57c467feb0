//! Throughput of the whole GPU encoder on all-MiniLM-L6-v2: forward-only
//! (embeddings) and LoRA-SB training steps (forward, backward, AdamW), on
//! synthetic batches of `BATCH` full sequences of `SEQ` tokens.
//!
//! ```text
//! cargo run --release -p fedsb-engine --example bench_encoder [-- BATCH SEQ RANK ITERS]
//! ```
//! Defaults: 32 64 32 3. Needs `models/all-MiniLM-L6-v2` (`cargo xtask fetch-model`).
//!
//! After the first training step it prints the GPU memory the device holds
//! (wgpu's allocator report: the encoder keeps its weights, activations and
//! gradients allocated between steps, so this is the step's working set) and
//! the largest single buffer, against WebGPU's default limits.
//!
//! `FEDSB_ADAPTER_MERGE=never` makes the passes run the LoRA-SB branch beside
//! `W0` instead of multiplying by the merged weights `W0 + B·R·A`
//! (`AdapterMerge`).
//!
//! With `FEDSB_PROFILE_KERNELS=1` it then profiles one forward pass and one
//! training step ([`GpuContext::set_profiling`]: every launch submitted and
//! waited for alone) and prints where each spends its time, by kernel and by
//! kernel and launch size.

use std::time::Instant;

use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::{AdapterMerge, GpuEncoder};
use fedsb_engine::gpu::{GpuContext, GpuOptions, KernelTime};
use fedsb_engine::model::{BertWeights, EncodedBatch};
use fedsb_engine::reference::{ClassifierHead, LoraSbAdapters};

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numbers: BATCH SEQ RANK ITERS"))
        .collect();
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (batch, seq, rank, iters) = (arg(0, 32), arg(1, 64), arg(2, 32), arg(3, 3));
    let dir = std::env::var("FEDSB_MODEL_DIR").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/all-MiniLM-L6-v2").to_owned()
    });
    let weights = BertWeights::from_dir(&dir).expect("model (cargo xtask fetch-model)");
    let name = std::env::var("FEDSB_ADAPTER").ok();
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: name.as_deref(),
    }))
    .expect("a wgpu adapter");
    let c = &weights.config;
    // Synthetic input: [CLS] w... [SEP], all tokens valid.
    let rows = batch * seq;
    let encoded = EncodedBatch {
        input_ids: (0..rows)
            .map(|i| match i % seq {
                0 => 101,
                t if t == seq - 1 => 102,
                t => 1000 + ((i * 7919 + t * 31) % 20000) as u32,
            })
            .collect(),
        token_type_ids: vec![0; rows],
        attention_mask: vec![1; rows],
        batch_size: batch,
        seq_len: seq,
    };
    let labels: Vec<u32> = (0..batch as u32).map(|n| n % 2).collect();
    let adapters = LoraSbAdapters::random(c, rank, 1, 0.05);
    let head = ClassifierHead::init(2, c.hidden_size, 0.02, 2);
    let mut encoder = GpuEncoder::new(&ctx, &weights, Some(&adapters), Some(&head)).unwrap();
    // FEDSB_ADAPTER_MERGE=never: A/B of the merged weights (default: merged).
    let merge = match std::env::var("FEDSB_ADAPTER_MERGE").as_deref() {
        Ok("never") => AdapterMerge::Branch,
        Ok("merged") | Err(_) => AdapterMerge::Merged,
        Ok(other) => panic!("FEDSB_ADAPTER_MERGE={other:?} is neither never nor merged"),
    };
    encoder.set_adapter_merge(merge);
    println!("adapter merge: {merge:?}");
    println!(
        "adapter {}, batch {batch}, seq {seq}, rank {rank}, {iters} timed iterations after one warm-up",
        ctx.adapter_name()
    );
    pollster::block_on(encoder.embed(&encoded)).unwrap();
    let t = Instant::now();
    for _ in 0..iters {
        pollster::block_on(encoder.embed(&encoded)).unwrap();
    }
    let s = t.elapsed().as_secs_f64() / iters as f64;
    println!(
        "forward only: {:.3} s/batch, {:.2} samples/s",
        s,
        batch as f64 / s
    );
    let opt = AdamW::default();
    pollster::block_on(encoder.train_step(&encoded, &labels, &opt)).unwrap();
    match ctx.device.generate_allocator_report() {
        Some(r) => {
            let largest = r.allocations.iter().map(|a| a.size).max().unwrap_or(0);
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            println!(
                "GPU memory after a training step: {:.1} MiB allocated in {} buffers ({:.1} MiB reserved); \
                 largest buffer {:.1} MiB (WebGPU default limits: 128 MiB per storage binding, 256 MiB per buffer)",
                mib(r.total_allocated_bytes),
                r.allocations.len(),
                mib(r.total_reserved_bytes),
                mib(largest)
            );
        }
        None => println!("GPU memory: this backend gives no allocator report"),
    }
    let t = Instant::now();
    for _ in 0..iters {
        pollster::block_on(encoder.train_step(&encoded, &labels, &opt)).unwrap();
    }
    let s = t.elapsed().as_secs_f64() / iters as f64;
    println!(
        "training step (forward, backward, AdamW): {:.3} s/batch, {:.2} samples/s",
        s,
        batch as f64 / s
    );
    if std::env::var_os("FEDSB_PROFILE_KERNELS").is_some() {
        ctx.set_profiling(true);
        pollster::block_on(encoder.embed(&encoded)).unwrap();
        print_profile("forward only", &ctx.kernel_times());
        ctx.set_profiling(true);
        pollster::block_on(encoder.train_step(&encoded, &labels, &opt)).unwrap();
        print_profile("training step", &ctx.kernel_times());
        ctx.set_profiling(false);
    }
}

/// Seconds per kernel (all launch sizes together), then the 15 largest
/// kernel-and-size entries.
fn print_profile(what: &str, times: &[KernelTime]) {
    let total: f64 = times.iter().map(|t| t.seconds).sum();
    let mut by_kernel: Vec<(&str, u64, f64)> = Vec::new();
    for t in times {
        match by_kernel.iter_mut().find(|k| k.0 == t.kernel) {
            Some(k) => {
                k.1 += t.launches;
                k.2 += t.seconds;
            }
            None => by_kernel.push((&t.kernel, t.launches, t.seconds)),
        }
    }
    by_kernel.sort_by(|a, b| b.2.total_cmp(&a.2));
    println!("\nprofile of one {what}: {total:.3} s in kernels launched one by one");
    println!("| kernel | launches | seconds | share |\n|---|---|---|---|");
    for (k, n, sec) in &by_kernel {
        println!("| {k} | {n} | {sec:.3} | {:.1} % |", 100.0 * sec / total);
    }
    println!("\n| kernel | workgroups | launches | ms per launch | share |\n|---|---|---|---|---|");
    for t in times.iter().take(15) {
        println!(
            "| {} | {:?} | {} | {:.2} | {:.1} % |",
            t.kernel,
            t.workgroups,
            t.launches,
            1e3 * t.seconds / t.launches as f64,
            100.0 * t.seconds / total
        );
    }
}
