//! LoRA-SB adapters and the classification head: the trainable state of a
//! participant, and gradients with the same structure.
//!
//! LoRA-SB (Ponkshe et al. 2024, "Initialization using update approximation
//! is a silver bullet for extreme efficient low-rank fine-tuning") adapts a
//! frozen linear layer as `y = W0·x + b + B·R·A·x` with `A` (r×in) and `B`
//! (out×r) frozen and only `R` (r×r) trained.

use crate::model::{AdaptedLinear, BertConfig, BertWeights, SplitMix64};

use super::{Float, Matrix};

/// The adapter of one linear layer.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSbModule<F> {
    /// `r × in`, frozen.
    pub a: Matrix<F>,
    /// `out × r`, frozen.
    pub b: Matrix<F>,
    /// `r × r`, trained.
    pub r: Matrix<F>,
}

impl<F: Float> LoraSbModule<F> {
    pub fn rank(&self) -> usize {
        self.r.rows
    }

    /// The dense update `B·R·A` (out × in).
    pub fn delta_weight(&self) -> Matrix<F> {
        self.b.matmul(&self.r).matmul(&self.a)
    }

    pub fn map<G: Float>(&self, f: impl Fn(F) -> G + Copy) -> LoraSbModule<G> {
        LoraSbModule {
            a: self.a.map(f),
            b: self.b.map(f),
            r: self.r.map(f),
        }
    }
}

/// Adapters of a whole encoder: per layer, one optional module per
/// [`AdaptedLinear`] (indexed by [`AdaptedLinear::index`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSbAdapters<F> {
    pub layers: Vec<[Option<LoraSbModule<F>>; 6]>,
}

impl<F: Float> LoraSbAdapters<F> {
    pub fn module(&self, layer: usize, which: AdaptedLinear) -> Option<&LoraSbModule<F>> {
        self.layers[layer][which.index()].as_ref()
    }

    pub fn module_mut(
        &mut self,
        layer: usize,
        which: AdaptedLinear,
    ) -> Option<&mut LoraSbModule<F>> {
        self.layers[layer][which.index()].as_mut()
    }

    /// Random adapters on all six linears of every layer (for tests): entries
    /// uniform in ±`scale`, a deterministic function of `seed`.
    pub fn random(config: &BertConfig, rank: usize, seed: u64, scale: f64) -> Self {
        let mut rng = SplitMix64(seed);
        let mut matrix =
            |rows, cols| Matrix::from_fn(rows, cols, |_, _| F::from_f64(scale * rng.signed()));
        let layers = (0..config.num_hidden_layers)
            .map(|_| {
                AdaptedLinear::ALL.map(|which| {
                    let (out, inp) = which.shape(config);
                    Some(LoraSbModule {
                        a: matrix(rank, inp),
                        b: matrix(out, rank),
                        r: matrix(rank, rank),
                    })
                })
            })
            .collect();
        Self { layers }
    }

    pub fn map<G: Float>(&self, f: impl Fn(F) -> G + Copy) -> LoraSbAdapters<G> {
        LoraSbAdapters {
            layers: self
                .layers
                .iter()
                .map(|l| l.each_ref().map(|m| m.as_ref().map(|m| m.map(f))))
                .collect(),
        }
    }

    /// Zero gradients shaped like the `R`s of these adapters.
    pub fn zero_gradients(&self) -> Vec<[Option<Matrix<F>>; 6]> {
        self.layers
            .iter()
            .map(|l| {
                l.each_ref()
                    .map(|m| m.as_ref().map(|m| Matrix::zeros(m.rank(), m.rank())))
            })
            .collect()
    }
}

