//! Plain-Rust references of every GPU kernel, written for clarity, not speed.
//!
//! The GPU tests compare each kernel against these on random inputs. Sums are
//! accumulated in `f64` so the reference is the more accurate side.

use super::matmul::Gemm;

/// `C = alpha·op(A)·op(B) (+ bias) (+ C)` exactly as [`super::matmul::gemm`] defines it.
pub fn gemm(g: &Gemm, a: &[f32], b: &[f32], bias: Option<&[f32]>, c: &mut [f32]) {
    for outer in 0..g.batch[0] {
        for inner in 0..g.batch[1] {
            let base = |w: usize| {
                g.offsets[w] + outer * g.batch_strides[w][0] + inner * g.batch_strides[w][1]
            };
            let (ab, bb, cb) = (base(0), base(1), base(2));
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0.0f64;
                    for l in 0..g.k {
                        let av = if g.trans_a {
                            a[ab + l * g.ld[0] + i]
                        } else {
                            a[ab + i * g.ld[0] + l]
                        };
                        let bv = if g.trans_b {
                            b[bb + j * g.ld[1] + l]
                        } else {
                            b[bb + l * g.ld[1] + j]
                        };
                        s += av as f64 * bv as f64;
                    }
                    let mut v = g.alpha as f64 * s;
                    if let Some(bias) = bias {
                        v += bias[j] as f64;
                    }
                    let idx = cb + i * g.ld[2] + j;
                    if g.accumulate {
                        v += c[idx] as f64;
                    }
                    c[idx] = v as f32;
                }
            }
        }
    }
}

/// erf in f64 to about 1e-15: Taylor series below 2.5, continued fraction of erfc above.
pub fn erf(x: f64) -> f64 {
    let a = x.abs();
    let r = if a < 2.5 {
        // erf(x) = 2/√π · Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let mut term = a;
        let mut sum = a;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -a * a / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + ...)))), evaluated bottom-up.
        let mut f = a;
        for k in (1..=60).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / f
    };
    r.copysign(x)
}

/// Exact GELU `x·Φ(x)`.
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (x * 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2))) as f32
}

/// Derivative of exact GELU: `Φ(x) + x·φ(x)`.
pub fn gelu_grad(x: f32) -> f32 {
    let x = x as f64;
    let cdf = 0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
    (cdf + x * pdf) as f32
}

/// LayerNorm of `x (+ residual)` rows of length `h`; returns (y, stats) with
/// stats = (mean, rstd) per row, as the GPU kernel.
pub fn layernorm_forward(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    h: usize,
    eps: f32,
) -> (Vec<f32>, Vec<f32>) {
    let rows = x.len() / h;
    let mut y = vec![0.0; x.len()];
    let mut stats = vec![0.0; 2 * rows];
    for r in 0..rows {
        let s: Vec<f64> = (0..h)
            .map(|j| x[r * h + j] as f64 + residual.map_or(0.0, |res| res[r * h + j] as f64))
            .collect();
        let mean = s.iter().sum::<f64>() / h as f64;
        let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / h as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for j in 0..h {
            y[r * h + j] = ((s[j] - mean) * rstd * gamma[j] as f64 + beta[j] as f64) as f32;
        }
        stats[2 * r] = mean as f32;
        stats[2 * r + 1] = rstd as f32;
    }
    (y, stats)
}

/// Input gradient of LayerNorm (gamma, beta frozen), recomputing the statistics.
pub fn layernorm_backward(
    x: &[f32],
    residual: Option<&[f32]>,
    gamma: &[f32],
    dy: &[f32],
    h: usize,
    eps: f32,
) -> Vec<f32> {
    let rows = x.len() / h;
    let mut dx = vec![0.0; x.len()];
    for r in 0..rows {
        let s: Vec<f64> = (0..h)
            .map(|j| x[r * h + j] as f64 + residual.map_or(0.0, |res| res[r * h + j] as f64))
            .collect();
        let mean = s.iter().sum::<f64>() / h as f64;
        let var = s.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / h as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let xhat: Vec<f64> = s.iter().map(|v| (v - mean) * rstd).collect();
        let g: Vec<f64> = (0..h)
            .map(|j| dy[r * h + j] as f64 * gamma[j] as f64)
            .collect();
        let mg = g.iter().sum::<f64>() / h as f64;
        let mgx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / h as f64;
        for j in 0..h {
            dx[r * h + j] = (rstd * (g[j] - mg - xhat[j] * mgx)) as f32;
        }
    }
    dx
}

