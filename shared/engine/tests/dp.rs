//! DP-SGD in the engine ([`fedsb_engine::dp`], [`fedsb_engine::gpu::dp`]):
//! - clipping bounds every per-sample joint norm by C and leaves small
//!   gradients untouched;
//! - the seeded noise is N(0, σ²C²) (mean and variance over 100k draws);
//! - Poisson sampling's mean batch size is q·N;
//! - a whole DP step on a tiny random model (GPU per-sample gradients, GPU
//!   clipping, noise, 1/(qN), AdamW) equals the same computation on the CPU
//!   from the per-sample gradients, with the same seeded noise;
//! - a DP gradient computed in chunks of sequences (a batch of 7 forced into
//!   passes of 3, 1 and 6 sequences) equals the one-pass gradient within a
//!   relative 1e-5, with the same per-sample losses.
//!
//! Needs a wgpu adapter (lavapipe is enough).
//!
//! ```text
//! cargo test -p fedsb-engine --test dp
//! ```

use std::sync::OnceLock;

use fedsb_engine::dp::{DpSgdConfig, NoiseSource};
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::{GpuEncoder, GradientMode};
use fedsb_engine::gpu::{cpu_ref, dp, GpuContext, GpuOptions};
use fedsb_engine::model::{BertConfig, BertWeights, EncodedBatch};
use fedsb_engine::reference::{ClassifierHead, LoraSbAdapters};

fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let name = std::env::var("FEDSB_ADAPTER").ok();
        let options = GpuOptions {
            adapter: name.as_deref(),
        };
        pollster::block_on(GpuContext::new(&options))
            .unwrap_or_else(|e| panic!("DP tests need a wgpu adapter (lavapipe is enough): {e}"))
    })
}

fn read(b: &fedsb_engine::gpu::GpuBuffer) -> Vec<f32> {
    pollster::block_on(ctx().read_f32(b)).expect("read-back")
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()
}

#[test]
fn clipping_bounds_every_sample_and_keeps_small_ones() {
    let ctx = ctx();
    let clip = 0.7f32;
    let lens = [16usize, 5, 33];
    let total: usize = lens.iter().sum();
    let mut noise = NoiseSource::seeded_for_tests(1);
    let zeros = ctx.buffer_zeros("noise", total);
    for (sample, gain) in [0.001, 0.05, 0.1, 1.0, 10.0, 1000.0]
        .into_iter()
        .enumerate()
    {
        // One sample spread over three segments.
        let segments: Vec<Vec<f32>> = lens.iter().map(|&l| noise.gaussian(l, gain)).collect();
        let flat: Vec<f32> = segments.concat();
        let before = norm(&flat);
        let bufs: Vec<_> = segments.iter().map(|s| ctx.buffer_f32("g", s)).collect();
        let norms = ctx.buffer_zeros("norms", 1);
        let out = ctx.buffer_zeros("out", total);
        let mut enc = ctx.encoder();
        for (b, &l) in bufs.iter().zip(&lens) {
            dp::dp_sq_norms(ctx, &mut enc, b, 1, l, &norms).unwrap();
        }
        let mut off = 0;
        for (b, &l) in bufs.iter().zip(&lens) {
            dp::dp_clip_sum(
                ctx,
                &mut enc,
                b,
                1,
                l,
                &norms,
                clip,
                &zeros,
                1.0,
                &out,
                off,
                dp::SumInto::Overwrite,
            )
            .unwrap();
            off += l;
        }
        ctx.submit(enc);
        let clipped = read(&out);
        let after = norm(&clipped);
        assert!(
            after <= clip as f64 * (1.0 + 1e-5),
            "sample {sample}: norm {before} clipped to {after} > {clip}"
        );
        if before <= clip as f64 {
            for (a, b) in clipped.iter().zip(&flat) {
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-6),
                    "small gradient changed"
                );
            }
        } else {
            assert!(
                (after - clip as f64).abs() <= 1e-5 * clip as f64,
                "norm {after}"
            );
            // Direction kept.
            let cos = clipped
                .iter()
                .zip(&flat)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                / (after * before);
            assert!(cos > 1.0 - 1e-6, "direction changed: cos {cos}");
        }
    }
}

