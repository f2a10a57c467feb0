//! The whole training path on the CPU: embeddings, encoder layers with
//! LoRA-SB-adapted linears, mean pooling, classification head, softmax
//! cross-entropy, and the backward pass to every `R`, the head and
//! (for LoRA-SB initialization) every adapted weight `W0`.
//!
//! Mirrors `transformers.BertModel` in eval mode (no dropout) followed by
//! sentence-transformers' mean pooling and a linear head.

use crate::model::{AdaptedLinear, BertWeights, EncodedBatch, LinearWeights};

use super::ops::{
    attention, attention_backward, gelu, gelu_derivative, layer_norm, layer_norm_backward,
    mean_pool, mean_pool_backward, softmax_cross_entropy, AttentionCache, LayerNormCache,
};
use super::{ClassifierHead, Float, LoraSbAdapters, LoraSbModule, Matrix, TrainableGradients};

/// `y = x·W0ᵀ + b + ((x·Aᵀ)·Rᵀ)·Bᵀ`, i.e. `W0·x + b + B·R·A·x` per row.
/// Returns `y` and `x·Aᵀ` (rows × r, kept for the gradient of `R`).
pub fn lora_sb_linear<F: Float>(
    x: &Matrix<F>,
    linear: &LinearWeights<F>,
    adapter: Option<&LoraSbModule<F>>,
) -> (Matrix<F>, Option<Matrix<F>>) {
    let (out, inp) = (linear.out_features(), linear.in_features());
    assert_eq!(x.cols, inp, "linear input width");
    let mut y = Matrix::zeros(x.rows, out);
    for i in 0..x.rows {
        y.row_mut(i).copy_from_slice(&linear.bias.data);
    }
    super::matrix::matmul_nt_acc(&x.data, &linear.weight.data, x.rows, inp, out, &mut y.data);
    let xa = adapter.map(|m| {
        let xa = x.matmul_t(&m.a);
        let lora = xa.matmul_t(&m.r).matmul_t(&m.b);
        y.add_scaled(&lora, F::ONE);
        xa
    });
    (y, xa)
}

/// Gradients of one adapted linear layer.
#[derive(Debug, Clone)]
pub struct LinearGradients<F> {
    /// `∂/∂x`: `dY·W0 + (dY·B)·R·A`.
    pub dx: Matrix<F>,
    /// `dY·B` (rows × r): `∂/∂R = (dY·B)ᵀ·(X·Aᵀ)` over any set of rows.
    pub dy_b: Option<Matrix<F>>,
    /// `∂/∂W0 = dYᵀ·X` (out × in), when asked for.
    pub dw: Option<Matrix<F>>,
}

/// Backward of [`lora_sb_linear`] given `dy`, the input `x`; `W0` and the
/// adapter are frozen apart from `R`.
pub fn lora_sb_linear_backward<F: Float>(
    dy: &Matrix<F>,
    x: &Matrix<F>,
    linear: &LinearWeights<F>,
    adapter: Option<&LoraSbModule<F>>,
    weight_gradient: bool,
) -> LinearGradients<F> {
    let (out, inp) = (linear.out_features(), linear.in_features());
    let mut dx = Matrix::zeros(dy.rows, inp);
    super::matrix::matmul_nn_acc(
        &dy.data,
        &linear.weight.data,
        dy.rows,
        out,
        inp,
        &mut dx.data,
    );
    let dy_b = adapter.map(|m| {
        let dy_b = dy.matmul(&m.b);
        dx.add_scaled(&dy_b.matmul(&m.r).matmul(&m.a), F::ONE);
        dy_b
    });
    let dw = weight_gradient.then(|| dy.t_matmul(x));
    LinearGradients { dx, dy_b, dw }
}

/// Everything the backward pass of one encoder layer needs.
struct LayerCache<F> {
    input: Matrix<F>,
    /// `x·Aᵀ` per adapted linear.
    xa: [Option<Matrix<F>>; 6],
    q: Matrix<F>,
    k: Matrix<F>,
    v: Matrix<F>,
    attention: AttentionCache<F>,
    context: Matrix<F>,
    ln1: LayerNormCache<F>,
    h1: Matrix<F>,
    intermediate_pre: Matrix<F>,
    intermediate_act: Matrix<F>,
    ln2: LayerNormCache<F>,
}

/// Forward activations of a batch.
struct Forward<F> {
    layers: Vec<LayerCache<F>>,
    hidden: Matrix<F>,
}