fn matmul_nt(x: &[f32], w: &[f32], rows: usize, inner: usize, out: usize) -> Vec<f64> {
    // X (rows×inner) · Wᵀ with W stored out×inner.
    let mut y = vec![0.0; rows * out];
    for t in 0..rows {
        for o in 0..out {
            y[t * out + o] = (0..inner)
                .map(|k| x[t * inner + k] as f64 * w[o * inner + k] as f64)
                .sum();
        }
    }
    y
}

/// LoRA-SB forward of one layer: returns (`xa = X·Aᵀ`, `y + B·R·A·x` per row).
pub fn lora_sb_forward(
    x: &[f32],
    a: &[f32],
    r: &[f32],
    b: &[f32],
    y: &[f32],
    d: &super::lora_sb::LoraSbDims,
) -> (Vec<f32>, Vec<f32>) {
    let xa = matmul_nt(x, a, d.rows, d.in_features, d.rank);
    let mut out = y.to_vec();
    for t in 0..d.rows {
        // (R·(A·x))_i
        let rax: Vec<f64> = (0..d.rank)
            .map(|i| {
                (0..d.rank)
                    .map(|j| r[i * d.rank + j] as f64 * xa[t * d.rank + j])
                    .sum()
            })
            .collect();
        for o in 0..d.out_features {
            let add: f64 = (0..d.rank).map(|i| b[o * d.rank + i] as f64 * rax[i]).sum();
            out[t * d.out_features + o] = (out[t * d.out_features + o] as f64 + add) as f32;
        }
    }
    (xa.iter().map(|&v| v as f32).collect(), out)
}

/// LoRA-SB backward of one layer from the definitions: returns
/// (`dx + dY·B·R·A`, per-sample `G_n = Σ_{t: sample_of[t] = n} (Bᵀ·dy_t)·(A·x_t)ᵀ`).
#[allow(clippy::too_many_arguments)]
pub fn lora_sb_backward(
    x: &[f32],
    dy: &[f32],
    a: &[f32],
    r: &[f32],
    b: &[f32],
    dx: &[f32],
    sample_of: &[u32],
    batch: usize,
    d: &super::lora_sb::LoraSbDims,
) -> (Vec<f32>, Vec<f32>) {
    let rk = d.rank;
    let mut dx_out = dx.to_vec();
    let mut grads = vec![0.0f64; batch * rk * rk];
    for t in 0..d.rows {
        // u = Bᵀ·dy_t, ax = A·x_t
        let u: Vec<f64> = (0..rk)
            .map(|i| {
                (0..d.out_features)
                    .map(|o| dy[t * d.out_features + o] as f64 * b[o * rk + i] as f64)
                    .sum()
            })
            .collect();
        let ax: Vec<f64> = (0..rk)
            .map(|j| {
                (0..d.in_features)
                    .map(|k| a[j * d.in_features + k] as f64 * x[t * d.in_features + k] as f64)
                    .sum()
            })
            .collect();
        // dx_t += Aᵀ·Rᵀ·u
        let ru: Vec<f64> = (0..rk)
            .map(|j| (0..rk).map(|i| r[i * rk + j] as f64 * u[i]).sum())
            .collect();
        for k in 0..d.in_features {
            let add: f64 = (0..rk)
                .map(|j| ru[j] * a[j * d.in_features + k] as f64)
                .sum();
            dx_out[t * d.in_features + k] = (dx_out[t * d.in_features + k] as f64 + add) as f32;
        }
        let n = sample_of[t] as usize;
        if n < batch {
            for i in 0..rk {
                for j in 0..rk {
                    grads[(n * rk + i) * rk + j] += u[i] * ax[j];
                }
            }
        }
    }
    (dx_out, grads.iter().map(|&v| v as f32).collect())
}

