//! The whole LoRA-SB encoder on the GPU ([`GpuEncoder`]) against the CPU
//! reference ([`ReferenceEncoder`]) on a tiny random model whose sizes are not
//! multiples of any workgroup tile (2 layers, hidden 24, 3 heads, intermediate
//! 37, vocabulary 50, rank 4), with a right-padded batch:
//! - pooled embeddings and logits against the f64 reference within 1e-4;
//! - gradients of every `R` and the head (batch mean and per sample) against
//!   the f64 reference within a relative 1e-3 (of the largest entry of each
//!   tensor); per-sample gradients sum to the batch gradient;
//! - the summed `W0` gradients of LoRA-SB initialization against the reference;
//! - a few AdamW steps on a separable synthetic task reduce the loss;
//! - AdamW's state read back and set again after `set_trainable` continues a
//!   run exactly, and without it the next step differs;
//! - the merged weights `W0 + B·R·A`, kept between passes while `R` is
//!   unchanged, follow every change of `R` (`set_trainable`, `train_step`,
//!   `apply_adamw`): the logits equal those of a new encoder made with the
//!   new `R`;
//! - centring the initial head (`centre_head_bias`) makes every class's mean
//!   logit over the given samples equal and moves each class's logits by one
//!   constant;
//! - a batch whose buffers would exceed the device's storage-buffer limit
//!   fails every pass (training, evaluation, embedding, DP-SGD when even one
//!   sequence is too long) with [`GpuError::BufferLimit`] naming the batch,
//!   the buffer and the limit, before anything is allocated.
//!
//! Needs a wgpu adapter (lavapipe is enough); a missing adapter fails.
//!
//! ```text
//! cargo test -p fedsb-engine --test encoder_gpu
//! ```

use std::sync::OnceLock;

use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::{AdapterMerge, GpuEncoder, GradientMode};
use fedsb_engine::gpu::{GpuContext, GpuError, GpuOptions};
use fedsb_engine::model::{AdaptedLinear, BertConfig, BertWeights, EncodedBatch};
use fedsb_engine::reference::LoraSbInitOptions;
use fedsb_engine::reference::{
    accumulate_weight_gradients, BackwardOptions, ClassifierHead, LoraSbAdapters, Matrix,
    ReferenceEncoder, TrainableGradients,
};
use fedsb_engine::train::{centre_head_bias, gpu_lora_sb_init};

const RANK: usize = 4;
const NUM_LABELS: usize = 3;

fn ctx() -> &'static GpuContext {
    static CTX: OnceLock<GpuContext> = OnceLock::new();
    CTX.get_or_init(|| {
        let name = std::env::var("FEDSB_ADAPTER").ok();
        let options = GpuOptions {
            adapter: name.as_deref(),
        };
        let ctx = pollster::block_on(GpuContext::new(&options)).unwrap_or_else(|e| {
            panic!("GPU encoder tests need a wgpu adapter (lavapipe is enough): {e}")
        });
        eprintln!("gpu tests on adapter: {}", ctx.adapter_name());
        ctx
    })
}

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        intermediate_size: 37,
        max_position_embeddings: 40,
        type_vocab_size: 2,
        ..BertConfig::default()
    }
}

/// Right-padded batch from token rows (first token type 0, a pair when `types` says so).
fn batch_of(rows: &[(&[u32], &[u32])]) -> EncodedBatch {
    let seq = rows.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
    let mut batch = EncodedBatch {
        batch_size: rows.len(),
        seq_len: seq,
        ..Default::default()
    };
    for (ids, types) in rows {
        for t in 0..seq {
            batch.input_ids.push(ids.get(t).copied().unwrap_or(0));
            batch
                .token_type_ids
                .push(types.get(t).copied().unwrap_or(0));
            batch.attention_mask.push(u32::from(t < ids.len()));
        }
    }
    batch
}

/// Four samples padded to 9 tokens: lengths 9 (a pair), 5, 3 and 7.
fn tiny_batch() -> (EncodedBatch, Vec<u32>) {
    let batch = batch_of(&[
        (
            &[1, 7, 12, 2, 33, 41, 49, 18, 2],
            &[0, 0, 0, 0, 1, 1, 1, 1, 1],
        ),
        (&[1, 9, 48, 3, 2], &[0; 5]),
        (&[1, 25, 2], &[0; 3]),
        (&[1, 4, 44, 31, 17, 6, 2], &[0; 7]),
    ]);
    (batch, vec![2, 0, 1, 2])
}

