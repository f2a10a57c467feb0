//! Matrix multiply launcher (`matmul.wgsl`): `C = alpha·op(A)·op(B) (+ bias) (+ C)`.
//!
//! [`Gemm`] describes one (optionally batched, strided) product; [`gemm`] records
//! it. The linear-layer helpers [`linear_forward`], [`linear_backward_input`] and
//! [`linear_backward_weight`] cover a PyTorch-style `W` stored `out×in`.
//!
//! Test: `cargo test -p fedsb-engine --test gpu_kernels matmul`.

use super::context::{GpuBuffer, GpuContext};
use super::GpuError;

const SOURCE: &str = include_str!("matmul.wgsl");
/// Output tile edge of one workgroup (rows and columns).
pub const TILE: usize = 64;

/// One matrix product `C[M,N] = alpha · op(A)[M,K] · op(B)[K,N] (+ bias[N]) (+ C)`.
///
/// All sizes are in elements. By default matrices are dense (`lda` = stored row
/// length), unbatched and start at offset 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// Inner dimension.
    pub k: usize,
    /// A is stored K×M and used transposed.
    pub trans_a: bool,
    /// B is stored N×K and used transposed.
    pub trans_b: bool,
    /// Scale of the product (not of the bias).
    pub alpha: f32,
    /// Add the result to the existing C instead of overwriting it.
    pub accumulate: bool,
    /// Row strides of the stored A, B, C.
    pub ld: [usize; 3],
    /// Start offsets of A, B, C.
    pub offsets: [usize; 3],
    /// Number of (outer, inner) batches; workgroup z runs over outer × inner.
    pub batch: [usize; 2],
    /// Per-batch strides `[outer, inner]` of A, B, C.
    pub batch_strides: [[usize; 2]; 3],
}

impl Gemm {
    /// A dense, unbatched `M×K · K×N` product.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
            ld: [k, n, n],
            offsets: [0; 3],
            batch: [1, 1],
            batch_strides: [[0; 2]; 3],
        }
    }

    /// Use A transposed (A stored K×M; sets the dense `lda = M`).
    pub fn trans_a(mut self) -> Self {
        self.trans_a = true;
        self.ld[0] = self.m;
        self
    }

    /// Use B transposed (B stored N×K; sets the dense `ldb = K`).
    pub fn trans_b(mut self) -> Self {
        self.trans_b = true;
        self.ld[1] = self.k;
        self
    }

    /// Scale the product by `alpha`.
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Add into C.
    pub fn accumulate(mut self) -> Self {
        self.accumulate = true;
        self
    }

    /// Explicit row strides of the stored A, B, C.
    pub fn ld(mut self, lda: usize, ldb: usize, ldc: usize) -> Self {
        self.ld = [lda, ldb, ldc];
        self
    }

    /// Start offsets of A, B, C.
    pub fn offsets(mut self, a: usize, b: usize, c: usize) -> Self {
        self.offsets = [a, b, c];
        self
    }

    /// `outer × inner` products; matrix `(o, i)` of X starts at
    /// `offset_X + o * strides_X[0] + i * strides_X[1]`.
    pub fn batched(
        mut self,
        outer: usize,
        inner: usize,
        a: [usize; 2],
        b: [usize; 2],
        c: [usize; 2],
    ) -> Self {
        self.batch = [outer, inner];
        self.batch_strides = [a, b, c];
        self
    }

    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k * self.batch[0] * self.batch[1]) as f64
    }

    /// Floating-point operations of the product (2·M·N·K per batch).
    pub fn flop_count(&self) -> f64 {
        self.flops()
    }

    // Largest element index touched in a stored rows×cols matrix, or None if empty.
    fn last_index(&self, which: usize, rows: usize, cols: usize) -> Option<usize> {
        if rows == 0 || cols == 0 || self.batch[0] == 0 || self.batch[1] == 0 {
            return None;
        }
        let [s0, s1] = self.batch_strides[which];
        Some(
            self.offsets[which]
                + (self.batch[0] - 1) * s0
                + (self.batch[1] - 1) * s1
                + (rows - 1) * self.ld[which]
                + cols
                - 1,
        )
    }

    fn check(
        &self,
        a: &GpuBuffer,
        b: &GpuBuffer,
        bias: Option<&GpuBuffer>,
        c: &GpuBuffer,
    ) -> Result<(), GpuError> {
        let (ar, ac) = if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let (br, bc) = if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        if self.ld[0] < ac || self.ld[1] < bc || self.ld[2] < self.n {
            return Err(GpuError::Shape(format!(
                "gemm {self:?}: row stride below row length"
            )));
        }
        for (name, which, rows, cols, buf) in [
            ("A", 0, ar, ac, a),
            ("B", 1, br, bc, b),
            ("C", 2, self.m, self.n, c),
        ] {
            if let Some(last) = self.last_index(which, rows, cols) {
                if last >= buf.len || last > u32::MAX as usize {
                    return Err(GpuError::Shape(format!(
                        "gemm {self:?}: {name} needs index {last} but holds {} elements",
                        buf.len
                    )));
                }
            }
        }
        if let Some(bias) = bias {
            if bias.len < self.n {
                return Err(GpuError::Shape(format!(
                    "gemm: bias has {} < N = {} elements",
                    bias.len, self.n
                )));
            }
        }
        if self.batch[0] * self.batch[1] > 65_535 {
            return Err(GpuError::Shape(format!(
                "gemm: {} batches exceed 65535",
                self.batch[0] * self.batch[1]
            )));
        }
        Ok(())
    }
}