/// Attention forward: (probs `[B,H,T,T]`, context `[B,T,H·D]`).
pub fn attention_forward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[u32],
    s: &super::attention::AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    let (bsz, t, h, d) = (s.batch, s.seq, s.heads, s.head_dim);
    let hd = h * d;
    let scale = 1.0 / (d as f64).sqrt();
    let mut probs = vec![0.0f32; bsz * h * t * t];
    let mut ctx = vec![0.0f32; bsz * t * hd];
    for b in 0..bsz {
        for hh in 0..h {
            for i in 0..t {
                let scores: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..d)
                            .map(|e| {
                                q[(b * t + i) * hd + hh * d + e] as f64
                                    * k[(b * t + j) * hd + hh * d + e] as f64
                            })
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let valid = |j: usize| key_mask[b * t + j] != 0;
                let m = (0..t)
                    .filter(|&j| valid(j))
                    .map(|j| scores[j])
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = (0..t)
                    .filter(|&j| valid(j))
                    .map(|j| (scores[j] - m).exp())
                    .sum();
                let row: Vec<f64> = (0..t)
                    .map(|j| {
                        if valid(j) {
                            (scores[j] - m).exp() / z
                        } else {
                            0.0
                        }
                    })
                    .collect();
                for j in 0..t {
                    probs[((b * h + hh) * t + i) * t + j] = row[j] as f32;
                }
                for e in 0..d {
                    ctx[(b * t + i) * hd + hh * d + e] = (0..t)
                        .map(|j| row[j] * v[(b * t + j) * hd + hh * d + e] as f64)
                        .sum::<f64>()
                        as f32;
                }
            }
        }
    }
    (probs, ctx)
}

/// The attention softmax alone: each row of `seq` scores (`[B,H,T,T]`) to
/// probabilities over its valid keys (`key_mask[b·T + j]` ≠ 0); padding keys,
/// and every key of a row without a valid one, get 0.
pub fn masked_softmax(
    scores: &[f32],
    key_mask: &[u32],
    s: &super::attention::AttentionShape,
) -> Vec<f32> {
    let t = s.seq;
    let mut probs = vec![0.0f32; s.probs_len()];
    for (r, (row, out)) in scores.chunks(t).zip(probs.chunks_mut(t)).enumerate() {
        let b = r / (s.heads * t);
        let valid = |j: usize| key_mask[b * t + j] != 0;
        let m = (0..t)
            .filter(|&j| valid(j))
            .map(|j| f64::from(row[j]))
            .fold(f64::NEG_INFINITY, f64::max);
        let z: f64 = (0..t)
            .filter(|&j| valid(j))
            .map(|j| (f64::from(row[j]) - m).exp())
            .sum();
        for j in (0..t).filter(|&j| valid(j)) {
            out[j] = ((f64::from(row[j]) - m).exp() / z) as f32;
        }
    }
    probs
}

/// The attention softmax's backward alone: `dS = scale · P · (dP − Σ_k P·dP)`
/// per row, with `scale = 1/√head_dim`.
pub fn masked_softmax_backward(
    probs: &[f32],
    dprobs: &[f32],
    s: &super::attention::AttentionShape,
) -> Vec<f32> {
    let t = s.seq;
    let scale = 1.0 / (s.head_dim as f64).sqrt();
    let mut ds = vec![0.0f32; s.probs_len()];
    for ((p, dp), out) in probs.chunks(t).zip(dprobs.chunks(t)).zip(ds.chunks_mut(t)) {
        let dot: f64 = p
            .iter()
            .zip(dp)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum();
        for j in 0..t {
            out[j] = (scale * f64::from(p[j]) * (f64::from(dp[j]) - dot)) as f32;
        }
    }
    ds
}

/// Attention backward from the definitions: (dq, dk, dv), recomputing the probabilities.
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    key_mask: &[u32],
    dctx: &[f32],
    s: &super::attention::AttentionShape,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (bsz, t, h, d) = (s.batch, s.seq, s.heads, s.head_dim);
    let hd = h * d;
    let scale = 1.0 / (d as f64).sqrt();
    let (probs, _) = attention_forward(q, k, v, key_mask, s);
    let mut dq = vec![0.0f64; q.len()];
    let mut dk = vec![0.0f64; k.len()];
    let mut dv = vec![0.0f64; v.len()];
    let at = |buf: &[f32], b: usize, i: usize, hh: usize, e: usize| {
        buf[(b * t + i) * hd + hh * d + e] as f64
    };
    for b in 0..bsz {
        for hh in 0..h {
            for i in 0..t {
                let p: Vec<f64> = (0..t)
                    .map(|j| probs[((b * h + hh) * t + i) * t + j] as f64)
                    .collect();
                let dp: Vec<f64> = (0..t)
                    .map(|j| {
                        (0..d)
                            .map(|e| at(dctx, b, i, hh, e) * at(v, b, j, hh, e))
                            .sum()
                    })
                    .collect();
                let dot: f64 = (0..t).map(|j| p[j] * dp[j]).sum();
                for j in 0..t {
                    let ds = p[j] * (dp[j] - dot) * scale;
                    for e in 0..d {
                        dv[(b * t + j) * hd + hh * d + e] += p[j] * at(dctx, b, i, hh, e);
                        dq[(b * t + i) * hd + hh * d + e] += ds * at(k, b, j, hh, e);
                        dk[(b * t + j) * hd + hh * d + e] += ds * at(q, b, i, hh, e);
                    }
                }
            }
        }
    }
    let f = |x: Vec<f64>| x.iter().map(|&v| v as f32).collect();
    (f(dq), f(dk), f(dv))
}