#[test]
fn seeded_noise_has_mean_zero_and_variance_sigma2_c2() {
    let (sigma, clip) = (1.3, 0.1);
    let std = sigma * clip;
    let n = 100_000;
    let draws = NoiseSource::seeded_for_tests(42).gaussian(n, std);
    let mean = draws.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = draws
        .iter()
        .map(|&x| (x as f64 - mean).powi(2))
        .sum::<f64>()
        / (n - 1) as f64;
    // Standard errors: std/√n for the mean, σ²·√(2/n) for the variance; 5 of each.
    assert!(
        mean.abs() < 5.0 * std / (n as f64).sqrt(),
        "mean {mean} for std {std}"
    );
    let expected = std * std;
    assert!(
        (var - expected).abs() < 5.0 * expected * (2.0 / n as f64).sqrt(),
        "variance {var}, expected {expected}"
    );
    // Tails like a Gaussian: about 4.55 % beyond 2 standard deviations.
    let beyond = draws
        .iter()
        .filter(|&&x| (x as f64).abs() > 2.0 * std)
        .count();
    let frac = beyond as f64 / n as f64;
    assert!(
        (frac - 0.0455).abs() < 0.004,
        "fraction beyond 2 sd: {frac}"
    );
    // Same seed, same stream; OS entropy gives different streams.
    assert_eq!(
        NoiseSource::seeded_for_tests(42).gaussian(8, std),
        draws[..8].to_vec()
    );
    let a = NoiseSource::from_os_entropy().unwrap().gaussian(8, 1.0);
    let b = NoiseSource::from_os_entropy().unwrap().gaussian(8, 1.0);
    assert_ne!(a, b);
    assert!(!NoiseSource::from_os_entropy()
        .unwrap()
        .is_seeded_for_tests());
}

#[test]
fn poisson_sampling_mean_batch_is_qn() {
    let mut rng = NoiseSource::seeded_for_tests(7);
    let (n, q, steps) = (1000, 0.05, 2000);
    let sizes: Vec<usize> = (0..steps).map(|_| rng.poisson_sample(n, q).len()).collect();
    let mean = sizes.iter().sum::<usize>() as f64 / steps as f64;
    // Binomial(n, q): variance nq(1-q); standard error of the mean ≈ 0.15 here.
    let se = (n as f64 * q * (1.0 - q) / steps as f64).sqrt();
    assert!((mean - n as f64 * q).abs() < 5.0 * se, "mean batch {mean}");
    assert!(
        sizes.iter().min() < sizes.iter().max(),
        "batch size never varies"
    );
    // Indices are distinct, sorted and in range; a tiny rate gives empty batches.
    let s = rng.poisson_sample(n, 0.3);
    assert!(s.windows(2).all(|w| w[0] < w[1]) && s.iter().all(|&i| i < n));
    let empties = (0..200)
        .filter(|_| rng.poisson_sample(10, 0.01).is_empty())
        .count();
    assert!(empties > 150, "{empties} empty batches of 200");
    assert_eq!(rng.poisson_sample(17, 1.0).len(), 17);
}

#[test]
fn config_validation_rejects_bad_parameters() {
    let ok = DpSgdConfig {
        noise_multiplier: 1.0,
        clip_norm: 0.1,
        sample_rate: 0.05,
        dataset_size: 100,
    };
    ok.validate().unwrap();
    assert!((ok.expected_batch() - 5.0).abs() < 1e-12);
    assert!((ok.noise_std() - 0.1).abs() < 1e-12);
    for bad in [
        DpSgdConfig {
            clip_norm: 0.0,
            ..ok
        },
        DpSgdConfig {
            sample_rate: 0.0,
            ..ok
        },
        DpSgdConfig {
            sample_rate: 1.5,
            ..ok
        },
        DpSgdConfig {
            noise_multiplier: f64::NAN,
            ..ok
        },
        DpSgdConfig {
            dataset_size: 0,
            ..ok
        },
    ] {
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.starts_with("DP-SGD:"), "{e}");
    }
}

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 40,
        hidden_size: 20,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 29,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        ..BertConfig::default()
    }
}

fn batch_of(rows: &[&[u32]]) -> EncodedBatch {
    let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut b = EncodedBatch {
        batch_size: rows.len(),
        seq_len: seq,
        ..Default::default()
    };
    for ids in rows {
        for t in 0..seq {
            b.input_ids.push(ids.get(t).copied().unwrap_or(0));
            b.token_type_ids.push(0);
            b.attention_mask.push(u32::from(t < ids.len()));
        }
    }
    b
}