/// Records `C = alpha·op(A)·op(B) (+ bias) (+ C)` as described by `g`.
pub fn gemm(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    g: &Gemm,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bias: Option<&GpuBuffer>,
    c: &GpuBuffer,
) -> Result<(), GpuError> {
    g.check(a, b, bias, c)?;
    if g.m == 0 || g.n == 0 || g.batch[0] * g.batch[1] == 0 {
        return Ok(());
    }
    let id = format!("matmul/ta{}/tb{}", g.trans_a as u8, g.trans_b as u8);
    let kernel = ctx.pipeline(
        &id,
        SOURCE,
        "main",
        &[
            ("TRANS_A", g.trans_a as u8 as f64),
            ("TRANS_B", g.trans_b as u8 as f64),
        ],
    );
    let u = |x: usize| x as u32;
    let [[a0, a1], [b0, b1], [c0, c1]] = g.batch_strides;
    let params = ctx.uniform(&[
        u(g.m),
        u(g.n),
        u(g.k),
        u(g.ld[0]),
        u(g.ld[1]),
        u(g.ld[2]),
        u(g.offsets[0]),
        u(g.offsets[1]),
        u(g.offsets[2]),
        u(g.batch[1]),
        u(a0),
        u(a1),
        u(b0),
        u(b1),
        u(c0),
        u(c1),
        g.alpha.to_bits(),
        g.accumulate as u32,
        bias.is_some() as u32,
        0,
    ]);
    let bias = bias.unwrap_or(&ctx.dummy);
    ctx.dispatch(
        encoder,
        &kernel,
        &[
            params.as_entire_binding(),
            a.binding(),
            b.binding(),
            bias.binding(),
            c.binding(),
        ],
        [
            g.n.div_ceil(TILE) as u32,
            g.m.div_ceil(TILE) as u32,
            (g.batch[0] * g.batch[1]) as u32,
        ],
    );
    Ok(())
}

/// Linear layer forward `Y[rows,out] = X[rows,in] · Wᵀ + b`, W stored `out×in`.
#[allow(clippy::too_many_arguments)]
pub fn linear_forward(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    x: &GpuBuffer,
    w: &GpuBuffer,
    bias: Option<&GpuBuffer>,
    y: &GpuBuffer,
    rows: usize,
    in_features: usize,
    out_features: usize,
) -> Result<(), GpuError> {
    let g = Gemm::new(rows, out_features, in_features).trans_b();
    gemm(ctx, encoder, &g, x, w, bias, y)
}

/// Input gradient `dX[rows,in] (+)= dY[rows,out] · W`, W stored `out×in`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_input(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    dy: &GpuBuffer,
    w: &GpuBuffer,
    dx: &GpuBuffer,
    rows: usize,
    in_features: usize,
    out_features: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let mut g = Gemm::new(rows, in_features, out_features);
    g.accumulate = accumulate;
    gemm(ctx, encoder, &g, dy, w, None, dx)
}

/// Weight gradient `dW[out,in] (+)= dY[rows,out]ᵀ · X[rows,in]`.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward_weight(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    dy: &GpuBuffer,
    x: &GpuBuffer,
    dw: &GpuBuffer,
    rows: usize,
    in_features: usize,
    out_features: usize,
    accumulate: bool,
) -> Result<(), GpuError> {
    let mut g = Gemm::new(out_features, in_features, rows).trans_a();
    g.accumulate = accumulate;
    gemm(ctx, encoder, &g, dy, x, None, dw)
}
