//! LoRA-SB initialization on the CPU reference: `B·R₀·A` is the best rank-r
//! approximation of `ΔW = −η·sign(G)` (its singular values are the top r of
//! `ΔW`), `A` and `B` have orthonormal rows/columns, and the gradients summed
//! over batches are those of the per-batch mean losses.

use fedsb_engine::model::{AdaptedLinear, BertConfig, BertWeights, EncodedBatch};
use fedsb_engine::reference::{
    accumulate_weight_gradients, adapter_from_update, lora_sb_init, BackwardOptions,
    ClassifierHead, LoraSbInitOptions, Matrix, ReferenceEncoder,
};
use fedsb_engine::train::lora_sb_from_gradients;
use nalgebra::DMatrix;

fn singular_values(m: &Matrix<f64>) -> Vec<f64> {
    let d = DMatrix::from_row_slice(m.rows, m.cols, &m.data);
    let mut s: Vec<f64> = d.singular_values().iter().copied().collect();
    s.sort_by(|a, b| b.total_cmp(a));
    s
}

fn assert_orthonormal_rows(what: &str, m: &Matrix<f64>) {
    let gram = m.matmul_t(m);
    for i in 0..gram.rows {
        for j in 0..gram.cols {
            let expected = if i == j { 1.0 } else { 0.0 };
            assert!(
                (gram.get(i, j) - expected).abs() < 1e-10,
                "{what}: (M·Mᵀ)[{i},{j}] = {}",
                gram.get(i, j)
            );
        }
    }
}

/// Checks one adapter against the update it approximates.
fn check_adapter_approximates(delta_w: &Matrix<f64>, rank: usize) {
    let adapter = adapter_from_update(delta_w, rank);
    assert_eq!((adapter.a.rows, adapter.a.cols), (rank, delta_w.cols));
    assert_eq!((adapter.b.rows, adapter.b.cols), (delta_w.rows, rank));
    assert_eq!((adapter.r.rows, adapter.r.cols), (rank, rank));
    assert_orthonormal_rows("A", &adapter.a);
    assert_orthonormal_rows("Bᵀ", &adapter.b.transpose());

    let full = singular_values(delta_w);
    let approx = singular_values(&adapter.delta_weight());
    for k in 0..rank {
        assert!(
            (approx[k] - full[k]).abs() < 1e-9 * full[0],
            "σ_{k}: B·R₀·A {}, ΔW {}",
            approx[k],
            full[k]
        );
        // R₀ = diag(S), descending.
        assert!((adapter.r.get(k, k) - full[k]).abs() < 1e-9 * full[0]);
    }
    assert!(
        approx[rank..].iter().all(|&s| s < 1e-9 * full[0]),
        "rank of B·R₀·A exceeds {rank}"
    );
    // Eckart–Young: the residual's Frobenius norm² is the sum of the dropped σ².
    let mut residual = delta_w.clone();
    residual.add_scaled(&adapter.delta_weight(), -1.0);
    let residual2: f64 = residual.data.iter().map(|x| x * x).sum();
    let dropped2: f64 = full[rank..].iter().map(|s| s * s).sum();
    assert!(
        (residual2 - dropped2).abs() < 1e-8 * (1.0 + dropped2),
        "{residual2} vs {dropped2}"
    );
}

#[test]
fn svd_step_gives_best_rank_r_approximation() {
    // Sign matrices like the real ΔW, tall and wide, η = 1e-3.
    for (out, inp, seed) in [(24usize, 16usize, 1u64), (16, 24, 2), (16, 16, 3)] {
        let mut state = seed;
        let delta_w = Matrix::from_fn(out, inp, |_, _| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if (state >> 33) % 2 == 0 {
                1e-3
            } else {
                -1e-3
            }
        });
        for rank in [1, 4, 16] {
            check_adapter_approximates(&delta_w, rank);
        }
    }
}

/// A labelled batch, as `lora_sb_init` takes them.
type LabelledBatch = (EncodedBatch, Vec<u32>);

fn tiny() -> (BertWeights<f64>, ClassifierHead<f64>, Vec<LabelledBatch>) {
    let config = BertConfig {
        vocab_size: 50,
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 24,
        max_position_embeddings: 32,
        ..BertConfig::default()
    };
    let weights = BertWeights::random(&config, 21, 0.3).map(f64::from);
    let head = ClassifierHead::init(2, 16, 0.3, 5);
    let batch = |ids: &[&[u32]]| {
        let seq = ids.iter().map(|s| s.len()).max().unwrap();
        let mut b = EncodedBatch {
            batch_size: ids.len(),
            seq_len: seq,
            ..Default::default()
        };
        for s in ids {
            for t in 0..seq {
                b.input_ids.push(s.get(t).copied().unwrap_or(0));
                b.token_type_ids.push(0);
                b.attention_mask.push(u32::from(t < s.len()));
            }
        }
        b
    };
    let batches = vec![
        (batch(&[&[1, 5, 9, 2], &[1, 44, 2]]), vec![0, 1]),
        (
            batch(&[&[1, 7, 7, 30, 12, 2], &[1, 3, 2], &[1, 19, 28, 2]]),
            vec![1, 1, 0],
        ),
    ];
    (weights, head, batches)
}

