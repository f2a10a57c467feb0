//! Gradient checks of the CPU reference on a tiny random model: analytic
//! gradients of every `R`, the head and the adapted `W0`s against central
//! finite differences in f64; per-sample gradients against the batch
//! gradient; f32 against f64; padding invariance.

use fedsb_engine::model::{AdaptedLinear, BertConfig, BertWeights, EncodedBatch};
use fedsb_engine::reference::{
    lora_sb_linear, BackwardOptions, ClassifierHead, LoraSbAdapters, Matrix, ReferenceEncoder,
};

const RANK: usize = 4;
const NUM_LABELS: usize = 3;

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 24,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        ..BertConfig::default()
    }
}

/// Three samples right-padded to 7 tokens: lengths 7 (a pair), 5 and 3.
fn tiny_batch() -> (EncodedBatch, Vec<u32>) {
    let rows: [(&[u32], &[u32]); 3] = [
        (&[1, 7, 12, 2, 33, 41, 2], &[0, 0, 0, 0, 1, 1, 1]),
        (&[1, 9, 48, 3, 2], &[0, 0, 0, 0, 0]),
        (&[1, 25, 2], &[0, 0, 0]),
    ];
    let seq = 7;
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
    (batch, vec![2, 0, 1])
}

struct Tiny {
    weights: BertWeights<f64>,
    adapters: LoraSbAdapters<f64>,
    head: ClassifierHead<f64>,
}

fn tiny_model() -> Tiny {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 7, 0.3).map(f64::from);
    let adapters = LoraSbAdapters::random(&config, RANK, 11, 0.4);
    let mut head = ClassifierHead::init(NUM_LABELS, config.hidden_size, 0.5, 13);
    head.bias = vec![0.1, -0.2, 0.05];
    Tiny {
        weights,
        adapters,
        head,
    }
}

/// Central difference of the mean loss along one parameter, set through `set`.
fn central_difference(
    tiny: &Tiny,
    batch: &EncodedBatch,
    labels: &[u32],
    set: impl Fn(&mut Tiny, f64),
) -> f64 {
    let h = 1e-5;
    let mut plus = Tiny {
        weights: tiny.weights.clone(),
        adapters: tiny.adapters.clone(),
        head: tiny.head.clone(),
    };
    set(&mut plus, h);
    let mut minus = Tiny {
        weights: tiny.weights.clone(),
        adapters: tiny.adapters.clone(),
        head: tiny.head.clone(),
    };
    set(&mut minus, -h);
    let loss = |t: &Tiny| {
        ReferenceEncoder::new(&t.weights, Some(&t.adapters)).loss(&t.head, batch, labels)
    };
    (loss(&plus) - loss(&minus)) / (2.0 * h)
}

/// `|analytic − numeric| ≤ 1e-6·(|analytic| + scale)` where `scale` is the
/// largest gradient entry of the tensor (so tiny entries are judged on the
/// tensor's scale, not their own).
fn assert_close(what: &str, analytic: f64, numeric: f64, scale: f64) {
    let diff = (analytic - numeric).abs();
    assert!(
        diff <= 1e-6 * (analytic.abs() + scale),
        "{what}: analytic {analytic:e}, finite difference {numeric:e}, difference {diff:e}"
    );
}

fn max_abs(m: &Matrix<f64>) -> f64 {
    m.data.iter().fold(0.0, |a, &x| a.max(x.abs()))
}

#[test]
fn r_and_head_gradients_match_finite_differences_f64() {
    let tiny = tiny_model();
    let (batch, labels) = tiny_batch();
    let encoder = ReferenceEncoder::new(&tiny.weights, Some(&tiny.adapters));
    let step = encoder.loss_and_gradients(&tiny.head, &batch, &labels, BackwardOptions::default());
    assert!(step.loss > 0.0 && step.loss.is_finite());

    let mut checked = 0;
    for layer in 0..2 {
        for which in AdaptedLinear::ALL {
            let g = step.gradients.r[layer][which.index()]
                .as_ref()
                .expect("adapted");
            assert_eq!((g.rows, g.cols), (RANK, RANK));
            let scale = max_abs(g);
            assert!(scale > 1e-8, "layer {layer} {which:?}: R gradient is zero");
            for i in 0..RANK {
                for j in 0..RANK {
                    let numeric = central_difference(&tiny, &batch, &labels, |t, h| {
                        t.adapters.module_mut(layer, which).unwrap().r.data[i * RANK + j] += h;
                    });
                    assert_close(
                        &format!("layer {layer} {which:?} R[{i},{j}]"),
                        g.get(i, j),
                        numeric,
                        scale,
                    );
                    checked += 1;
                }
            }
        }
    }
    let scale = max_abs(&step.gradients.head_weight);
    for c in 0..NUM_LABELS {
        for k in 0..16 {
            let numeric = central_difference(&tiny, &batch, &labels, |t, h| {
                t.head.weight.data[c * 16 + k] += h
            });
            assert_close(
                &format!("head W[{c},{k}]"),
                step.gradients.head_weight.get(c, k),
                numeric,
                scale,
            );
            checked += 1;
        }
        let numeric = central_difference(&tiny, &batch, &labels, |t, h| t.head.bias[c] += h);
        assert_close(
            &format!("head b[{c}]"),
            step.gradients.head_bias[c],
            numeric,
            scale,
        );
        checked += 1;
    }
    assert_eq!(checked, 2 * 6 * RANK * RANK + NUM_LABELS * 17);
}