/// Token ids of seven sequences of different lengths (at most 8).
const ROWS: [&[u32]; 7] = [
    &[1, 7, 12, 2, 33, 39],
    &[1, 9, 2],
    &[1, 25, 30, 11, 2],
    &[1, 4, 2],
    &[1, 14, 15, 16, 17, 18, 19, 2],
    &[1, 21, 22, 2],
    &[1, 36, 5, 8, 10, 2],
];

/// Random weights, rank-3 adapters and a 3-class head, from `seeds`.
fn tiny_model(
    config: &BertConfig,
    seeds: [u64; 3],
) -> (BertWeights<f32>, LoraSbAdapters<f32>, ClassifierHead<f32>) {
    (
        BertWeights::random(config, seeds[0], 0.3),
        LoraSbAdapters::random(config, 3, seeds[1], 0.5),
        ClassifierHead::init(3, config.hidden_size, 0.8, seeds[2]),
    )
}

#[test]
fn dp_step_on_tiny_model_equals_cpu_computation() {
    let ctx = ctx();
    let config = tiny_config();
    let (weights, adapters, head) = tiny_model(&config, [3, 5, 9]);
    let batch = batch_of(&ROWS[..5]);
    let labels = [2u32, 0, 1, 1, 2];
    let cfg = DpSgdConfig {
        noise_multiplier: 0.8,
        // Small enough that some samples are clipped, large enough that not all.
        clip_norm: 0.0,
        sample_rate: 0.25,
        dataset_size: 16,
    };
    // The head at its own rate: the encoder must step it from its offset.
    let opt = AdamW {
        lr: 0.01,
        head_lr_scale: 0.3,
        ..AdamW::default()
    };

    // Per-sample gradients and the starting parameters.
    let mut probe = GpuEncoder::new(ctx, &weights, Some(&adapters), Some(&head)).unwrap();
    pollster::block_on(probe.loss_and_gradients(&batch, &labels, GradientMode::PerSample)).unwrap();
    let per_sample: Vec<Vec<f32>> = pollster::block_on(probe.read_per_sample_gradients())
        .unwrap()
        .iter()
        .map(|g| g.flatten())
        .collect();
    let start = pollster::block_on(probe.read_trainable())
        .unwrap()
        .flatten();
    let norms: Vec<f64> = per_sample.iter().map(|g| norm(g)).collect();
    let mut sorted = norms.clone();
    sorted.sort_by(f64::total_cmp);
    let clip = (sorted[1] + sorted[2]) / 2.0;
    let cfg = DpSgdConfig {
        clip_norm: clip,
        ..cfg
    };
    assert!(norms.iter().any(|&n| n > clip) && norms.iter().any(|&n| n < clip));

    let noise = NoiseSource::seeded_for_tests(99).gaussian(start.len(), cfg.noise_std());
    let scale = 1.0 / cfg.expected_batch();

    // CPU: clip each sample jointly, sum, add the noise, divide by qN, AdamW.
    let mut expected = vec![0.0f64; start.len()];
    for (g, &n) in per_sample.iter().zip(&norms) {
        let f = (clip / n).min(1.0);
        for (e, &x) in expected.iter_mut().zip(g) {
            *e += x as f64 * f;
        }
    }
    let expected: Vec<f32> = expected
        .iter()
        .zip(&noise)
        .map(|(&s, &z)| ((s + z as f64) * scale) as f32)
        .collect();
    // The head (weight, then bias) ends the parameters.
    let head_start = start.len() - head.weight.data.len() - head.bias.len();
    let expected_params = cpu_ref::adamw(&start, std::slice::from_ref(&expected), &opt, head_start);

    // GPU.
    let mut enc = GpuEncoder::new(ctx, &weights, Some(&adapters), Some(&head)).unwrap();
    let losses = pollster::block_on(enc.dp_gradients(
        Some((&batch, &labels)),
        &noise,
        clip as f32,
        scale as f32,
    ))
    .unwrap();
    assert_eq!(losses.len(), 5);
    let grad = pollster::block_on(enc.read_gradients()).unwrap().flatten();
    let gmax = expected.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (i, (a, e)) in grad.iter().zip(&expected).enumerate() {
        assert!(
            (a - e).abs() <= 1e-4 * gmax,
            "gradient {i}: gpu {a}, cpu {e} (max {gmax})"
        );
    }
    enc.apply_adamw(&opt).unwrap();
    let params = pollster::block_on(enc.read_trainable()).unwrap().flatten();
    for (i, (a, e)) in params.iter().zip(&expected_params).enumerate() {
        assert!(
            (a - e).abs() <= 1e-4 * (1.0 + e.abs()),
            "parameter {i}: gpu {a}, cpu {e}"
        );
    }

    // An empty batch: the gradient is noise/(qN) and the step still happens.
    let noise2 = NoiseSource::seeded_for_tests(100).gaussian(start.len(), cfg.noise_std());
    let losses =
        pollster::block_on(enc.dp_gradients(None, &noise2, clip as f32, scale as f32)).unwrap();
    assert!(losses.is_empty());
    let grad = pollster::block_on(enc.read_gradients()).unwrap().flatten();
    for (a, z) in grad.iter().zip(&noise2) {
        assert!((a - z * scale as f32).abs() <= 1e-6 * (1.0 + z.abs()));
    }
    enc.apply_adamw(&opt).unwrap();
    let after = pollster::block_on(enc.read_trainable()).unwrap().flatten();
    assert_ne!(after, params, "an empty batch still takes a step");

    // Wrong noise length is refused.
    assert!(pollster::block_on(enc.dp_gradients(None, &noise2[1..], 1.0, 1.0)).is_err());
}

