//! Plain-Rust references of every GPU kernel, written for clarity, not speed.
//!
//! The GPU tests compare each kernel against these on random inputs. Sums are
//! accumulated in `f64` so the reference is the more accurate side.

use super::matmul::Gemm;

/// `C = alpha·op(A)·op(B) (+ bias) (+ C)` exactly as [`super::matmul::gemm`] defines it.
pub fn gemm(g: &Gemm, a: &[f32], b: &[f32], bias: Option<&[f32]>, c: &mut [f32]) {
    for outer in 0..g.batch[0] {
        for inner in 0..g.batch[1] {
            let base = |w: usize| g.offsets[w] + outer * g.batch_strides[w][0] + inner * g.batch_strides[w][1];
            let (ab, bb, cb) = (base(0), base(1), base(2));
            for i in 0..g.m {
                for j in 0..g.n {
                    let mut s = 0.0f64;
                    for l in 0..g.k {
                        let av = if g.trans_a { a[ab + l * g.ld[0] + i] } else { a[ab + i * g.ld[0] + l] };
                        let bv = if g.trans_b { b[bb + j * g.ld[1] + l] } else { b[bb + l * g.ld[1] + j] };
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
        let g: Vec<f64> = (0..h).map(|j| dy[r * h + j] as f64 * gamma[j] as f64).collect();
        let mg = g.iter().sum::<f64>() / h as f64;
        let mgx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / h as f64;
        for j in 0..h {
            dx[r * h + j] = (rstd * (g[j] - mg - xhat[j] * mgx)) as f32;
        }
    }
    dx
}