struct Tiny {
    weights: BertWeights<f32>,
    adapters: LoraSbAdapters<f32>,
    head: ClassifierHead<f32>,
}

fn tiny_model() -> Tiny {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 7, 0.3);
    let adapters = LoraSbAdapters::random(&config, RANK, 11, 0.4);
    let mut head = ClassifierHead::init(NUM_LABELS, config.hidden_size, 0.5, 13);
    head.bias = vec![0.1, -0.2, 0.05];
    Tiny {
        weights,
        adapters,
        head,
    }
}

fn assert_close(name: &str, actual: &[f32], expected: &[f64], abs: f64, rel: f64) {
    assert_eq!(actual.len(), expected.len(), "{name}: length");
    let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
    let tol = abs + rel * scale;
    for (i, (&a, &e)) in actual.iter().zip(expected).enumerate() {
        let diff = (a as f64 - e).abs();
        assert!(
            diff <= tol,
            "{name}[{i}]: actual {a}, expected {e}, difference {diff:.3e} > tolerance {tol:.3e}"
        );
    }
}

fn assert_gradients_close(
    name: &str,
    gpu: &TrainableGradients<f32>,
    reference: &TrainableGradients<f64>,
    rel: f64,
) {
    for (l, (lg, lr)) in gpu.r.iter().zip(&reference.r).enumerate() {
        for which in AdaptedLinear::ALL {
            let i = which.index();
            let (g, r) = (lg[i].as_ref().unwrap(), lr[i].as_ref().unwrap());
            assert_close(
                &format!("{name} R {l}.{}", which.checkpoint_name()),
                &g.data,
                &r.data,
                1e-7,
                rel,
            );
        }
    }
    assert_close(
        &format!("{name} head weight"),
        &gpu.head_weight.data,
        &reference.head_weight.data,
        1e-7,
        rel,
    );
    assert_close(
        &format!("{name} head bias"),
        &gpu.head_bias,
        &reference.head_bias,
        1e-7,
        rel,
    );
}

#[test]
fn encoder_forward_matches_reference() {
    let tiny = tiny_model();
    let (batch, _) = tiny_batch();
    let w64 = tiny.weights.map(f64::from);
    let a64 = tiny.adapters.map(f64::from);
    let h64 = tiny.head.map(f64::from);
    let reference = ReferenceEncoder::new(&w64, Some(&a64));
    let mut gpu = GpuEncoder::new(ctx(), &tiny.weights, Some(&tiny.adapters), Some(&tiny.head))
        .expect("upload");
    // With the merged weights W0 + B·R·A and with the LoRA-SB branch beside W0.
    for merge in [AdapterMerge::Merged, AdapterMerge::Branch] {
        gpu.set_adapter_merge(merge);
        let pooled = pollster::block_on(gpu.embed(&batch)).expect("embed");
        assert_close(
            &format!("pooled ({merge:?})"),
            &pooled,
            &reference.mean_pooled(&batch).data,
            1e-4,
            0.0,
        );
        let logits = pollster::block_on(gpu.logits(&batch)).expect("logits");
        assert_close(
            &format!("logits ({merge:?})"),
            &logits,
            &reference.logits(&h64, &batch).data,
            1e-4,
            0.0,
        );
    }
    gpu.set_adapter_merge(AdapterMerge::default());
    let small = batch_of(&[(&[1, 30, 2], &[0; 3]), (&[1, 2], &[0; 2])]);
    let pooled = pollster::block_on(gpu.embed(&small)).expect("embed");
    assert_close(
        "pooled (adapters, smaller batch)",
        &pooled,
        &reference.mean_pooled(&small).data,
        1e-4,
        0.0,
    );

    // Without adapters and head: the plain encoder's embedding.
    let plain_ref = ReferenceEncoder::new(&w64, None);
    let mut plain = GpuEncoder::new(ctx(), &tiny.weights, None, None).expect("upload");
    let pooled = pollster::block_on(plain.embed(&batch)).expect("embed");
    assert_close(
        "pooled (no adapters)",
        &pooled,
        &plain_ref.mean_pooled(&batch).data,
        1e-4,
        0.0,
    );
    // A smaller batch reuses the workspace of the larger one.
    let small = batch_of(&[(&[1, 30, 2], &[0; 3]), (&[1, 2], &[0; 2])]);
    let pooled = pollster::block_on(plain.embed(&small)).expect("embed");
    assert_close(
        "pooled (smaller batch)",
        &pooled,
        &plain_ref.mean_pooled(&small).data,
        1e-4,
        0.0,
    );
}