#[test]
fn gradients_are_summed_over_batches_of_mean_losses() {
    let (weights, head, batches) = tiny();
    let total = accumulate_weight_gradients(&weights, &head, &batches);
    let encoder = ReferenceEncoder::new(&weights, None);
    let options = BackwardOptions {
        per_sample: false,
        weight_gradients: true,
    };
    let g0 = encoder
        .loss_and_gradients(&head, &batches[0].0, &batches[0].1, options)
        .weight_gradients;
    let g1 = encoder
        .loss_and_gradients(&head, &batches[1].0, &batches[1].1, options)
        .weight_gradients;
    for l in 0..2 {
        for which in AdaptedLinear::ALL {
            let i = which.index();
            let mut sum = g0[l][i].clone();
            sum.add_scaled(&g1[l][i], 1.0);
            assert!(total[l][i].max_abs_diff(&sum) < 1e-15);
        }
    }
}

#[test]
fn init_adapters_approximate_the_sign_update_of_every_layer() {
    let (weights, head, batches) = tiny();
    let eta = 1e-3;
    let options = LoraSbInitOptions::new(4, eta);
    let adapters = lora_sb_init(&weights, &head, &batches, &options);
    let grads = accumulate_weight_gradients(&weights, &head, &batches);
    for (l, layer_grads) in grads.iter().enumerate() {
        for which in AdaptedLinear::ALL {
            let adapter = adapters.module(l, which).expect("all six adapted");
            let g = &layer_grads[which.index()];
            let delta_w = g.map(|x| -eta * x.signum() * f64::from(u8::from(x != 0.0)));
            let expected = adapter_from_update(&delta_w, 4);
            assert_eq!(
                adapter.r, expected.r,
                "layer {l} {which:?}: R₀ = diag(top singular values of ΔW)"
            );
            assert!(
                adapter
                    .delta_weight()
                    .max_abs_diff(&expected.delta_weight())
                    < 1e-15
            );
            check_adapter_approximates(&delta_w, 4);
        }
    }

    // The initialized adapters change the model's output.
    let before = ReferenceEncoder::new(&weights, None).loss(&head, &batches[0].0, &batches[0].1);
    let after =
        ReferenceEncoder::new(&weights, Some(&adapters)).loss(&head, &batches[0].0, &batches[0].1);
    assert!((before - after).abs() > 1e-9, "{before} vs {after}");

    // A subset of modules.
    let only_qv = LoraSbInitOptions {
        modules: vec![AdaptedLinear::Query, AdaptedLinear::Value],
        ..LoraSbInitOptions::new(2, eta)
    };
    let adapters = lora_sb_init(&weights, &head, &batches, &only_qv);
    assert!(adapters.module(1, AdaptedLinear::Query).is_some());
    assert!(adapters.module(1, AdaptedLinear::Key).is_none());
    assert_eq!(adapters.module(0, AdaptedLinear::Value).unwrap().rank(), 2);
}

/// `lora_sb_from_gradients` (the f32 path of `fedsb init` and the
/// aggregator, whose SVDs run on several threads) puts each module's adapter
/// at its own layer and module: the same as `adapter_from_update` of that
/// gradient's sign update, computed alone, and nothing where no adapter is asked.
#[test]
fn adapters_from_gradients_land_at_their_own_layer_and_module() {
    let (weights, head, batches) = tiny();
    let config = weights.config.clone();
    let grads: Vec<[Matrix<f32>; 6]> = accumulate_weight_gradients(&weights, &head, &batches)
        .iter()
        .map(|layer| layer.clone().map(|g| g.map(|x| x as f32)))
        .collect();
    let eta = 1e-3f32;
    let options = LoraSbInitOptions {
        modules: vec![
            AdaptedLinear::Query,
            AdaptedLinear::Intermediate,
            AdaptedLinear::Output,
        ],
        ..LoraSbInitOptions::new(3, f64::from(eta))
    };
    let adapters = lora_sb_from_gradients(&config, &grads, &options).expect("init");
    assert_eq!(adapters.layers.len(), 2);
    for (l, layer) in grads.iter().enumerate() {
        for which in AdaptedLinear::ALL {
            let got = adapters.module(l, which);
            if !options.modules.contains(&which) {
                assert!(got.is_none(), "layer {l} {which:?} was not asked for");
                continue;
            }
            let delta_w =
                layer[which.index()].map(|x| -eta * x.signum() * f32::from(u8::from(x != 0.0)));
            let expected = adapter_from_update(&delta_w, 3);
            assert_eq!(
                got,
                Some(&expected),
                "layer {l} {which:?}: not its own gradient's adapter"
            );
        }
    }

    // A gradient of the wrong shape is refused with its module's name.
    let mut wrong = grads.clone();
    wrong[1][AdaptedLinear::Output.index()] = Matrix::from_fn(3, 3, |_, _| 1.0);
    let err = lora_sb_from_gradients(&config, &wrong, &options).unwrap_err();
    assert!(
        err.to_string()
            .contains("gradient of output.dense is 3×3, expected 16×24"),
        "{err}"
    );
}