#[test]
fn dp_gradients_in_chunks_equal_one_pass() {
    let ctx = ctx();
    let config = tiny_config();
    let (weights, adapters, head) = tiny_model(&config, [5, 6, 7]);
    // Seven samples of different lengths (padded to 8), in chunks of 3, 3, 1.
    let batch = batch_of(&ROWS);
    let labels = [2u32, 0, 1, 1, 2, 0, 2];

    let mut whole = GpuEncoder::new(ctx, &weights, Some(&adapters), Some(&head)).unwrap();
    // A clip norm between the per-sample norms, so that some samples are
    // clipped and some are not.
    pollster::block_on(whole.loss_and_gradients(&batch, &labels, GradientMode::PerSample)).unwrap();
    let mut norms: Vec<f64> = pollster::block_on(whole.read_per_sample_gradients())
        .unwrap()
        .iter()
        .map(|g| norm(&g.flatten()))
        .collect();
    norms.sort_by(f64::total_cmp);
    let clip = ((norms[2] + norms[3]) / 2.0) as f32;
    let noise = NoiseSource::seeded_for_tests(5).gaussian(whole.num_trainable(), 0.3);
    let scale = 1.0 / 6.5f32;

    assert!(
        whole.max_pass_sequences(batch.seq_len, true) >= batch.batch_size,
        "the whole tiny batch fits one pass"
    );
    let losses =
        pollster::block_on(whole.dp_gradients(Some((&batch, &labels)), &noise, clip, scale))
            .unwrap();
    let expected = pollster::block_on(whole.read_gradients())
        .unwrap()
        .flatten();
    assert_eq!(losses.len(), 7);
    let gmax = expected.iter().fold(0f32, |m, x| m.max(x.abs()));

    for chunk in [3, 1, 6] {
        let mut chunked = GpuEncoder::new(ctx, &weights, Some(&adapters), Some(&head)).unwrap();
        chunked.set_max_pass_sequences(Some(chunk));
        let chunk_losses =
            pollster::block_on(chunked.dp_gradients(Some((&batch, &labels)), &noise, clip, scale))
                .unwrap();
        assert_eq!(chunk_losses, losses, "per-sample losses, chunks of {chunk}");
        let grad = pollster::block_on(chunked.read_gradients())
            .unwrap()
            .flatten();
        assert_eq!(grad.len(), expected.len());
        for (i, (a, e)) in grad.iter().zip(&expected).enumerate() {
            assert!(
                (a - e).abs() <= 1e-5 * gmax,
                "chunks of {chunk}, gradient {i}: chunked {a}, one pass {e} (max {gmax})"
            );
        }
        // A second step with the same encoder (buffers now sized for a chunk).
        let again =
            pollster::block_on(chunked.dp_gradients(Some((&batch, &labels)), &noise, clip, scale))
                .unwrap();
        assert_eq!(again, losses);
        let grad2 = pollster::block_on(chunked.read_gradients())
            .unwrap()
            .flatten();
        assert_eq!(
            grad2, grad,
            "chunks of {chunk}: a repeated step is identical"
        );
    }
}