#[test]
fn encoder_gradients_match_reference() {
    // With the merged weights W0 + B·R·A and with the LoRA-SB branch beside W0.
    for merge in [AdapterMerge::Merged, AdapterMerge::Branch] {
        gradients_match_reference(merge);
    }
}

fn gradients_match_reference(merge: AdapterMerge) {
    let tiny = tiny_model();
    let (batch, labels) = tiny_batch();
    let w64 = tiny.weights.map(f64::from);
    let a64 = tiny.adapters.map(f64::from);
    let h64 = tiny.head.map(f64::from);
    let step = ReferenceEncoder::new(&w64, Some(&a64)).loss_and_gradients(
        &h64,
        &batch,
        &labels,
        BackwardOptions {
            per_sample: true,
            weight_gradients: false,
        },
    );
    let mut gpu = GpuEncoder::new(ctx(), &tiny.weights, Some(&tiny.adapters), Some(&tiny.head))
        .expect("upload");
    gpu.set_adapter_merge(merge);

    let losses =
        pollster::block_on(gpu.loss_and_gradients(&batch, &labels, GradientMode::BatchMean))
            .expect("backward");
    assert_close("sample losses", &losses, &step.sample_losses, 1e-5, 0.0);
    let grads = pollster::block_on(gpu.read_gradients()).expect("read");
    assert_gradients_close(
        &format!("batch mean ({merge:?})"),
        &grads,
        &step.gradients,
        1e-3,
    );

    let losses =
        pollster::block_on(gpu.loss_and_gradients(&batch, &labels, GradientMode::PerSample))
            .expect("backward");
    assert_close("sample losses", &losses, &step.sample_losses, 1e-5, 0.0);
    let per_sample = pollster::block_on(gpu.read_per_sample_gradients()).expect("read");
    assert_eq!(per_sample.len(), batch.batch_size);
    for (n, (g, r)) in per_sample
        .iter()
        .zip(&step.per_sample_gradients)
        .enumerate()
    {
        assert_gradients_close(&format!("sample {n} ({merge:?})"), g, r, 1e-3);
    }
    // The batch buffer of a per-sample pass holds the sum of the per-sample gradients.
    let sum = pollster::block_on(gpu.read_gradients()).expect("read");
    let mut expected = per_sample[0].map(f64::from);
    for g in &per_sample[1..] {
        expected.add_scaled(&g.map(f64::from), 1.0);
    }
    assert_close(
        "Σ per-sample",
        &sum.flatten(),
        &expected.flatten(),
        1e-6,
        1e-4,
    );
    // … which is batch × the mean gradient.
    let mean_times_n: Vec<f64> = step
        .gradients
        .flatten()
        .iter()
        .map(|x| x * batch.batch_size as f64)
        .collect();
    assert_close(
        "Σ per-sample vs mean",
        &sum.flatten(),
        &mean_times_n,
        1e-6,
        1e-3,
    );
}

#[test]
fn encoder_weight_gradients_match_reference() {
    let tiny = tiny_model();
    let (b1, l1) = tiny_batch();
    let b2 = batch_of(&[(&[1, 11, 22, 2], &[0; 4]), (&[1, 5, 2], &[0; 3])]);
    let l2 = vec![1, 0];
    let w64 = tiny.weights.map(f64::from);
    let h64 = tiny.head.map(f64::from);
    let expected = accumulate_weight_gradients(
        &w64,
        &h64,
        &[(b1.clone(), l1.clone()), (b2.clone(), l2.clone())],
    );
    let mut gpu = GpuEncoder::new(ctx(), &tiny.weights, None, Some(&tiny.head)).expect("upload");
    gpu.start_weight_gradients();
    for (b, l) in [(&b1, &l1), (&b2, &l2)] {
        pollster::block_on(gpu.loss_and_gradients(b, l, GradientMode::BatchMean))
            .expect("backward");
    }
    let got = pollster::block_on(gpu.read_weight_gradients()).expect("read");
    for (l, (g, e)) in got.iter().zip(&expected).enumerate() {
        for which in AdaptedLinear::ALL {
            let i = which.index();
            assert_close(
                &format!("dW {l}.{}", which.checkpoint_name()),
                &g[i].data,
                &e[i].data,
                1e-7,
                1e-3,
            );
        }
    }

    // GPU LoRA-SB initialization: every B·R₀·A is a rank-r approximation of
    // −η·sign(G), with singular values in decreasing order.
    let options = LoraSbInitOptions::new(RANK, 1e-3);
    let adapters = pollster::block_on(gpu_lora_sb_init(
        ctx(),
        &tiny.weights,
        &tiny.head,
        &[(b1, l1), (b2, l2)],
        &options,
    ))
    .expect("init");
    for (l, layer) in adapters.layers.iter().enumerate() {
        for which in AdaptedLinear::ALL {
            let m = layer[which.index()].as_ref().expect("all six adapted");
            let (out, inp) = which.shape(&tiny.weights.config);
            assert_eq!(
                (m.a.rows, m.a.cols, m.b.rows, m.b.cols),
                (RANK, inp, out, RANK)
            );
            let s: Vec<f32> = (0..RANK).map(|k| m.r.get(k, k)).collect();
            assert!(
                s.windows(2).all(|w| w[0] >= w[1]) && s[RANK - 1] > 0.0,
                "layer {l} {which:?}: R₀ diagonal {s:?}"
            );
            // The leading singular direction agrees in sign with ΔW = −η·sign(G).
            let g = &expected_sign_update(&expected_grad(&tiny, l, which), 1e-3);
            let approx: Matrix<f32> = m.delta_weight();
            let dot: f64 = approx
                .data
                .iter()
                .zip(&g.data)
                .map(|(&a, &b)| a as f64 * b)
                .sum();
            assert!(dot > 0.0, "layer {l} {which:?}: B·R₀·A does not follow ΔW");
        }
    }
}