/// The CPU reference model: frozen weights plus optional LoRA-SB adapters.
#[derive(Debug, Clone, Copy)]
pub struct ReferenceEncoder<'a, F> {
    pub weights: &'a BertWeights<F>,
    pub adapters: Option<&'a LoraSbAdapters<F>>,
}

/// What [`ReferenceEncoder::loss_and_gradients`] should compute besides the batch gradient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackwardOptions {
    /// Gradients of each sample's own loss (for DP-SGD clipping).
    pub per_sample: bool,
    /// Gradients of the mean loss with respect to every adapted `W0` (for LoRA-SB init).
    pub weight_gradients: bool,
}

/// Result of one forward and backward pass.
#[derive(Debug, Clone)]
pub struct TrainingStep<F> {
    /// Mean cross-entropy over the batch.
    pub loss: F,
    pub sample_losses: Vec<F>,
    /// `batch × num_labels`.
    pub logits: Matrix<F>,
    /// Gradients of the mean loss.
    pub gradients: TrainableGradients<F>,
    /// `per_sample_gradients[n]` = gradients of `sample_losses[n]` (not divided
    /// by the batch size: their mean is `gradients`). Empty unless asked for.
    pub per_sample_gradients: Vec<TrainableGradients<F>>,
    /// Per layer, per [`AdaptedLinear`]: `∂loss/∂W0` (out × in). Empty unless asked for.
    pub weight_gradients: Vec<[Matrix<F>; 6]>,
}

impl<'a, F: Float> ReferenceEncoder<'a, F> {
    pub fn new(weights: &'a BertWeights<F>, adapters: Option<&'a LoraSbAdapters<F>>) -> Self {
        if let Some(a) = adapters {
            assert_eq!(
                a.layers.len(),
                weights.layers.len(),
                "one adapter set per encoder layer"
            );
        }
        Self { weights, adapters }
    }