/// AdamW steps (torch.optim.AdamW), one per gradient in `grads`, in f64.
/// Elements from `split` on form a second parameter group at `lr ·
/// head_lr_scale`.
pub fn adamw(
    param: &[f32],
    grads: &[Vec<f32>],
    opt: &super::adamw::AdamW,
    split: usize,
) -> Vec<f32> {
    let (b1, b2) = (opt.beta1 as f64, opt.beta2 as f64);
    let (eps, wd) = (opt.eps as f64, opt.weight_decay as f64);
    let head_lr = opt.head_lr() as f64;
    let mut p: Vec<f64> = param.iter().map(|&x| x as f64).collect();
    let mut m = vec![0.0; p.len()];
    let mut v = vec![0.0; p.len()];
    for (step, g) in grads.iter().enumerate() {
        let t = step as i32 + 1;
        for i in 0..p.len() {
            let lr = if i >= split { head_lr } else { opt.lr as f64 };
            let gi = g[i] as f64;
            p[i] *= 1.0 - lr * wd;
            m[i] = b1 * m[i] + (1.0 - b1) * gi;
            v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
            let mhat = m[i] / (1.0 - b1.powi(t));
            let vhat = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * mhat / (vhat.sqrt() + eps);
        }
    }
    p.iter().map(|&x| x as f32).collect()
}

/// Mean over valid tokens: `[batch, hidden]` from `[batch, seq, hidden]`.
pub fn mean_pool(x: &[f32], mask: &[u32], s: &super::head::HeadShape) -> Vec<f32> {
    let mut out = vec![0.0; s.batch * s.hidden];
    for n in 0..s.batch {
        let valid: Vec<usize> = (0..s.seq).filter(|&t| mask[n * s.seq + t] != 0).collect();
        let count = valid.len().max(1) as f64;
        for k in 0..s.hidden {
            out[n * s.hidden + k] = (valid
                .iter()
                .map(|&t| x[(n * s.seq + t) * s.hidden + k] as f64)
                .sum::<f64>()
                / count) as f32;
        }
    }
    out
}

/// Backward of [`mean_pool`].
pub fn mean_pool_backward(dpooled: &[f32], mask: &[u32], s: &super::head::HeadShape) -> Vec<f32> {
    let mut dx = vec![0.0; s.batch * s.seq * s.hidden];
    for n in 0..s.batch {
        let count = (0..s.seq)
            .filter(|&t| mask[n * s.seq + t] != 0)
            .count()
            .max(1) as f32;
        for t in 0..s.seq {
            if mask[n * s.seq + t] != 0 {
                for k in 0..s.hidden {
                    dx[(n * s.seq + t) * s.hidden + k] = dpooled[n * s.hidden + k] / count;
                }
            }
        }
    }
    dx
}

/// Per-sample softmax cross-entropy: (loss, `scale·(softmax - onehot)`).
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[u32],
    classes: usize,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let batch = labels.len();
    let mut loss = vec![0.0; batch];
    let mut dlogits = vec![0.0; batch * classes];
    for n in 0..batch {
        let row: Vec<f64> = logits[n * classes..(n + 1) * classes]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss[n] = (lse - row[labels[n] as usize]) as f32;
        for c in 0..classes {
            let onehot = if c == labels[n] as usize { 1.0 } else { 0.0 };
            dlogits[n * classes + c] = (scale as f64 * ((row[c] - lse).exp() - onehot)) as f32;
        }
    }
    (loss, dlogits)
}

/// BERT embeddings sum for `ids.len()` tokens of sequences of length `seq`.
pub fn embeddings(
    ids: &[u32],
    type_ids: &[u32],
    word: &[f32],
    position: &[f32],
    token_type: &[f32],
    seq: usize,
    hidden: usize,
) -> Vec<f32> {
    let mut out = vec![0.0; ids.len() * hidden];
    for row in 0..ids.len() {
        let (w, p, ty) = (ids[row] as usize, row % seq, type_ids[row] as usize);
        for k in 0..hidden {
            out[row * hidden + k] =
                word[w * hidden + k] + position[p * hidden + k] + token_type[ty * hidden + k];
        }
    }
    out
}