fn expected_grad(tiny: &Tiny, layer: usize, which: AdaptedLinear) -> Matrix<f64> {
    let (b1, l1) = tiny_batch();
    let b2 = batch_of(&[(&[1, 11, 22, 2], &[0; 4]), (&[1, 5, 2], &[0; 3])]);
    let w64 = tiny.weights.map(f64::from);
    let h64 = tiny.head.map(f64::from);
    accumulate_weight_gradients(&w64, &h64, &[(b1, l1), (b2, vec![1, 0])])[layer][which.index()]
        .clone()
}

fn expected_sign_update(g: &Matrix<f64>, eta: f64) -> Matrix<f64> {
    g.map(|x| -eta * x.signum() * f64::from(u8::from(x != 0.0)))
}

#[test]
fn encoder_training_reduces_loss() {
    // Class 0 sentences use tokens 5..15, class 1 sentences tokens 30..40.
    let config = tiny_config();
    let weights = BertWeights::random(&config, 21, 0.3);
    let adapters = LoraSbAdapters::random(&config, RANK, 23, 0.2);
    let head = ClassifierHead::init(2, config.hidden_size, 0.02, 29);
    let mut rows: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
    let mut labels = Vec::new();
    for n in 0..16u32 {
        let class = n % 2;
        let base = if class == 0 { 5 } else { 30 };
        let len = 3 + (n as usize * 7) % 6;
        let mut ids = vec![1];
        ids.extend((0..len).map(|t| base + ((n as usize * 3 + t * 5) % 10) as u32));
        ids.push(2);
        let types = vec![0; ids.len()];
        rows.push((ids, types));
        labels.push(class);
    }
    let refs: Vec<(&[u32], &[u32])> = rows
        .iter()
        .map(|(a, b)| (a.as_slice(), b.as_slice()))
        .collect();
    let batch = batch_of(&refs);
    let mut gpu = GpuEncoder::new(ctx(), &weights, Some(&adapters), Some(&head)).expect("upload");
    let opt = AdamW {
        lr: 5e-2,
        ..AdamW::default()
    };
    let mut losses = Vec::new();
    for _ in 0..20 {
        losses.push(pollster::block_on(gpu.train_step(&batch, &labels, &opt)).expect("step"));
    }
    eprintln!("losses: {losses:?}");
    assert!(
        losses[19] < 0.5 * losses[0],
        "loss did not fall: {losses:?}"
    );
    // The read-back state is what the device trained.
    let state = pollster::block_on(gpu.read_trainable()).expect("read");
    assert!(state.head_weight.data.iter().all(|x| x.is_finite()));
    assert_ne!(state.head_weight.data, head.weight.data);
}

/// The flat trainable values (every `R`, then the head) after `steps` AdamW
/// steps on the tiny batch, from `encoder`'s current state.
fn steps_then_params(encoder: &mut GpuEncoder<'_>, steps: usize, opt: &AdamW) -> Vec<f32> {
    let (batch, labels) = tiny_batch();
    for _ in 0..steps {
        pollster::block_on(encoder.train_step(&batch, &labels, opt)).expect("step");
    }
    let t = pollster::block_on(encoder.read_trainable()).expect("read");
    let mut flat: Vec<f32> =
        t.r.iter()
            .flatten()
            .flatten()
            .flat_map(|m| m.data.clone())
            .collect();
    flat.extend(t.head_weight.data);
    flat.extend(t.head_bias);
    flat
}