#[test]
fn weight_gradients_match_finite_differences_f64() {
    let tiny = tiny_model();
    let (batch, labels) = tiny_batch();
    let encoder = ReferenceEncoder::new(&tiny.weights, Some(&tiny.adapters));
    let step = encoder.loss_and_gradients(
        &tiny.head,
        &batch,
        &labels,
        BackwardOptions {
            per_sample: false,
            weight_gradients: true,
        },
    );
    assert_eq!(step.weight_gradients.len(), 2);
    for layer in 0..2 {
        for which in AdaptedLinear::ALL {
            let g = &step.weight_gradients[layer][which.index()];
            let (out, inp) = which.shape(&tiny.weights.config);
            assert_eq!((g.rows, g.cols), (out, inp));
            let scale = max_abs(g);
            // A spread of entries (a full sweep would be 2·(4·256 + 2·384) evaluations per layer).
            for (i, j) in [
                (0, 0),
                (1, 5),
                (out - 1, inp - 1),
                (out / 2, inp / 3),
                (3, inp - 2),
            ] {
                let numeric = central_difference(&tiny, &batch, &labels, |t, h| {
                    let lw = &mut t.weights.layers[layer];
                    let w = match which {
                        AdaptedLinear::Query => &mut lw.query,
                        AdaptedLinear::Key => &mut lw.key,
                        AdaptedLinear::Value => &mut lw.value,
                        AdaptedLinear::AttentionOutput => &mut lw.attention_output,
                        AdaptedLinear::Intermediate => &mut lw.intermediate,
                        AdaptedLinear::Output => &mut lw.output,
                    };
                    w.weight.data[i * inp + j] += h;
                });
                assert_close(
                    &format!("layer {layer} {which:?} W0[{i},{j}]"),
                    g.get(i, j),
                    numeric,
                    scale,
                );
            }
        }
    }
}

#[test]
fn per_sample_gradients_average_to_the_batch_gradient_and_match_single_sample_batches() {
    let tiny = tiny_model();
    let (batch, labels) = tiny_batch();
    let encoder = ReferenceEncoder::new(&tiny.weights, Some(&tiny.adapters));
    let step = encoder.loss_and_gradients(
        &tiny.head,
        &batch,
        &labels,
        BackwardOptions {
            per_sample: true,
            weight_gradients: false,
        },
    );
    assert_eq!(step.per_sample_gradients.len(), 3);
    let mut mean = step.per_sample_gradients[0].map(|_| 0.0);
    for g in &step.per_sample_gradients {
        mean.add_scaled(g, 1.0 / 3.0);
    }
    let (a, b) = (mean.flatten(), step.gradients.flatten());
    assert_eq!(a.len(), 2 * 6 * RANK * RANK + NUM_LABELS * 17);
    for (k, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-12 * (1.0 + y.abs()),
            "entry {k}: mean of per-sample {x}, batch {y}"
        );
    }

    // Sample n alone, without padding, gives the same gradient of its own loss.
    for n in 0..3 {
        let len = batch.length(n);
        let row = n * batch.seq_len..n * batch.seq_len + len;
        let single = EncodedBatch {
            input_ids: batch.input_ids[row.clone()].to_vec(),
            token_type_ids: batch.token_type_ids[row.clone()].to_vec(),
            attention_mask: batch.attention_mask[row].to_vec(),
            batch_size: 1,
            seq_len: len,
        };
        let alone = encoder.loss_and_gradients(
            &tiny.head,
            &single,
            &labels[n..n + 1],
            BackwardOptions::default(),
        );
        assert!((alone.loss - step.sample_losses[n]).abs() < 1e-12);
        let (x, y) = (
            step.per_sample_gradients[n].flatten(),
            alone.gradients.flatten(),
        );
        for (k, (p, q)) in x.iter().zip(&y).enumerate() {
            assert!(
                (p - q).abs() <= 1e-12 * (1.0 + q.abs()),
                "sample {n} entry {k}: {p} vs {q}"
            );
        }
    }
}