    fn adapter(&self, layer: usize, which: AdaptedLinear) -> Option<&'a LoraSbModule<F>> {
        self.adapters.and_then(|a| a.module(layer, which))
    }

    /// Word + position + token type embeddings, then LayerNorm: `(batch·seq) × hidden`.
    ///
    /// # Panics
    /// If a token id or type id is outside its table, or `seq_len` exceeds
    /// `max_position_embeddings`.
    pub fn embed(&self, batch: &EncodedBatch) -> Matrix<F> {
        let w = self.weights;
        let c = &w.config;
        let h = c.hidden_size;
        assert!(
            batch.seq_len <= c.max_position_embeddings,
            "sequence length {} exceeds max_position_embeddings {}",
            batch.seq_len,
            c.max_position_embeddings
        );
        let rows = batch.batch_size * batch.seq_len;
        let mut x = Matrix::zeros(rows, h);
        for row in 0..rows {
            let (id, tt, t) = (
                batch.input_ids[row] as usize,
                batch.token_type_ids[row] as usize,
                row % batch.seq_len,
            );
            assert!(
                id < c.vocab_size,
                "token id {id} outside the vocabulary ({})",
                c.vocab_size
            );
            assert!(
                tt < c.type_vocab_size,
                "token type {tt} outside type_vocab_size ({})",
                c.type_vocab_size
            );
            let out = x.row_mut(row);
            let tables = [
                &w.embeddings.word.data[id * h..(id + 1) * h],
                &w.embeddings.position.data[t * h..(t + 1) * h],
                &w.embeddings.token_type.data[tt * h..(tt + 1) * h],
            ];
            for (j, o) in out.iter_mut().enumerate() {
                *o = tables[0][j] + tables[1][j] + tables[2][j];
            }
        }
        let ln = &w.embeddings.layer_norm;
        layer_norm(
            &x,
            &ln.weight.data,
            &ln.bias.data,
            F::from_f64(c.layer_norm_eps),
        )
        .0
    }

    fn forward(&self, batch: &EncodedBatch) -> Forward<F> {
        let c = &self.weights.config;
        let eps = F::from_f64(c.layer_norm_eps);
        let mut hidden = self.embed(batch);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for (l, lw) in self.weights.layers.iter().enumerate() {
            let x = hidden;
            let lin = |which: AdaptedLinear, input: &Matrix<F>| {
                lora_sb_linear(input, lw.linear(which), self.adapter(l, which))
            };
            let (q, q_xa) = lin(AdaptedLinear::Query, &x);
            let (k, k_xa) = lin(AdaptedLinear::Key, &x);
            let (v, v_xa) = lin(AdaptedLinear::Value, &x);
            let (context, attn) = attention(
                &q,
                &k,
                &v,
                &batch.attention_mask,
                batch.batch_size,
                batch.seq_len,
                c.num_attention_heads,
            );
            let (mut a, ao_xa) = lin(AdaptedLinear::AttentionOutput, &context);
            a.add_scaled(&x, F::ONE);
            let ln = &lw.attention_layer_norm;
            let (h1, ln1) = layer_norm(&a, &ln.weight.data, &ln.bias.data, eps);
            let (intermediate_pre, i_xa) = lin(AdaptedLinear::Intermediate, &h1);
            let intermediate_act = intermediate_pre.map(gelu);
            let (mut o, o_xa) = lin(AdaptedLinear::Output, &intermediate_act);
            o.add_scaled(&h1, F::ONE);
            let ln = &lw.output_layer_norm;
            let (h2, ln2) = layer_norm(&o, &ln.weight.data, &ln.bias.data, eps);
            layers.push(LayerCache {
                input: x,
                xa: [q_xa, k_xa, v_xa, ao_xa, i_xa, o_xa],
                q,
                k,
                v,
                attention: attn,
                context,
                ln1,
                h1,
                intermediate_pre,
                intermediate_act,
                ln2,
            });
            hidden = h2;
        }
        Forward { layers, hidden }
    }

    /// Last hidden state, `(batch·seq) × hidden` (padding rows included).
    pub fn last_hidden_state(&self, batch: &EncodedBatch) -> Matrix<F> {
        self.forward(batch).hidden
    }

    /// Mean-pooled embeddings over non-padding tokens, `batch × hidden`, not
    /// normalized (what `fedsb embed` writes).
    pub fn mean_pooled(&self, batch: &EncodedBatch) -> Matrix<F> {
        let hidden = self.last_hidden_state(batch);
        mean_pool(
            &hidden,
            &batch.attention_mask,
            batch.batch_size,
            batch.seq_len,
        )
    }

    /// Logits of the classification head, `batch × num_labels`.
    pub fn logits(&self, head: &ClassifierHead<F>, batch: &EncodedBatch) -> Matrix<F> {
        head_forward(head, &self.mean_pooled(batch))
    }

    /// Mean softmax cross-entropy of the batch and its gradients with respect
    /// to every `R` and the head (and, as `options` asks, per sample and with
    /// respect to every adapted `W0`).
    pub fn loss_and_gradients(
        &self,
        head: &ClassifierHead<F>,
        batch: &EncodedBatch,
        labels: &[u32],
        options: BackwardOptions,
    ) -> TrainingStep<F> {
        let c = &self.weights.config;
        let (n_batch, seq) = (batch.batch_size, batch.seq_len);
        assert_eq!(labels.len(), n_batch, "one label per sample");
        let fwd = self.forward(batch);
        let pooled = mean_pool(&fwd.hidden, &batch.attention_mask, n_batch, seq);
        let logits = head_forward(head, &pooled);
        // dlogits = ∂(Σ_n loss_n)/∂logits; the mean loss scales everything by 1/N.
        let (sample_losses, dlogits) = softmax_cross_entropy(&logits, labels);
        let inv_n = F::ONE / F::from_usize(n_batch);
        let loss = sample_losses.iter().copied().sum::<F>() * inv_n;

        let mut gradients = TrainableGradients {
            r: self.zero_r_gradients(),
            head_weight: dlogits.t_matmul(&pooled).map(|x| x * inv_n),
            head_bias: (0..head.num_labels())
                .map(|j| (0..n_batch).map(|n| dlogits.get(n, j)).sum::<F>() * inv_n)
                .collect(),
        };
        let mut per_sample: Vec<TrainableGradients<F>> = if options.per_sample {
            (0..n_batch)
                .map(|n| TrainableGradients {
                    r: self.zero_r_gradients(),
                    head_weight: Matrix::from_fn(head.num_labels(), c.hidden_size, |j, i| {
                        dlogits.get(n, j) * pooled.get(n, i)
                    }),
                    head_bias: dlogits.row(n).to_vec(),
                })
                .collect()
        } else {
            Vec::new()
        };
        let mut weight_gradients: Vec<[Matrix<F>; 6]> = Vec::new();

        let dpooled = dlogits.matmul(&head.weight);
        let mut dh = mean_pool_backward(&dpooled, &batch.attention_mask, n_batch, seq);
        for (l, cache) in fwd.layers.iter().enumerate().rev() {
            let lw = &self.weights.layers[l];
            let mut dw_layer: [Option<Matrix<F>>; 6] = Default::default();
            let mut record = |which: AdaptedLinear, g: &LinearGradients<F>| {
                let i = which.index();
                if let (Some(dy_b), Some(xa)) = (&g.dy_b, &cache.xa[i]) {
                    if let Some(gr) = gradients.r[l][i].as_mut() {
                        gr.add_scaled(&dy_b.t_matmul(xa), inv_n);
                    }
                    for (n, ps) in per_sample.iter_mut().enumerate() {
                        let rows = n * seq..(n + 1) * seq;
                        if let Some(gr) = ps.r[l][i].as_mut() {
                            *gr = dy_b.rows_slice(rows.clone()).t_matmul(&xa.rows_slice(rows));
                        }
                    }
                }
                if let Some(dw) = &g.dw {
                    dw_layer[i] = Some(dw.map(|x| x * inv_n));
                }
            };
            let back = |which: AdaptedLinear, dy: &Matrix<F>, input: &Matrix<F>| {
                lora_sb_linear_backward(
                    dy,
                    input,
                    lw.linear(which),
                    self.adapter(l, which),
                    options.weight_gradients,
                )
            };

            // h2 = LN2(o + h1)
            let d_sum2 = layer_norm_backward(&dh, &lw.output_layer_norm.weight.data, &cache.ln2);
            let g_out = back(AdaptedLinear::Output, &d_sum2, &cache.intermediate_act);
            record(AdaptedLinear::Output, &g_out);
            let mut d_pre = g_out.dx;
            for (d, &x) in d_pre.data.iter_mut().zip(&cache.intermediate_pre.data) {
                *d *= gelu_derivative(x);
            }
            let g_int = back(AdaptedLinear::Intermediate, &d_pre, &cache.h1);
            record(AdaptedLinear::Intermediate, &g_int);
            let mut dh1 = d_sum2;
            dh1.add_scaled(&g_int.dx, F::ONE);
            // h1 = LN1(attention_output(context) + x)
            let d_sum1 =
                layer_norm_backward(&dh1, &lw.attention_layer_norm.weight.data, &cache.ln1);
            let g_ao = back(AdaptedLinear::AttentionOutput, &d_sum1, &cache.context);
            record(AdaptedLinear::AttentionOutput, &g_ao);
            let (dq, dk, dv) = attention_backward(
                &g_ao.dx,
                &cache.q,
                &cache.k,
                &cache.v,
                &cache.attention,
                n_batch,
                seq,
                c.num_attention_heads,
            );
            let mut dx = d_sum1;
            for (which, d) in [
                (AdaptedLinear::Query, &dq),
                (AdaptedLinear::Key, &dk),
                (AdaptedLinear::Value, &dv),
            ] {
                let g = back(which, d, &cache.input);
                record(which, &g);
                dx.add_scaled(&g.dx, F::ONE);
            }
            if options.weight_gradients {
                weight_gradients.push(dw_layer.map(|m| m.expect("weight gradient computed")));
            }
            dh = dx;
        }
        weight_gradients.reverse();
        TrainingStep {
            loss,
            sample_losses,
            logits,
            gradients,
            per_sample_gradients: per_sample,
            weight_gradients,
        }
    }

    /// Mean cross-entropy only (for finite differences and evaluation).
    pub fn loss(&self, head: &ClassifierHead<F>, batch: &EncodedBatch, labels: &[u32]) -> F {
        let (losses, _) = softmax_cross_entropy(&self.logits(head, batch), labels);
        losses.iter().copied().sum::<F>() / F::from_usize(losses.len())
    }

    fn zero_r_gradients(&self) -> Vec<[Option<Matrix<F>>; 6]> {
        match self.adapters {
            Some(a) => a.zero_gradients(),
            None => (0..self.weights.layers.len())
                .map(|_| Default::default())
                .collect(),
        }
    }
}

/// `logits = pooled·Wᵀ + b`.
pub fn head_forward<F: Float>(head: &ClassifierHead<F>, pooled: &Matrix<F>) -> Matrix<F> {
    let mut logits = pooled.matmul_t(&head.weight);
    for n in 0..logits.rows {
        for (z, &b) in logits.row_mut(n).iter_mut().zip(&head.bias) {
            *z += b;
        }
    }
    logits
}