#[test]
fn optimizer_state_carried_across_set_trainable_continues_the_run() {
    let tiny = tiny_model();
    let opt = AdamW {
        lr: 2e-2,
        ..AdamW::default()
    };
    let new_encoder = || {
        GpuEncoder::new(ctx(), &tiny.weights, Some(&tiny.adapters), Some(&tiny.head))
            .expect("upload")
    };
    // Three steps in one go.
    let straight = steps_then_params(&mut new_encoder(), 3, &opt);

    // Two steps, then the trained state set again (as a participant's next
    // round does) with the optimizer state read before, then the third step.
    let mut carried = new_encoder();
    steps_then_params(&mut carried, 2, &opt);
    let state = pollster::block_on(carried.read_optimizer_state()).expect("read state");
    assert_eq!(state.steps, 2);
    assert!(
        state.v.iter().any(|v| *v > 0.0),
        "no second moments were read"
    );
    let (adapters, head) = pollster::block_on(carried.read_adapters(&tiny.adapters)).expect("read");
    carried.set_trainable(&adapters, &head).expect("set");
    carried.set_optimizer_state(&state).expect("set state");
    let continued = steps_then_params(&mut carried, 1, &opt);
    assert_eq!(
        continued, straight,
        "carried moments did not continue the run"
    );

    // Without the state, set_trainable resets AdamW: a different third step.
    let mut reset = new_encoder();
    steps_then_params(&mut reset, 2, &opt);
    let (adapters, head) = pollster::block_on(reset.read_adapters(&tiny.adapters)).expect("read");
    reset.set_trainable(&adapters, &head).expect("set");
    assert_eq!(
        pollster::block_on(reset.read_optimizer_state())
            .expect("read")
            .steps,
        0
    );
    let restarted = steps_then_params(&mut reset, 1, &opt);
    let max_diff = restarted
        .iter()
        .zip(&straight)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff > 1e-4,
        "a reset step equals a continued one ({max_diff})"
    );

    // A state of the wrong size or with invalid moments is refused.
    let mut short = state.clone();
    short.m.pop();
    let err = reset.set_optimizer_state(&short).unwrap_err().to_string();
    let n = state.v.len();
    assert!(
        err.contains(&format!("{} first moments for {n} parameters", n - 1)),
        "{err}"
    );
    let mut negative = state.clone();
    negative.v[3] = -1.0;
    let err = reset
        .set_optimizer_state(&negative)
        .unwrap_err()
        .to_string();
    assert!(err.contains("second moment 3 is -1"), "{err}");
    let mut nan = state;
    nan.m[5] = f32::NAN;
    let err = reset.set_optimizer_state(&nan).unwrap_err().to_string();
    assert!(err.contains("first moment 5 is NaN"), "{err}");
}

#[test]
fn merged_weights_follow_every_change_of_r() {
    let tiny = tiny_model();
    let (batch, labels) = tiny_batch();
    let opt = AdamW {
        lr: 5e-2,
        ..AdamW::default()
    };
    // The logits of a new encoder, which merges its R in its first pass.
    let fresh = |adapters: &LoraSbAdapters<f32>, head: &ClassifierHead<f32>| {
        let mut e = GpuEncoder::new(ctx(), &tiny.weights, Some(adapters), Some(head)).unwrap();
        pollster::block_on(e.logits(&batch)).unwrap()
    };
    let logits = |e: &mut GpuEncoder<'_>| pollster::block_on(e.logits(&batch)).unwrap();
    let trained = |e: &GpuEncoder<'_>| pollster::block_on(e.read_adapters(&tiny.adapters)).unwrap();

    let mut gpu =
        GpuEncoder::new(ctx(), &tiny.weights, Some(&tiny.adapters), Some(&tiny.head)).unwrap();
    let initial = logits(&mut gpu);
    assert_eq!(initial, fresh(&tiny.adapters, &tiny.head));
    // A second pass with R unchanged reuses the merged weights: the same logits.
    assert_eq!(logits(&mut gpu), initial);

    // New R's (A, B and the head as they were) through set_trainable.
    let mut other = tiny.adapters.clone();
    for layer in &mut other.layers {
        for m in layer.iter_mut().flatten() {
            for (i, x) in m.r.data.iter_mut().enumerate() {
                *x = -1.5 * *x + 0.05 * (i % 7) as f32;
            }
        }
    }
    gpu.set_trainable(&other, &tiny.head).unwrap();
    let after_set = logits(&mut gpu);
    assert_eq!(after_set, fresh(&other, &tiny.head), "after set_trainable");
    assert_ne!(after_set, initial, "the new R's change nothing: vacuous");

    // A training step changes R after its forward pass merged the old one.
    pollster::block_on(gpu.train_step(&batch, &labels, &opt)).unwrap();
    let (adapters, head) = trained(&gpu);
    let after_step = logits(&mut gpu);
    assert_eq!(after_step, fresh(&adapters, &head), "after train_step");
    assert_ne!(after_step, after_set, "the step changed nothing: vacuous");

    // Gradients, then AdamW on its own.
    pollster::block_on(gpu.loss_and_gradients(&batch, &labels, GradientMode::BatchMean)).unwrap();
    gpu.apply_adamw(&opt).unwrap();
    let (adapters, head) = trained(&gpu);
    let after_adamw = logits(&mut gpu);
    assert_eq!(after_adamw, fresh(&adapters, &head), "after apply_adamw");
    assert_ne!(after_adamw, after_step, "the step changed nothing: vacuous");
}