#[test]
fn padding_does_not_change_pooled_embeddings() {
    let tiny = tiny_model();
    let (batch, _) = tiny_batch();
    let encoder = ReferenceEncoder::new(&tiny.weights, Some(&tiny.adapters));
    let pooled = encoder.mean_pooled(&batch);
    for n in 0..3 {
        let len = batch.length(n);
        let single = EncodedBatch {
            input_ids: batch.input_ids[n * 7..n * 7 + len].to_vec(),
            token_type_ids: batch.token_type_ids[n * 7..n * 7 + len].to_vec(),
            attention_mask: vec![1; len],
            batch_size: 1,
            seq_len: len,
        };
        let alone = encoder.mean_pooled(&single);
        for k in 0..16 {
            assert!((alone.get(0, k) - pooled.get(n, k)).abs() < 1e-13);
        }
    }
}

#[test]
fn f32_and_f64_agree() {
    let tiny = tiny_model();
    let (batch, labels) = tiny_batch();
    let options = BackwardOptions {
        per_sample: true,
        weight_gradients: true,
    };
    let step64 = ReferenceEncoder::new(&tiny.weights, Some(&tiny.adapters))
        .loss_and_gradients(&tiny.head, &batch, &labels, options);
    let weights32 = tiny.weights.map(|x| x as f32);
    let adapters32 = tiny.adapters.map(|x| x as f32);
    let head32 = tiny.head.map(|x| x as f32);
    let step32 = ReferenceEncoder::new(&weights32, Some(&adapters32))
        .loss_and_gradients(&head32, &batch, &labels, options);

    assert!((step32.loss as f64 - step64.loss).abs() < 1e-5 * step64.loss.abs());
    let compare = |what: &str, a: &[f32], b: &[f64]| {
        let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        for (k, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x as f64 - y).abs() <= 1e-4 * scale + 1e-6,
                "{what} entry {k}: f32 {x}, f64 {y} (scale {scale})"
            );
        }
    };
    compare(
        "gradients",
        &step32.gradients.flatten(),
        &step64.gradients.flatten(),
    );
    for n in 0..3 {
        compare(
            &format!("sample {n}"),
            &step32.per_sample_gradients[n].flatten(),
            &step64.per_sample_gradients[n].flatten(),
        );
    }
    for (l32, l64) in step32.weight_gradients.iter().zip(&step64.weight_gradients) {
        for (a, b) in l32.iter().zip(l64) {
            compare("weight gradient", &a.data, &b.data);
        }
    }
}

#[test]
fn lora_sb_linear_equals_dense_merged_weight() {
    let tiny = tiny_model();
    let lw = &tiny.weights.layers[1].intermediate;
    let adapter = tiny
        .adapters
        .module(1, AdaptedLinear::Intermediate)
        .unwrap();
    let x = Matrix::from_fn(5, 16, |i, j| ((i * 16 + j) as f64 * 0.37).sin());
    let (y, xa) = lora_sb_linear(&x, lw, Some(adapter));
    assert_eq!(xa.unwrap().cols, RANK);
    let delta = adapter.delta_weight();
    for i in 0..5 {
        for o in 0..24 {
            let dense: f64 = (0..16)
                .map(|k| (lw.weight.data[o * 16 + k] + delta.get(o, k)) * x.get(i, k))
                .sum::<f64>()
                + lw.bias.data[o];
            assert!((dense - y.get(i, o)).abs() < 1e-12);
        }
    }
}

/// Merging the adapters into the weights (`W + B·R·A`, what `fedsb merge`
/// saves) gives an encoder without adapters whose pooled embeddings equal
/// the adapted encoder's, up to the weights' rounding to f32; the base
/// encoder's are far from both, so the check can tell.
#[test]
fn merged_weights_embed_like_the_adapted_encoder() {
    let config = tiny_config();
    let weights = BertWeights::random(&config, 7, 0.3);
    let mut adapters = LoraSbAdapters::<f32>::random(&config, RANK, 11, 0.4);
    // One module left out: it must stay as it was.
    adapters.layers[0][AdaptedLinear::Key.index()] = None;
    let merged = adapters.merged_into(&weights);
    assert_eq!(merged.layers[0].key, weights.layers[0].key);
    assert_ne!(
        merged.layers[0].query.weight,
        weights.layers[0].query.weight
    );
    assert_eq!(merged.layers[0].query.bias, weights.layers[0].query.bias);
    let (batch, _) = tiny_batch();
    let (w64, a64) = (weights.map(f64::from), adapters.map(f64::from));
    let adapted = ReferenceEncoder::new(&w64, Some(&a64)).mean_pooled(&batch);
    let merged64 = merged.map(f64::from);
    let plain = ReferenceEncoder::new(&merged64, None).mean_pooled(&batch);
    let base = ReferenceEncoder::new(&w64, None).mean_pooled(&batch);
    let diff = |a: &Matrix<f64>, b: &Matrix<f64>| {
        a.data
            .iter()
            .zip(&b.data)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
    };
    assert!(diff(&adapted, &plain) < 1e-5, "{}", diff(&adapted, &plain));
    assert!(diff(&adapted, &base) > 1e-2, "{}", diff(&adapted, &base));
}