impl LoraSbAdapters<f32> {
    /// `weights` with every module merged into its linear layer,
    /// `W + B·R·A` (summed in f64, rounded to f32 once): an encoder that
    /// needs no adapter, to save as a plain BERT checkpoint of the
    /// fine-tuned model. Biases and everything else are unchanged.
    ///
    /// # Panics
    /// If the adapters have more layers than `weights`, or a module's
    /// shape does not fit its linear layer.
    pub fn merged_into(&self, weights: &BertWeights<f32>) -> BertWeights<f32> {
        let mut merged = weights.clone();
        for (layer, modules) in self.layers.iter().enumerate() {
            for which in AdaptedLinear::ALL {
                let Some(m) = &modules[which.index()] else {
                    continue;
                };
                let delta = m.map(f64::from).delta_weight();
                let w = &mut merged.layers[layer].linear_mut(which).weight;
                assert_eq!(
                    w.shape,
                    [delta.rows, delta.cols],
                    "layer {layer} {which:?}: B·R·A does not fit the weight"
                );
                for (x, d) in w.data.iter_mut().zip(&delta.data) {
                    *x = (f64::from(*x) + d) as f32;
                }
            }
        }
        merged
    }
}

/// Classification head on the mean-pooled embedding: `logits = W·pooled + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassifierHead<F> {
    /// `num_labels × hidden`.
    pub weight: Matrix<F>,
    /// `num_labels`.
    pub bias: Vec<F>,
}

impl<F: Float> ClassifierHead<F> {
    pub fn num_labels(&self) -> usize {
        self.weight.rows
    }

    /// Weight uniform with standard deviation `std` (transformers uses a
    /// normal with std `initializer_range` = 0.02), bias zero; a deterministic
    /// function of `seed`.
    pub fn init(num_labels: usize, hidden: usize, std: f64, seed: u64) -> Self {
        let mut rng = SplitMix64(seed);
        let half_width = std * 3f64.sqrt();
        Self {
            weight: Matrix::from_fn(num_labels, hidden, |_, _| {
                F::from_f64(half_width * rng.signed())
            }),
            bias: vec![F::ZERO; num_labels],
        }
    }

    pub fn map<G: Float>(&self, f: impl Fn(F) -> G + Copy) -> ClassifierHead<G> {
        ClassifierHead {
            weight: self.weight.map(f),
            bias: self.bias.iter().map(|&x| f(x)).collect(),
        }
    }
}

/// Gradients of everything a participant trains: every `R` and the head.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainableGradients<F> {
    /// Per layer, per [`AdaptedLinear`]: `∂L/∂R` (r×r), `None` where not adapted.
    pub r: Vec<[Option<Matrix<F>>; 6]>,
    pub head_weight: Matrix<F>,
    pub head_bias: Vec<F>,
}

impl<F: Float> TrainableGradients<F> {
    /// All entries in a fixed order: the `R`s layer by layer in
    /// [`AdaptedLinear::ALL`] order (row-major), then head weight, then head bias.
    pub fn flatten(&self) -> Vec<F> {
        let mut out = Vec::new();
        for layer in &self.r {
            for m in layer.iter().flatten() {
                out.extend_from_slice(&m.data);
            }
        }
        out.extend_from_slice(&self.head_weight.data);
        out.extend_from_slice(&self.head_bias);
        out
    }

    /// Joint L2 norm (what DP-SGD clips).
    pub fn l2_norm(&self) -> F {
        self.flatten().iter().map(|&x| x * x).sum::<F>().sqrt()
    }

    /// `self += scale · other`.
    pub fn add_scaled(&mut self, other: &Self, scale: F) {
        for (la, lb) in self.r.iter_mut().zip(&other.r) {
            for (a, b) in la.iter_mut().zip(lb) {
                if let (Some(a), Some(b)) = (a.as_mut(), b.as_ref()) {
                    a.add_scaled(b, scale);
                }
            }
        }
        self.head_weight.add_scaled(&other.head_weight, scale);
        for (a, &b) in self.head_bias.iter_mut().zip(&other.head_bias) {
            *a += scale * b;
        }
    }

    pub fn map<G: Float>(&self, f: impl Fn(F) -> G + Copy) -> TrainableGradients<G> {
        TrainableGradients {
            r: self
                .r
                .iter()
                .map(|l| l.each_ref().map(|m| m.as_ref().map(|m| m.map(f))))
                .collect(),
            head_weight: self.head_weight.map(f),
            head_bias: self.head_bias.iter().map(|&x| f(x)).collect(),
        }
    }
}