/// A batch of `n` sequences of `t` tokens (all real), labels 0.
fn full_batch(n: usize, t: usize) -> (EncodedBatch, Vec<u32>) {
    let rows = n * t;
    let batch = EncodedBatch {
        input_ids: (0..rows).map(|i| 1 + (i % 40) as u32).collect(),
        token_type_ids: vec![0; rows],
        attention_mask: vec![1; rows],
        batch_size: n,
        seq_len: t,
    };
    (batch, vec![0; n])
}

#[track_caller]
fn assert_buffer_limit<T: std::fmt::Debug>(what: &str, r: Result<T, GpuError>, needles: &[&str]) {
    match r {
        Err(GpuError::BufferLimit(msg)) => {
            eprintln!("{what}: {msg}");
            for needle in needles {
                assert!(
                    msg.contains(needle),
                    "{what}: {needle:?} missing in {msg:?}"
                );
            }
        }
        other => panic!("{what}: expected a buffer-limit error, got {other:?}"),
    }
}

#[test]
fn batches_beyond_the_buffer_limit_fail_with_a_clear_error() {
    let ctx = ctx();
    let limit = ctx.max_buffer_bytes();
    // 4 heads: the attention scores (4·t² values per sequence) are the largest
    // buffer for long sequences.
    let t = 512;
    let config = BertConfig {
        vocab_size: 50,
        hidden_size: 24,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        intermediate_size: 37,
        max_position_embeddings: t,
        type_vocab_size: 2,
        ..BertConfig::default()
    };
    let weights = BertWeights::random(&config, 31, 0.3);
    let adapters = LoraSbAdapters::random(&config, RANK, 37, 0.4);
    let head = ClassifierHead::init(2, config.hidden_size, 0.5, 41);
    let mut enc = GpuEncoder::new(ctx, &weights, Some(&adapters), Some(&head)).unwrap();
    let per_seq = 4 * (4 * t * t) as u64;
    let fit = enc.max_pass_sequences(t, false);
    assert_eq!(fit as u64, (limit / per_seq).min(65_535 / 4));
    assert_eq!(enc.max_pass_sequences(t, true), fit);
    assert!(
        fit >= 1,
        "one sequence of {t} tokens fits any WebGPU device"
    );

    let n = fit + 1;
    let (batch, labels) = full_batch(n, t);
    let needles = [
        format!("{n} sequences"),
        format!("padded to {t} tokens"),
        format!("{} bytes", n as u64 * per_seq),
        "attention scores".to_string(),
        format!("limit of {limit} bytes"),
        format!("at most {fit} sequences"),
        "--batch".to_string(),
    ];
    let needles: Vec<&str> = needles.iter().map(String::as_str).collect();
    let opt = AdamW::default();
    assert_buffer_limit(
        "train_step",
        pollster::block_on(enc.train_step(&batch, &labels, &opt)),
        &needles,
    );
    assert_buffer_limit(
        "loss_and_gradients",
        pollster::block_on(enc.loss_and_gradients(&batch, &labels, GradientMode::BatchMean)),
        &needles,
    );
    assert_buffer_limit(
        "evaluate",
        pollster::block_on(enc.evaluate(&batch, &labels)),
        &needles,
    );
    assert_buffer_limit("embed", pollster::block_on(enc.embed(&batch)), &needles);
    assert_buffer_limit("logits", pollster::block_on(enc.logits(&batch)), &needles);
    assert_buffer_limit("reserve", enc.reserve(n, t), &needles);

    // DP-SGD splits a batch that is too large into chunks, but a single
    // sequence too long for the limit is an error too.
    let long = (((limit / 16) as f64).sqrt() as usize + 1).max(2);
    let long_config = BertConfig {
        max_position_embeddings: long,
        ..config
    };
    let long_weights = BertWeights::random(&long_config, 43, 0.3);
    let long_adapters = LoraSbAdapters::random(&long_config, RANK, 47, 0.4);
    let mut enc = GpuEncoder::new(ctx, &long_weights, Some(&long_adapters), Some(&head)).unwrap();
    assert_eq!(enc.max_pass_sequences(long, true), 0);
    let (batch, labels) = full_batch(1, long);
    let noise = vec![0.0; enc.num_trainable()];
    assert_buffer_limit(
        "dp_gradients",
        pollster::block_on(enc.dp_gradients(Some((&batch, &labels)), &noise, 1.0, 1.0)),
        &[
            "a batch of 1 sequence padded",
            &format!("padded to {long} tokens"),
            "attention scores",
            &format!("limit of {limit} bytes"),
            "not even one sequence",
        ],
    );
}

