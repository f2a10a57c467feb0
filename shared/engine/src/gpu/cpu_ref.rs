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
