//! LoRA-SB initialization by update approximation (CPU reference), following
//! the authors' code (github.com/RaghavSinghal10/lora-sb):
//!
//! 1. On `N_init` samples, forward and backward with every adapted weight
//!    requiring a gradient: `G = Σ_batches ∂L_batch/∂W0` (loss averaged per batch).
//! 2. `ΔW = −η·sign(G)`.
//! 3. Truncated SVD `ΔWᵀ = U·S·Vᵀ` to rank `r`; `A = Uᵀ` (r×in), `B = V`
//!    (out×r), `R₀ = diag(S)`, so that `B·R₀·A` is the best rank-`r`
//!    approximation of `ΔW`. `W0` is unchanged.

use faer::{Mat, MatRef};

use crate::model::{AdaptedLinear, BertWeights, EncodedBatch};

use super::{
    BackwardOptions, ClassifierHead, Float, LoraSbAdapters, LoraSbModule, Matrix, ReferenceEncoder,
};

/// Settings of the LoRA-SB initialization.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSbInitOptions {
    pub rank: usize,
    /// η, the first step's learning rate (only the sign pattern and the scale
    /// of `R₀` depend on it).
    pub learning_rate: f64,
    /// Which linears of each layer get an adapter.
    pub modules: Vec<AdaptedLinear>,
}

impl LoraSbInitOptions {
    /// All six linears of every layer at rank `rank`.
    pub fn new(rank: usize, learning_rate: f64) -> Self {
        Self {
            rank,
            learning_rate,
            modules: AdaptedLinear::ALL.to_vec(),
        }
    }
}

/// `Σ_batches ∂L_batch/∂W0` for every adapted linear of every layer, with the
/// mean cross-entropy of each batch as `L_batch` and no adapters in the model.
pub fn accumulate_weight_gradients<F: Float>(
    weights: &BertWeights<F>,
    head: &ClassifierHead<F>,
    batches: &[(EncodedBatch, Vec<u32>)],
) -> Vec<[Matrix<F>; 6]> {
    let encoder = ReferenceEncoder::new(weights, None);
    let mut sum: Option<Vec<[Matrix<F>; 6]>> = None;
    for (batch, labels) in batches {
        let step = encoder.loss_and_gradients(
            head,
            batch,
            labels,
            BackwardOptions {
                per_sample: false,
                weight_gradients: true,
            },
        );
        match sum.as_mut() {
            None => sum = Some(step.weight_gradients),
            Some(sum) => {
                for (s_layer, g_layer) in sum.iter_mut().zip(&step.weight_gradients) {
                    for (s, g) in s_layer.iter_mut().zip(g_layer) {
                        s.add_scaled(g, F::ONE);
                    }
                }
            }
        }
    }
    sum.expect("LoRA-SB initialization needs at least one batch")
}

/// The thin SVD of a column-major `rows × cols` matrix with faer, in a
/// function that is not generic, so that it is compiled with this crate's
/// optimization level: nalgebra's SVD, instantiated inside the generic
/// [`adapter_from_update`] in the (unoptimized) crate of a dev-profile
/// caller, once made `fedsb init` on all-MiniLM-L6-v2 take over 10 minutes.
///
/// Returns `(U, S, V)` as faer matrices (`U`: rows × k, `V`: cols × k,
/// `k = min(rows, cols)`).
#[inline(never)]
fn thin_svd_f64(rows: usize, cols: usize, column_major: &[f64]) -> (Mat<f64>, Vec<f64>, Mat<f64>) {
    let m = MatRef::from_column_major_slice(column_major, rows, cols);
    // The update's entries are −η, 0 or η (finite), for which the SVD's
    // iteration always converges; failing here is a bug, not bad input.
    let svd = m.thin_svd().unwrap_or_else(|e| {
        panic!("the SVD of a {rows}×{cols} LoRA-SB update did not converge: {e:?}")
    });
    let s = svd.S().column_vector().iter().copied().collect();
    (svd.U().to_owned(), s, svd.V().to_owned())
}

/// The rank-`rank` adapter whose `B·R₀·A` best approximates `delta_w` (out × in).
///
/// # Panics
/// If `rank` exceeds `min(out, in)`.
pub fn adapter_from_update<F: Float>(delta_w: &Matrix<F>, rank: usize) -> LoraSbModule<F> {
    let (out, inp) = (delta_w.rows, delta_w.cols);
    assert!(
        rank <= out.min(inp),
        "LoRA-SB rank {rank} exceeds min(out, in) = {} of a {out}×{inp} layer",
        out.min(inp)
    );
    // ΔWᵀ is in × out; column-major, ΔW's row-major data is ΔWᵀ's.
    let dwt: Vec<f64> = delta_w.data.iter().map(|x| x.to_f64()).collect();
    // U: in × k, V: out × k. faer returns the singular values in decreasing
    // order; sorting keeps this function right if that ever changes.
    let (u, s, v) = thin_svd_f64(inp, out, &dwt);
    let mut order: Vec<usize> = (0..s.len()).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    let order = &order[..rank];
    LoraSbModule {
        a: Matrix::from_fn(rank, inp, |k, i| F::from_f64(u[(i, order[k])])),
        b: Matrix::from_fn(out, rank, |o, k| F::from_f64(v[(o, order[k])])),
        r: Matrix::diag(&order.iter().map(|&k| F::from_f64(s[k])).collect::<Vec<_>>()),
    }
}

/// LoRA-SB initialization: adapters for `options.modules` of every layer from
/// the gradients of the base model (with `head`) on `batches`.
pub fn lora_sb_init<F: Float>(
    weights: &BertWeights<F>,
    head: &ClassifierHead<F>,
    batches: &[(EncodedBatch, Vec<u32>)],
    options: &LoraSbInitOptions,
) -> LoraSbAdapters<F> {
    let grads = accumulate_weight_gradients(weights, head, batches);
    let eta = F::from_f64(options.learning_rate);
    let layers = grads
        .iter()
        .map(|layer| {
            AdaptedLinear::ALL.map(|which| {
                options.modules.contains(&which).then(|| {
                    let g = &layer[which.index()];
                    let delta_w = g.map(|x| -eta * sign(x));
                    adapter_from_update(&delta_w, options.rank)
                })
            })
        })
        .collect();
    LoraSbAdapters { layers }
}

/// `torch.sign`: −1, 0 or 1.
fn sign<F: Float>(x: F) -> F {
    if x > F::ZERO {
        F::ONE
    } else if x < F::ZERO {
        -F::ONE
    } else {
        F::ZERO
    }
}