/// `train::evaluate` with a batch larger than one pass may hold (here capped
/// at 3 sequences with `set_max_pass_sequences`, which the encoder's own
/// `evaluate` then refuses) evaluates it in smaller passes, with the accuracy,
/// loss and confusion matrix of one pass; the confusion matrix is that of
/// each example's own logits.
#[test]
fn evaluation_split_into_passes_equals_one_pass() {
    use fedsb_engine::data::Example;
    use fedsb_engine::model::{wordpiece_tokenizer_json, BertTokenizer};
    use fedsb_engine::train::evaluate;

    let words: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    let mut vocab = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
    vocab.extend(words.iter().map(String::as_str));
    assert!(vocab.len() <= tiny_config().vocab_size);
    let tokenizer =
        BertTokenizer::from_bytes(&wordpiece_tokenizer_json(&vocab, true).unwrap()).unwrap();
    // Eleven texts of 1 to 11 words, labels 0, 1, 2, 0, ...
    let examples: Vec<Example> = (0..11)
        .map(|n| Example {
            text: (0..=n)
                .map(|k| words[(7 * n + 3 * k) % words.len()].as_str())
                .collect::<Vec<_>>()
                .join(" "),
            text_pair: None,
            label: Some((n % NUM_LABELS) as u32),
        })
        .collect();
    let mut tiny = tiny_model();
    // The tiny model's logits hardly depend on the text, so that its head
    // predicts one class for all: shift each class's bias by its mean logit
    // over the examples, so that the predictions differ between examples and
    // the confusion matrix below is not a single column.
    {
        let mut enc =
            GpuEncoder::new(ctx(), &tiny.weights, Some(&tiny.adapters), Some(&tiny.head)).unwrap();
        let refs: Vec<&Example> = examples.iter().collect();
        let (b, _) = fedsb_engine::train::encode_examples(&tokenizer, &refs).unwrap();
        let z = pollster::block_on(enc.logits(&b)).unwrap();
        for (j, bias) in tiny.head.bias.iter_mut().enumerate() {
            let mean = (0..examples.len())
                .map(|n| z[n * NUM_LABELS + j])
                .sum::<f32>()
                / examples.len() as f32;
            *bias -= mean;
        }
    }
    let new_encoder =
        || GpuEncoder::new(ctx(), &tiny.weights, Some(&tiny.adapters), Some(&tiny.head)).unwrap();
    let mut whole = new_encoder();
    let one_pass = pollster::block_on(evaluate(&mut whole, &tokenizer, &examples, 11)).unwrap();
    let mut split = new_encoder();
    split.set_max_pass_sequences(Some(3));
    assert_eq!(split.pass_sequences(13, false), 3);
    // The capped encoder refuses a pass of more than 3 sequences, so the
    // result below can only come from passes of at most 3.
    let batch = full_batch(4, 5).0;
    assert_buffer_limit(
        "evaluate above the cap",
        pollster::block_on(split.evaluate(&batch, &[0, 1, 2, 0])),
        &["4 sequences", "3 sequences per pass"],
    );
    let passes = pollster::block_on(evaluate(&mut split, &tokenizer, &examples, 11)).unwrap();
    assert_eq!(passes.samples, 11);
    assert_eq!(passes.accuracy, one_pass.accuracy);
    assert!(
        (passes.loss - one_pass.loss).abs() <= 1e-5 * one_pass.loss.abs().max(1.0),
        "loss in passes of 3: {}, in one pass: {}",
        passes.loss,
        one_pass.loss
    );
    assert_eq!(passes.confusion, one_pass.confusion);
    // Not a vacuous comparison: the model's loss is not that of a constant.
    assert!(one_pass.loss.is_finite() && one_pass.loss > 0.0);

    // The confusion matrix counts each example once, in the row of its label
    // and the column of its largest logit, as read back from a forward pass
    // of each example alone.
    let mut expected = vec![vec![0u64; NUM_LABELS]; NUM_LABELS];
    for e in &examples {
        let (b, labels) = fedsb_engine::train::encode_examples(&tokenizer, &[e]).unwrap();
        let z = pollster::block_on(whole.logits(&b)).unwrap();
        let predicted = (0..NUM_LABELS)
            .max_by(|&i, &j| z[i].total_cmp(&z[j]))
            .unwrap();
        expected[labels[0] as usize][predicted] += 1;
    }
    assert_eq!(one_pass.confusion, expected);
    let diagonal: u64 = (0..NUM_LABELS).map(|k| one_pass.confusion[k][k]).sum();
    assert_eq!(diagonal as f64 / 11.0, one_pass.accuracy);
    // Not vacuous: the tiny model predicts more than one class here.
    let columns_used = (0..NUM_LABELS)
        .filter(|&j| expected.iter().any(|row| row[j] > 0))
        .count();
    assert!(columns_used >= 2, "confusion {expected:?}");
}

