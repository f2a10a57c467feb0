//! Forward and backward of the encoder's building blocks, one function each,
//! mirroring the PyTorch modules of `transformers.models.bert`: LayerNorm,
//! exact GELU, masked multi-head self-attention, mean pooling and softmax
//! cross-entropy. They are public so that each GPU kernel can be checked
//! against the same code the whole-model reference uses.

use super::matrix::{axpy, dot};
use super::{Float, Matrix};

/// What LayerNorm's backward needs: the normalized rows and `1/σ` per row.
#[derive(Debug, Clone)]
pub struct LayerNormCache<F> {
    pub normalized: Matrix<F>,
    pub inv_std: Vec<F>,
}

/// `y = γ·(x − mean)/√(var + eps) + β` per row (biased variance, as PyTorch).
pub fn layer_norm<F: Float>(
    x: &Matrix<F>,
    gamma: &[F],
    beta: &[F],
    eps: F,
) -> (Matrix<F>, LayerNormCache<F>) {
    let (rows, cols) = (x.rows, x.cols);
    let n = F::from_usize(cols);
    let mut y = Matrix::zeros(rows, cols);
    let mut normalized = Matrix::zeros(rows, cols);
    let mut inv_std = Vec::with_capacity(rows);
    for i in 0..rows {
        let xi = x.row(i);
        let mean = xi.iter().copied().sum::<F>() / n;
        let var = xi.iter().map(|&v| (v - mean) * (v - mean)).sum::<F>() / n;
        let rstd = F::ONE / (var + eps).sqrt();
        inv_std.push(rstd);
        let ni = normalized.row_mut(i);
        for (o, &v) in ni.iter_mut().zip(xi) {
            *o = (v - mean) * rstd;
        }
        let ni = normalized.row(i).to_vec();
        for (j, o) in y.row_mut(i).iter_mut().enumerate() {
            *o = gamma[j] * ni[j] + beta[j];
        }
    }
    (
        y,
        LayerNormCache {
            normalized,
            inv_std,
        },
    )
}

/// Gradient of LayerNorm with respect to its input (γ and β are frozen).
pub fn layer_norm_backward<F: Float>(
    dy: &Matrix<F>,
    gamma: &[F],
    cache: &LayerNormCache<F>,
) -> Matrix<F> {
    let (rows, cols) = (dy.rows, dy.cols);
    let n = F::from_usize(cols);
    let mut dx = Matrix::zeros(rows, cols);
    let mut g = vec![F::ZERO; cols];
    for i in 0..rows {
        let xh = cache.normalized.row(i);
        for (j, gj) in g.iter_mut().enumerate() {
            *gj = dy.row(i)[j] * gamma[j];
        }
        let mean_g = g.iter().copied().sum::<F>() / n;
        let mean_gx = dot(&g, xh) / n;
        let rstd = cache.inv_std[i];
        for (j, o) in dx.row_mut(i).iter_mut().enumerate() {
            *o = rstd * (g[j] - mean_g - xh[j] * mean_gx);
        }
    }
    dx
}

