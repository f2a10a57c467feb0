//! A row-major dense matrix and the three matrix products the encoder needs
//! (`A·Bᵀ`, `A·B`, `Aᵀ·B`), written plainly so that they are easy to trust.

use super::Float;

/// A dense `rows × cols` matrix stored row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix<F> {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<F>,
}

impl<F: Float> Matrix<F> {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![F::ZERO; rows * cols],
        }
    }

    /// Wraps row-major `data`; panics if its length is not `rows * cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<F>) -> Self {
        assert_eq!(data.len(), rows * cols, "Matrix::from_vec: {rows}x{cols}");
        Self { rows, cols, data }
    }

    pub fn from_fn(rows: usize, cols: usize, mut f: impl FnMut(usize, usize) -> F) -> Self {
        let mut data = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            for j in 0..cols {
                data.push(f(i, j));
            }
        }
        Self { rows, cols, data }
    }

    /// A square matrix with `diag` on its diagonal.
    pub fn diag(diag: &[F]) -> Self {
        Self::from_fn(diag.len(), diag.len(), |i, j| {
            if i == j {
                diag[i]
            } else {
                F::ZERO
            }
        })
    }

    pub fn get(&self, i: usize, j: usize) -> F {
        self.data[i * self.cols + j]
    }

    pub fn row(&self, i: usize) -> &[F] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    pub fn row_mut(&mut self, i: usize) -> &mut [F] {
        &mut self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// Rows `range` as a new matrix.
    pub fn rows_slice(&self, range: std::ops::Range<usize>) -> Self {
        Self::from_vec(
            range.len(),
            self.cols,
            self.data[range.start * self.cols..range.end * self.cols].to_vec(),
        )
    }

    pub fn transpose(&self) -> Self {
        Self::from_fn(self.cols, self.rows, |i, j| self.get(j, i))
    }

    pub fn map<G: Float>(&self, f: impl Fn(F) -> G) -> Matrix<G> {
        Matrix {
            rows: self.rows,
            cols: self.cols,
            data: self.data.iter().map(|&x| f(x)).collect(),
        }
    }

    /// `self · otherᵀ`.
    pub fn matmul_t(&self, other: &Self) -> Self {
        let mut out = Self::zeros(self.rows, other.rows);
        matmul_nt_acc(
            &self.data,
            &other.data,
            self.rows,
            self.cols,
            other.rows,
            &mut out.data,
        );
        out
    }

    /// `self · other`.
    pub fn matmul(&self, other: &Self) -> Self {
        let mut out = Self::zeros(self.rows, other.cols);
        matmul_nn_acc(
            &self.data,
            &other.data,
            self.rows,
            self.cols,
            other.cols,
            &mut out.data,
        );
        out
    }

    /// `selfᵀ · other`.
    pub fn t_matmul(&self, other: &Self) -> Self {
        let mut out = Self::zeros(self.cols, other.cols);
        matmul_tn_acc(
            &self.data,
            &other.data,
            self.rows,
            self.cols,
            other.cols,
            &mut out.data,
        );
        out
    }

    /// `self += scale · other`.
    pub fn add_scaled(&mut self, other: &Self, scale: F) {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        for (a, &b) in self.data.iter_mut().zip(&other.data) {
            *a += scale * b;
        }
    }

    /// Largest `|self - other|` over all entries.
    pub fn max_abs_diff(&self, other: &Self) -> F {
        assert_eq!((self.rows, self.cols), (other.rows, other.cols));
        self.data
            .iter()
            .zip(&other.data)
            .fold(F::ZERO, |m, (&a, &b)| m.max((a - b).abs()))
    }
}

/// Dot product with four partial sums (vectorizes, and loses less precision
/// than one running sum).
pub fn dot<F: Float>(a: &[F], b: &[F]) -> F {
    debug_assert_eq!(a.len(), b.len());
    let mut acc = [F::ZERO; 4];
    let chunks = a.len() / 4 * 4;
    for (ca, cb) in a[..chunks].chunks_exact(4).zip(b[..chunks].chunks_exact(4)) {
        for l in 0..4 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut tail = F::ZERO;
    for (&x, &y) in a[chunks..].iter().zip(&b[chunks..]) {
        tail += x * y;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// `y += alpha · x`.
pub fn axpy<F: Float>(alpha: F, x: &[F], y: &mut [F]) {
    debug_assert_eq!(x.len(), y.len());
    for (yi, &xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

/// `out (m×n) += a (m×k) · b (n×k)ᵀ`: the product of a linear layer, `X·Wᵀ`.
pub fn matmul_nt_acc<F: Float>(a: &[F], b: &[F], m: usize, k: usize, n: usize, out: &mut [F]) {
    assert_eq!((a.len(), b.len(), out.len()), (m * k, n * k, m * n));
    for i in 0..m {
        let ai = &a[i * k..(i + 1) * k];
        let oi = &mut out[i * n..(i + 1) * n];
        for (j, o) in oi.iter_mut().enumerate() {
            *o += dot(ai, &b[j * k..(j + 1) * k]);
        }
    }
}

/// `out (m×n) += a (m×k) · b (k×n)`.
pub fn matmul_nn_acc<F: Float>(a: &[F], b: &[F], m: usize, k: usize, n: usize, out: &mut [F]) {
    assert_eq!((a.len(), b.len(), out.len()), (m * k, k * n, m * n));
    for i in 0..m {
        let oi = &mut out[i * n..(i + 1) * n];
        for p in 0..k {
            let aip = a[i * k + p];
            if aip != F::ZERO {
                axpy(aip, &b[p * n..(p + 1) * n], oi);
            }
        }
    }
}

/// `out (m×n) += a (k×m)ᵀ · b (k×n)`: weight gradients, `dYᵀ·X`.
pub fn matmul_tn_acc<F: Float>(a: &[F], b: &[F], k: usize, m: usize, n: usize, out: &mut [F]) {
    assert_eq!((a.len(), b.len(), out.len()), (k * m, k * n, m * n));
    for p in 0..k {
        let bp = &b[p * n..(p + 1) * n];
        for i in 0..m {
            let api = a[p * m + i];
            if api != F::ZERO {
                axpy(api, bp, &mut out[i * n..(i + 1) * n]);
            }
        }
    }
}