/// `centre_head_bias` shifts each class's logits by one constant, so that
/// over the given samples every class has the same mean logit, and returns
/// the means from before; with no samples it fails.
#[test]
fn centred_head_has_equal_mean_logits() {
    let tiny = tiny_model();
    let (b1, l1) = tiny_batch();
    let b2 = batch_of(&[(&[1, 30, 22, 2], &[0; 4]), (&[1, 11, 2], &[0; 3])]);
    let batches = [(b1.clone(), l1), (b2.clone(), vec![1, 0])];
    let logits = |head: &ClassifierHead<f32>| -> Vec<f32> {
        let mut gpu = GpuEncoder::new(ctx(), &tiny.weights, Some(&tiny.adapters), Some(head))
            .expect("upload");
        let mut all = pollster::block_on(gpu.logits(&b1)).expect("logits");
        all.extend(pollster::block_on(gpu.logits(&b2)).expect("logits"));
        all
    };
    let mean_of = |z: &[f32], c: usize| -> f64 {
        let rows: Vec<f64> = z.chunks(NUM_LABELS).map(|r| f64::from(r[c])).collect();
        rows.iter().sum::<f64>() / rows.len() as f64
    };
    let before = logits(&tiny.head);
    let mut head = tiny.head.clone();
    let means = pollster::block_on(centre_head_bias(
        ctx(),
        &tiny.weights,
        &tiny.adapters,
        &mut head,
        &batches,
    ))
    .expect("centre");
    assert_eq!(means.len(), NUM_LABELS);
    for (c, m) in means.iter().enumerate() {
        assert!((m - mean_of(&before, c)).abs() < 1e-5, "class {c}: {m}");
    }
    let spread = |m: &[f64]| {
        m.iter().cloned().fold(f64::MIN, f64::max) - m.iter().cloned().fold(f64::MAX, f64::min)
    };
    assert!(
        spread(&means) > 0.1,
        "the test head is not centred already: {means:?}"
    );
    let after = logits(&head);
    let after_means: Vec<f64> = (0..NUM_LABELS).map(|c| mean_of(&after, c)).collect();
    assert!(spread(&after_means) < 1e-5, "{after_means:?}");
    // One constant per class: the weights are untouched and every sample's
    // logit moved by the class's bias change.
    assert_eq!(head.weight.data, tiny.head.weight.data);
    for (i, (a, b)) in after.iter().zip(&before).enumerate() {
        let c = i % NUM_LABELS;
        let shift = f64::from(head.bias[c] - tiny.head.bias[c]);
        assert!(
            (f64::from(a - b) - shift).abs() < 1e-5,
            "logit {i}: {b} -> {a}"
        );
    }
    let mut untouched = tiny.head.clone();
    assert!(pollster::block_on(centre_head_bias(
        ctx(),
        &tiny.weights,
        &tiny.adapters,
        &mut untouched,
        &[],
    ))
    .is_err());
}