/// Exact GELU, `x·Φ(x) = ½x(1 + erf(x/√2))` (PyTorch's default `gelu`).
pub fn gelu<F: Float>(x: F) -> F {
    let half = F::from_f64(0.5);
    half * x * (F::ONE + (x * F::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// `d gelu(x) / dx = Φ(x) + x·φ(x)`.
pub fn gelu_derivative<F: Float>(x: F) -> F {
    let half = F::from_f64(0.5);
    let cdf = half * (F::ONE + (x * F::from_f64(std::f64::consts::FRAC_1_SQRT_2)).erf());
    let pdf = F::from_f64(0.398_942_280_401_432_7) * (-(half * x * x)).exp();
    cdf + x * pdf
}

/// Softmax probabilities of the attention, `batch × heads × seq × seq`
/// (row `i` of sample `n`, head `h` at `((n·heads + h)·seq + i)·seq`).
#[derive(Debug, Clone)]
pub struct AttentionCache<F> {
    pub probs: Vec<F>,
}

/// Multi-head scaled dot-product self-attention with a key padding mask.
///
/// `q`, `k`, `v` are `(batch·seq) × hidden`, heads are consecutive column
/// blocks of width `hidden / heads`. Keys whose `mask` is 0 get probability
/// exactly 0 (PyTorch adds the dtype's minimum to their scores). Returns the
/// context `(batch·seq) × hidden`.
pub fn attention<F: Float>(
    q: &Matrix<F>,
    k: &Matrix<F>,
    v: &Matrix<F>,
    mask: &[u32],
    batch: usize,
    seq: usize,
    heads: usize,
) -> (Matrix<F>, AttentionCache<F>) {
    let hidden = q.cols;
    let dh = hidden / heads;
    let scale = F::ONE / F::from_usize(dh).sqrt();
    let mut ctx = Matrix::zeros(batch * seq, hidden);
    let mut probs = vec![F::ZERO; batch * heads * seq * seq];
    let mut scores = vec![F::ZERO; seq];
    for n in 0..batch {
        let keep = &mask[n * seq..(n + 1) * seq];
        for h in 0..heads {
            let cols = h * dh..(h + 1) * dh;
            for i in 0..seq {
                let qi = &q.row(n * seq + i)[cols.clone()];
                let mut max = None::<F>;
                for j in 0..seq {
                    if keep[j] != 0 {
                        let s = dot(qi, &k.row(n * seq + j)[cols.clone()]) * scale;
                        scores[j] = s;
                        max = Some(max.map_or(s, |m: F| m.max(s)));
                    }
                }
                let Some(max) = max else { continue };
                let p = &mut probs[((n * heads + h) * seq + i) * seq..][..seq];
                let mut sum = F::ZERO;
                for j in 0..seq {
                    if keep[j] != 0 {
                        p[j] = (scores[j] - max).exp();
                        sum += p[j];
                    }
                }
                let ci = &mut ctx.data[(n * seq + i) * hidden..][..hidden][cols.clone()];
                for j in 0..seq {
                    if keep[j] != 0 {
                        p[j] /= sum;
                        axpy(p[j], &v.row(n * seq + j)[cols.clone()], ci);
                    }
                }
            }
        }
    }
    (ctx, AttentionCache { probs })
}

/// Gradients of [`attention`] with respect to `q`, `k` and `v`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<F: Float>(
    dctx: &Matrix<F>,
    q: &Matrix<F>,
    k: &Matrix<F>,
    v: &Matrix<F>,
    cache: &AttentionCache<F>,
    batch: usize,
    seq: usize,
    heads: usize,
) -> (Matrix<F>, Matrix<F>, Matrix<F>) {
    let hidden = q.cols;
    let dh = hidden / heads;
    let scale = F::ONE / F::from_usize(dh).sqrt();
    let mut dq = Matrix::zeros(q.rows, hidden);
    let mut dk = Matrix::zeros(k.rows, hidden);
    let mut dv = Matrix::zeros(v.rows, hidden);
    let mut dp = vec![F::ZERO; seq];
    for n in 0..batch {
        for h in 0..heads {
            let cols = h * dh..(h + 1) * dh;
            for i in 0..seq {
                let p = &cache.probs[((n * heads + h) * seq + i) * seq..][..seq];
                let dci = &dctx.row(n * seq + i)[cols.clone()];
                // dP_ij = dctx_i · v_j ; dV_j += P_ij dctx_i
                let mut weighted = F::ZERO;
                for j in 0..seq {
                    if p[j] != F::ZERO {
                        dp[j] = dot(dci, &v.row(n * seq + j)[cols.clone()]);
                        weighted += p[j] * dp[j];
                        axpy(p[j], dci, &mut dv.row_mut(n * seq + j)[cols.clone()]);
                    }
                }
                // dS_ij = P_ij (dP_ij − Σ_k P_ik dP_ik), scores = scale · q_i·k_j
                let qi = q.row(n * seq + i)[cols.clone()].to_vec();
                for j in 0..seq {
                    if p[j] != F::ZERO {
                        let ds = p[j] * (dp[j] - weighted) * scale;
                        axpy(
                            ds,
                            &k.row(n * seq + j)[cols.clone()],
                            &mut dq.row_mut(n * seq + i)[cols.clone()],
                        );
                        axpy(ds, &qi, &mut dk.row_mut(n * seq + j)[cols.clone()]);
                    }
                }
            }
        }
    }
    (dq, dk, dv)
}

/// Mean of the hidden states of the non-padding tokens of each sample
/// (sentence-transformers' mean pooling, without normalization): `batch × hidden`.
pub fn mean_pool<F: Float>(
    hidden: &Matrix<F>,
    mask: &[u32],
    batch: usize,
    seq: usize,
) -> Matrix<F> {
    let mut pooled = Matrix::zeros(batch, hidden.cols);
    for n in 0..batch {
        let count = mask[n * seq..(n + 1) * seq]
            .iter()
            .filter(|&&m| m != 0)
            .count();
        let inv = F::ONE / F::from_usize(count.max(1));
        let out = pooled.row_mut(n);
        for t in 0..seq {
            if mask[n * seq + t] != 0 {
                axpy(inv, hidden.row(n * seq + t), out);
            }
        }
    }
    pooled
}

/// Gradient of [`mean_pool`]: `(batch·seq) × hidden`, zero on padding.
pub fn mean_pool_backward<F: Float>(
    dpooled: &Matrix<F>,
    mask: &[u32],
    batch: usize,
    seq: usize,
) -> Matrix<F> {
    let mut dh = Matrix::zeros(batch * seq, dpooled.cols);
    for n in 0..batch {
        let count = mask[n * seq..(n + 1) * seq]
            .iter()
            .filter(|&&m| m != 0)
            .count();
        let inv = F::ONE / F::from_usize(count.max(1));
        for t in 0..seq {
            if mask[n * seq + t] != 0 {
                axpy(inv, dpooled.row(n), dh.row_mut(n * seq + t));
            }
        }
    }
    dh
}

/// Softmax cross-entropy of each row of `logits` against `labels`.
/// Returns the per-sample losses and `∂loss_n/∂logits_n = softmax − onehot`.
pub fn softmax_cross_entropy<F: Float>(logits: &Matrix<F>, labels: &[u32]) -> (Vec<F>, Matrix<F>) {
    assert_eq!(logits.rows, labels.len(), "one label per sample");
    let mut losses = Vec::with_capacity(logits.rows);
    let mut dlogits = Matrix::zeros(logits.rows, logits.cols);
    for (n, &label) in labels.iter().enumerate() {
        let row = logits.row(n);
        let label = label as usize;
        assert!(
            label < logits.cols,
            "label {label} out of range for {} classes",
            logits.cols
        );
        let max = row.iter().copied().fold(row[0], F::max);
        let sum = row.iter().map(|&z| (z - max).exp()).sum::<F>();
        let log_z = max + sum.ln();
        losses.push(log_z - row[label]);
        for (c, d) in dlogits.row_mut(n).iter_mut().enumerate() {
            *d = (row[c] - log_z).exp();
        }
        dlogits.row_mut(n)[label] -= F::ONE;
    }
    (losses, dlogits)
}
