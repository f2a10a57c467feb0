//! Matrix multiply launcher (`matmul.wgsl`, `matmul_subgroup.wgsl`,
//! `matmul_texture.wgsl` and the last two's 16-lane forms
//! `matmul_subgroup16.wgsl` and `matmul_texture16.wgsl`, each after
//! `gelu_common.wgsl` and `matmul_common.wgsl`):
//! `C = epilogue(alpha·op(A)·op(B) (+ bias) (+ C))`.
//!
//! [`Gemm`] describes one (optionally batched, strided) product; [`gemm`] records
//! it with the [`Variant`] that suits the adapter ([`Variant::for_gemm`]);
//! [`gemm_epilogue`] also applies an [`Epilogue`] (GELU, or the backward
//! pass through it) to every output as it is stored. The
//! linear-layer helpers [`linear_forward`], [`linear_backward_input`] and
//! [`linear_backward_weight`] cover a PyTorch-style `W` stored `out×in`.
//!
//! Tests: `cargo test -p fedsb-engine matmul` (all variants on vec4-aligned
//! shapes in the unit tests below, `Subgroup` where the device allows it; any
//! shape in `tests/gpu_kernels.rs`).
//! Benchmark of the variants: `cargo run --release -p fedsb-engine --example bench_matmul`.

use super::context::{GpuBuffer, GpuContext};
use super::GpuError;

// Every matmul module starts with `gelu_common.wgsl` (the epilogue's GELU)
// and `matmul_common.wgsl`: the parameters, the overrides, the bindings, the
// epilogue and the store that all variants share.
const SOURCE: &str = concat!(
    include_str!("gelu_common.wgsl"),
    include_str!("matmul_common.wgsl"),
    include_str!("matmul.wgsl")
);
/// The subgroup kernel natively (naga 30 refuses the `enable subgroups;`
/// directive and gates subgroup built-ins on the device feature instead).
const SUBGROUP_SOURCE: &str = concat!(
    include_str!("gelu_common.wgsl"),
    include_str!("matmul_common.wgsl"),
    include_str!("matmul_subgroup.wgsl")
);
/// The texture kernel (natively only: [`Variant::Texture`] needs subgroups,
/// which wgpu 30 does not pass through in the browser).
const TEXTURE_SOURCE: &str = concat!(
    include_str!("gelu_common.wgsl"),
    include_str!("matmul_common.wgsl"),
    include_str!("matmul_texture.wgsl")
);
/// The subgroup kernel for the browser's WebGPU, which requires the directive
/// before any declaration.
const SUBGROUP_SOURCE_WEB: &str = concat!(
    "enable subgroups;\n",
    include_str!("gelu_common.wgsl"),
    include_str!("matmul_common.wgsl"),
    include_str!("matmul_subgroup.wgsl")
);
/// [`SUBGROUP_SOURCE`] for subgroups of 16 lanes (llvmpipe with 512-bit
/// vectors: `LP_NATIVE_VECTOR_WIDTH=512`).
const SUBGROUP16_SOURCE: &str = concat!(
    include_str!("gelu_common.wgsl"),
    include_str!("matmul_common.wgsl"),
    include_str!("matmul_subgroup16.wgsl")
);
/// [`SUBGROUP_SOURCE_WEB`] for subgroups of 16 lanes.
const SUBGROUP16_SOURCE_WEB: &str = concat!(
    "enable subgroups;\n",
    include_str!("gelu_common.wgsl"),
    include_str!("matmul_common.wgsl"),
    include_str!("matmul_subgroup16.wgsl")
);
/// [`TEXTURE_SOURCE`] for subgroups of 16 lanes.
const TEXTURE16_SOURCE: &str = concat!(
    include_str!("gelu_common.wgsl"),
    include_str!("matmul_common.wgsl"),
    include_str!("matmul_texture16.wgsl")
);
/// Output tile edge of one workgroup of the tiled variant (rows and columns).
pub const TILE: usize = 64;
/// Output tile of one workgroup of the direct variant: rows, columns.
pub const DIRECT_TILE: [usize; 2] = [12, 96];
/// Output tile of one workgroup (one subgroup) of the subgroup and texture
/// variants, rows and columns, on subgroups of `lanes` lanes: 32 rows, 4
/// columns per lane.
pub const fn subgroup_tile(lanes: u32) -> [usize; 2] {
    [32, 4 * lanes as usize]
}
/// Largest texture edge (texels) [`Variant::Texture`] relies on: WebGPU's
/// default `max_texture_dimension_2d`, which [`GpuContext::new`] requests.
pub const TEXTURE_MAX_DIM: usize = 8192;
/// The subgroup sizes the subgroup and texture variants are written for (one
/// module each): a workgroup of that many invocations must be exactly one
/// subgroup. llvmpipe's subgroup is its SIMD vector: 8 lanes at 256 bits, 16
/// at 512.
pub const SUBGROUP_SIZES: [u32; 2] = [8, 16];

/// The lane count the subgroup and texture variants run at on this device:
/// a size of [`SUBGROUP_SIZES`] where the device has subgroups
/// ([`GpuContext::has_subgroups`]) of that one fixed size (min = max,
/// [`GpuContext::subgroup_sizes`]); `None` elsewhere.
pub fn subgroup_lanes(ctx: &GpuContext) -> Option<u32> {
    let [min, max] = ctx.subgroup_sizes();
    (ctx.has_subgroups() && min == max && SUBGROUP_SIZES.contains(&min)).then_some(min)
}

/// Which kernel (of `matmul.wgsl` or `matmul_subgroup.wgsl`) computes a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// `main`: 64×64 workgroup tiles staged in workgroup memory, 8×8 register
    /// blocks; any shape. The kernel for real GPUs.
    Tiled,
    /// `main_direct`: no workgroup memory and no barriers, 12×12 register blocks
    /// read straight from storage as vec4. Needs [`Gemm::vec4_aligned`]; about 2×
    /// faster than `Tiled` on lavapipe (llvmpipe), where workgroup-memory loads
    /// and barriers are expensive (see the analysis in `gpu/mod.rs`).
    Direct,
    /// `matmul_subgroup.wgsl`: like `Direct`, but a workgroup is one subgroup of
    /// 8 lanes computing a 32×32 tile, each lane loading an eighth of the A
    /// block and sharing it with `subgroupBroadcast` (`matmul_subgroup16.wgsl`:
    /// 16 lanes, 32×64). Needs [`Gemm::vec4_aligned`] and a device with
    /// `wgpu::Features::SUBGROUP` whose subgroup size is fixed at one of
    /// [`SUBGROUP_SIZES`] ([`Variant::available`]); about 2× `Direct` on
    /// lavapipe.
    Subgroup,
    /// `matmul_texture.wgsl`: the `Subgroup` kernel's tile and broadcasts with
    /// A and B read from rgba32float read-only storage textures
    /// (`textureLoad`), into which the launcher copies them before the
    /// dispatch; 1.35–1.6× `Subgroup` on lavapipe (`bench_matmul` medians,
    /// copies included), whose image loads are branch-free gathers while its
    /// storage loads loop over the lanes. Available where `Subgroup` is; only
    /// for unbatched products such as the linear layers' and the weight
    /// gradient's ([`Variant::supports`]: N a multiple of 4, `lda` and `ldb`
    /// multiples of 64, operands within [`TEXTURE_MAX_DIM`] texels).
    Texture,
}

impl Variant {
    /// On CPU adapters (lavapipe, SwiftShader, WARP) the first of `Texture`,
    /// `Subgroup` and `Direct` that is [available](Self::available) and
    /// [supports](Self::supports) the product; `Tiled` in every other case.
    ///
    /// The environment variable `FEDSB_MATMUL_VARIANT=tiled`, `=direct`,
    /// `=subgroup` or `=texture` overrides the adapter's preference (natively;
    /// for A/B measurements such as `bench_encoder`); a variant that cannot run
    /// falls back to the next one (`Texture` → `Subgroup` → `Direct` → `Tiled`).
    pub fn for_gemm(ctx: &GpuContext, g: &Gemm) -> Self {
        let preferred =
            Self::forced().unwrap_or(if ctx.adapter_info().device_type == wgpu::DeviceType::Cpu {
                Self::Texture
            } else {
                Self::Tiled
            });
        let order: &[Self] = match preferred {
            Self::Texture => &[Self::Texture, Self::Subgroup, Self::Direct],
            Self::Subgroup => &[Self::Subgroup, Self::Direct],
            Self::Direct => &[Self::Direct],
            Self::Tiled => &[],
        };
        order
            .iter()
            .copied()
            .find(|v| v.available(ctx) && v.supports(g))
            .unwrap_or(Self::Tiled)
    }

    /// Whether the device can run this variant at all: `Subgroup` and
    /// `Texture` need a lane count of [`SUBGROUP_SIZES`] ([`subgroup_lanes`]),
    /// since their broadcasts assume one whole subgroup per workgroup.
    pub fn available(self, ctx: &GpuContext) -> bool {
        match self {
            Self::Tiled | Self::Direct => true,
            Self::Subgroup | Self::Texture => subgroup_lanes(ctx).is_some(),
        }
    }

    /// The variant `FEDSB_MATMUL_VARIANT` asks for, read once.
    fn forced() -> Option<Self> {
        static FORCED: std::sync::OnceLock<Option<Variant>> = std::sync::OnceLock::new();
        *FORCED.get_or_init(|| {
            match std::env::var("FEDSB_MATMUL_VARIANT")
                .ok()?
                .to_lowercase()
                .as_str()
            {
                "tiled" => Some(Self::Tiled),
                "direct" => Some(Self::Direct),
                "subgroup" => Some(Self::Subgroup),
                "texture" => Some(Self::Texture),
                other => {
                    tracing::warn!(
                        "FEDSB_MATMUL_VARIANT={other:?} is none of tiled, direct, subgroup, texture"
                    );
                    None
                }
            }
        })
    }

    /// Whether this variant can compute `g`.
    pub fn supports(self, g: &Gemm) -> bool {
        match self {
            Self::Tiled => true,
            Self::Direct => {
                g.vec4_aligned()
                    && g.m.div_ceil(DIRECT_TILE[0]) <= 65_535
                    && g.n.div_ceil(DIRECT_TILE[1]) <= 65_535
            }
            Self::Subgroup => {
                // (The tile of 8 lanes, the smaller one, bounds the grid.)
                let [rows, cols] = subgroup_tile(SUBGROUP_SIZES[0]);
                g.vec4_aligned() && g.m.div_ceil(rows) <= 65_535 && g.n.div_ceil(cols) <= 65_535
            }
            Self::Texture => {
                let (a_rows, a_cols) = g.stored_a();
                let (b_rows, b_cols) = g.stored_b();
                // copy_buffer_to_texture: rows of whole 256-byte multiples.
                let row_align = wgpu::COPY_BYTES_PER_ROW_ALIGNMENT as usize / 4;
                // (vec4_aligned: with A transposed, M is a multiple of 4, as
                // the kernel's texels of 4 rows need.)
                g.vec4_aligned()
                    && g.batch == [1, 1]
                    && g.k > 0
                    && g.ld[0].is_multiple_of(row_align)
                    && g.ld[1].is_multiple_of(row_align)
                    && a_rows <= TEXTURE_MAX_DIM
                    && a_cols / 4 <= TEXTURE_MAX_DIM
                    && b_rows <= TEXTURE_MAX_DIM
                    && b_cols / 4 <= TEXTURE_MAX_DIM
                    // Each lane stores 4 whole columns.
                    && g.n.is_multiple_of(4)
            }
        }
    }

    /// What [`Self::supports`] asks of a product, for error messages.
    fn requirement(self) -> &'static str {
        match self {
            Self::Tiled => "nothing",
            Self::Direct | Self::Subgroup => "vec4-aligned A and B",
            Self::Texture => {
                "vec4-aligned A and B, one unbatched product, N a multiple of 4, lda and ldb \
                 multiples of 64 and A and B within 8192 × 8192 texels of 4 floats"
            }
        }
    }
}

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

    /// Rows and columns of A as stored: M×K, or K×M when transposed.
    fn stored_a(&self) -> (usize, usize) {
        if self.trans_a {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        }
    }

    /// Rows and columns of B as stored: K×N, or N×K when transposed.
    fn stored_b(&self) -> (usize, usize) {
        if self.trans_b {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        }
    }

    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k * self.batch[0] * self.batch[1]) as f64
    }

    /// Whether A and B can be read as vec4 along their stored rows: K, the stored
    /// row lengths (K or M for A, N or K for B), the row strides, the offsets and
    /// the batch strides of A and B are all multiples of 4. C needs nothing.
    pub fn vec4_aligned(&self) -> bool {
        let (_, a_cols) = self.stored_a();
        let (_, b_cols) = self.stored_b();
        [
            self.k,
            a_cols,
            b_cols,
            self.ld[0],
            self.ld[1],
            self.offsets[0],
            self.offsets[1],
            self.batch_strides[0][0],
            self.batch_strides[0][1],
            self.batch_strides[1][0],
            self.batch_strides[1][1],
        ]
        .iter()
        .all(|x| x % 4 == 0)
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
        let (ar, ac) = self.stored_a();
        let (br, bc) = self.stored_b();
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

/// Records `C = alpha·op(A)·op(B) (+ bias) (+ C)` as described by `g`, with the
/// kernel variant [`Variant::for_gemm`] picks for the adapter.
pub fn gemm(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    g: &Gemm,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bias: Option<&GpuBuffer>,
    c: &GpuBuffer,
) -> Result<(), GpuError> {
    gemm_epilogue(ctx, encoder, g, a, b, bias, c, Epilogue::None)
}

/// What a product does to each output after the bias and C are added, as it
/// stores it (`EPILOGUE` in `matmul_common.wgsl`): a linear layer followed by
/// GELU then needs no pass of its own over its output, forward or backward.
/// `slope` is laid out as C (the same row stride and offset).
#[derive(Debug, Clone, Copy, Default)]
pub enum Epilogue<'a> {
    /// C = x.
    #[default]
    None,
    /// C = gelu(x), and `slope` = gelu'(x): the forward pass of a linear layer
    /// and its GELU, keeping what the backward pass needs.
    Gelu { slope: &'a GpuBuffer },
    /// C = x · `slope`: the input gradient of such a layer's output linear,
    /// carried back through the GELU.
    GeluGate { slope: &'a GpuBuffer },
}

impl Epilogue<'_> {
    /// The `EPILOGUE` override.
    fn code(&self) -> u8 {
        match self {
            Self::None => 0,
            Self::Gelu { .. } => 1,
            Self::GeluGate { .. } => 2,
        }
    }

    fn slope(&self) -> Option<&GpuBuffer> {
        match self {
            Self::None => None,
            Self::Gelu { slope } | Self::GeluGate { slope } => Some(slope),
        }
    }
}

/// Like [`gemm`], each output passed through `epilogue` as it is stored.
#[allow(clippy::too_many_arguments)]
pub fn gemm_epilogue(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    g: &Gemm,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bias: Option<&GpuBuffer>,
    c: &GpuBuffer,
    epilogue: Epilogue<'_>,
) -> Result<(), GpuError> {
    let variant = Variant::for_gemm(ctx, g);
    gemm_variant_epilogue(ctx, encoder, g, variant, a, b, bias, c, epilogue)
}

/// Like [`gemm`] with an explicit kernel variant (benchmarks and tests); fails
/// with [`GpuError::Shape`] if the variant does not [support](Variant::supports) `g`
/// and with [`GpuError::Device`] if the device cannot run it ([`Variant::available`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_variant(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    g: &Gemm,
    variant: Variant,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bias: Option<&GpuBuffer>,
    c: &GpuBuffer,
) -> Result<(), GpuError> {
    gemm_variant_epilogue(ctx, encoder, g, variant, a, b, bias, c, Epilogue::None)
}

/// [`gemm_variant`] with an [`Epilogue`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_variant_epilogue(
    ctx: &GpuContext,
    encoder: &mut wgpu::CommandEncoder,
    g: &Gemm,
    variant: Variant,
    a: &GpuBuffer,
    b: &GpuBuffer,
    bias: Option<&GpuBuffer>,
    c: &GpuBuffer,
    epilogue: Epilogue<'_>,
) -> Result<(), GpuError> {
    g.check(a, b, bias, c)?;
    if let Some(slope) = epilogue.slope() {
        // The slopes share C's layout, so they need what C needs.
        g.check(a, b, bias, slope)
            .map_err(|e| GpuError::Shape(format!("the epilogue's slope buffer: {e}")))?;
    }
    if !variant.available(ctx) {
        return Err(GpuError::Device(format!(
            "the {variant:?} matmul kernel needs wgpu::Features::SUBGROUP with a fixed subgroup \
             size of {SUBGROUP_SIZES:?}; this device: {}, sizes {:?}",
            if ctx.has_subgroups() {
                "subgroups"
            } else {
                "no subgroups"
            },
            ctx.subgroup_sizes()
        )));
    }
    if !variant.supports(g) {
        return Err(GpuError::Shape(format!(
            "gemm {g:?}: the {variant:?} kernel needs {}",
            variant.requirement()
        )));
    }
    if g.m == 0 || g.n == 0 || g.batch[0] * g.batch[1] == 0 {
        return Ok(());
    }
    // The subgroup kernels' lane count (available: one of SUBGROUP_SIZES).
    let lanes = subgroup_lanes(ctx).unwrap_or(SUBGROUP_SIZES[0]);
    let web = ctx.adapter_info().backend == wgpu::Backend::BrowserWebGpu;
    let (source, entry, name) = match (variant, lanes == 16) {
        (Variant::Tiled, _) => (SOURCE, "main", "matmul"),
        (Variant::Direct, _) => (SOURCE, "main_direct", "matmul-direct"),
        (Variant::Subgroup, false) if web => (SUBGROUP_SOURCE_WEB, "main", "matmul-subgroup"),
        (Variant::Subgroup, true) if web => (SUBGROUP16_SOURCE_WEB, "main", "matmul-subgroup16"),
        (Variant::Subgroup, false) => (SUBGROUP_SOURCE, "main", "matmul-subgroup"),
        (Variant::Subgroup, true) => (SUBGROUP16_SOURCE, "main", "matmul-subgroup16"),
        (Variant::Texture, false) => (TEXTURE_SOURCE, "main", "matmul-texture"),
        (Variant::Texture, true) => (TEXTURE16_SOURCE, "main", "matmul-texture16"),
    };
    let has_bias = bias.is_some();
    let id = format!(
        "{name}/ta{}/tb{}/bias{}/acc{}/ep{}",
        g.trans_a as u8,
        g.trans_b as u8,
        has_bias as u8,
        g.accumulate as u8,
        epilogue.code()
    );
    let kernel = ctx.pipeline(
        &id,
        source,
        entry,
        &[
            ("TRANS_A", g.trans_a as u8 as f64),
            ("TRANS_B", g.trans_b as u8 as f64),
            ("HAS_BIAS", has_bias as u8 as f64),
            ("ACCUMULATE", g.accumulate as u8 as f64),
            ("EPILOGUE", epilogue.code() as f64),
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
        0,
        0,
        0,
    ]);
    let bias = bias.unwrap_or(&ctx.dummy);
    // Its own dummy: `ctx.dummy` may be bound read-only as the bias.
    let aux = epilogue.slope().unwrap_or(&ctx.dummy_rw);
    let batches = (g.batch[0] * g.batch[1]) as u32;
    match variant {
        // A and B at bindings 1 and 2 (as array<f32> in Tiled, array<vec4<f32>>
        // in Subgroup).
        Variant::Tiled | Variant::Subgroup => ctx.dispatch_at(
            encoder,
            &kernel,
            &[
                (0, params.as_entire_binding()),
                (1, a.binding()),
                (2, b.binding()),
                (3, bias.binding()),
                (4, c.binding()),
                (7, aux.binding()),
            ],
            {
                let [rows, cols] = if variant == Variant::Tiled {
                    [TILE, TILE]
                } else {
                    subgroup_tile(lanes)
                };
                [
                    g.n.div_ceil(cols) as u32,
                    g.m.div_ceil(rows) as u32,
                    batches,
                ]
            },
        ),
        // A and B as textures at bindings 1 and 2, copied there first.
        Variant::Texture => {
            let (a_rows, a_cols) = g.stored_a();
            let (b_rows, b_cols) = g.stored_b();
            let u32_of = |x: usize| x as u32; // within TEXTURE_MAX_DIM (supports)
            let at = ctx.copy_to_texture(
                encoder,
                0,
                a,
                g.offsets[0],
                g.ld[0],
                u32_of(a_cols / 4),
                u32_of(a_rows),
            );
            let bt = ctx.copy_to_texture(
                encoder,
                1,
                b,
                g.offsets[1],
                g.ld[1],
                u32_of(b_cols / 4),
                u32_of(b_rows),
            );
            ctx.dispatch_at(
                encoder,
                &kernel,
                &[
                    (0, params.as_entire_binding()),
                    (1, wgpu::BindingResource::TextureView(&at)),
                    (2, wgpu::BindingResource::TextureView(&bt)),
                    (3, bias.binding()),
                    (4, c.binding()),
                    (7, aux.binding()),
                ],
                {
                    let [rows, cols] = subgroup_tile(lanes);
                    [g.n.div_ceil(cols) as u32, g.m.div_ceil(rows) as u32, 1]
                },
            )
        }
        // A and B as array<vec4<f32>> at bindings 5 and 6.
        Variant::Direct => ctx.dispatch_at(
            encoder,
            &kernel,
            &[
                (0, params.as_entire_binding()),
                (3, bias.binding()),
                (4, c.binding()),
                (5, a.binding()),
                (6, b.binding()),
                (7, aux.binding()),
            ],
            [
                g.n.div_ceil(DIRECT_TILE[1]) as u32,
                g.m.div_ceil(DIRECT_TILE[0]) as u32,
                batches,
            ],
        ),
    }
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

#[cfg(test)]
mod tests {
    //! All variants against [`cpu_ref::gemm`](super::super::cpu_ref::gemm) on
    //! vec4-aligned shapes that are not multiples of any variant's tile (the
    //! unaligned shapes, which only `Tiled` runs, are in `tests/gpu_kernels.rs`).
    //! `Subgroup` runs where the device allows it ([`Variant::available`]; on
    //! lavapipe it does, and `matmul_subgroup_matches_reference` checks that).
    //! Needs a wgpu adapter, like `tests/gpu_kernels.rs` (`FEDSB_ADAPTER` picks one).

    use std::sync::OnceLock;

    use super::*;
    use crate::gpu::{cpu_ref, GpuOptions};

    fn ctx() -> &'static GpuContext {
        static CTX: OnceLock<GpuContext> = OnceLock::new();
        CTX.get_or_init(|| {
            let name = std::env::var("FEDSB_ADAPTER").ok();
            let options = GpuOptions {
                adapter: name.as_deref(),
            };
            pollster::block_on(GpuContext::new(&options))
                .unwrap_or_else(|e| panic!("matmul tests need a wgpu adapter: {e}"))
        })
    }

    /// Values in [-1, 1) from a 64-bit LCG.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Runs `g` with `variant` and compares with the CPU reference.
    fn check(variant: Variant, g: &Gemm, bias: bool, lens: [usize; 3], seed: u64) {
        let ctx = ctx();
        let a = values(seed, lens[0]);
        let b = values(seed + 1, lens[1]);
        let c0 = values(seed + 2, lens[2]);
        let bv = values(seed + 3, g.n);
        let (ga, gb, gc, gbias) = (
            ctx.buffer_f32("a", &a),
            ctx.buffer_f32("b", &b),
            ctx.buffer_f32("c", &c0),
            ctx.buffer_f32("bias", &bv),
        );
        let mut enc = ctx.encoder();
        gemm_variant(
            ctx,
            &mut enc,
            g,
            variant,
            &ga,
            &gb,
            bias.then_some(&gbias),
            &gc,
        )
        .expect("launch");
        ctx.submit(enc);
        let got = pollster::block_on(ctx.read_f32(&gc)).expect("read-back");
        let mut want = c0;
        cpu_ref::gemm(g, &a, &b, bias.then_some(&bv[..]), &mut want);
        assert_matches(&format!("{variant:?} {g:?} bias={bias}"), &got, &want);
    }

    /// Element-wise `|got − want| ≤ 1e-4 + 1e-4·|want|`, naming the first
    /// index that is off.
    fn assert_matches(label: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{label}: lengths");
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 + 1e-4 * y.abs(),
                "{label}: index {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn matmul_variants_match_reference_on_aligned_shapes() {
        for variant in [Variant::Tiled, Variant::Direct] {
            check_aligned_shapes(variant);
        }
    }

    /// All four orientations with and without bias/alpha/accumulate.
    fn check_aligned_shapes(variant: Variant) {
        // (m, k, n): edges inside every tile (12×96 direct, 32×32 or 32×64
        // subgroup, 64×64 tiled), K tails of 4, single rows and columns where the orientation
        // allows them, several tiles in both directions.
        let shapes = [
            (40, 60, 52),
            (4, 4, 4),
            (100, 8, 200),
            (12, 300, 8),
            (68, 132, 100),
            (36, 20, 68),
        ];
        let mut seed = 1;
        {
            for (m, k, n) in shapes {
                for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                    let mut g = Gemm::new(m, n, k);
                    if ta {
                        g = g.trans_a();
                    }
                    if tb {
                        g = g.trans_b();
                    }
                    assert!(variant.supports(&g), "{g:?}");
                    let lens = [m * k, k * n, m * n];
                    check(variant, &g, false, lens, seed);
                    check(variant, &g.alpha(0.5).accumulate(), true, lens, seed + 10);
                    seed += 100;
                }
            }
            // Rows of op(A) and columns of op(B) need no alignment when they are
            // not the stored rows: M = 37 plain A, N = 53 with B transposed.
            let g = Gemm::new(37, 53, 60).trans_b();
            assert!(variant.supports(&g));
            check(variant, &g, true, [37 * 60, 53 * 60, 37 * 53], seed);
            let g = Gemm::new(1, 3, 8).trans_b().alpha(-2.0).accumulate();
            check(variant, &g, true, [8, 24, 3], seed + 1);
        }
    }

    #[test]
    fn matmul_variants_match_reference_batched_strided() {
        for variant in [Variant::Tiled, Variant::Direct] {
            check_batched_strided(variant);
        }
    }

    /// Batched, strided products with offsets and a padded C.
    fn check_batched_strided(variant: Variant) {
        // Attention-shaped, per (sequence, head) Q·Kᵀ on [B, T, H·D] storage with
        // D a multiple of 4, then with offsets and a padded C.
        let (bsz, t, h, d) = (3, 37, 5, 12);
        let hidden = h * d;
        let qk = Gemm::new(t, t, d)
            .trans_b()
            .ld(hidden, hidden, t)
            .alpha(0.25)
            .batched(bsz, h, [t * hidden, d], [t * hidden, d], [h * t * t, t * t]);
        let pv = Gemm::new(t - 1, d, t - 5)
            .ld(hidden, hidden, 13)
            .offsets(d, 4 * hidden, 2)
            .batched(
                bsz,
                h,
                [t * hidden, d],
                [t * hidden, d],
                [h * 13 * t, 13 * t],
            );
        assert!(variant.supports(&qk) && variant.supports(&pv));
        let lens = [bsz * t * hidden, bsz * t * hidden, bsz * h * t * t];
        check(variant, &qk, false, lens, 7);
        let lens = [bsz * t * hidden, bsz * t * hidden, bsz * h * 13 * t];
        check(variant, &pv, true, lens, 8);
        // Weight-gradient shaped, Aᵀ·B per batch with accumulate: rows of the
        // stored A (K = 40) span more than one 32-row tile of C (M = 36).
        let (k, m, n) = (40, 36, 44);
        let tn = Gemm::new(m, n, k)
            .trans_a()
            .alpha(0.5)
            .accumulate()
            .batched(
                2,
                2,
                [2 * k * m, k * m],
                [2 * k * n, k * n],
                [2 * m * n, m * n],
            );
        assert!(variant.supports(&tn));
        check(variant, &tn, true, [4 * k * m, 4 * k * n, 4 * m * n], 9);
    }

    #[test]
    fn matmul_subgroup_matches_reference() {
        let ctx = ctx();
        // The context must request subgroups wherever the adapter offers them, and
        // Subgroup runs exactly where that gives a fixed subgroup size of 8 or 16.
        let offered = ctx.adapter.features().contains(wgpu::Features::SUBGROUP);
        assert_eq!(ctx.has_subgroups(), offered);
        let info = ctx.adapter_info();
        let fixed = info.subgroup_min_size == info.subgroup_max_size
            && [8, 16].contains(&info.subgroup_min_size);
        assert_eq!(Variant::Subgroup.available(ctx), offered && fixed);
        eprintln!("{}: subgroups of {:?}", info.name, subgroup_lanes(ctx));
        // llvmpipe's subgroup is its vector: with its width set (as CI's second
        // run of these tests sets it to 512 bits) the 16-lane kernels must run.
        if let Ok(bits) = std::env::var("LP_NATIVE_VECTOR_WIDTH") {
            if info.name.starts_with("llvmpipe") {
                let lanes = bits.parse::<u32>().expect("LP_NATIVE_VECTOR_WIDTH in bits") / 32;
                assert_eq!(subgroup_lanes(ctx), Some(lanes), "{}", info.name);
            }
        }
        if !Variant::Subgroup.available(ctx) {
            eprintln!(
                "skipped: {} has subgroups={offered}, sizes {:?}",
                info.name,
                ctx.subgroup_sizes()
            );
            // Never picked, and refused when asked for explicitly.
            assert_ne!(
                Variant::for_gemm(ctx, &Gemm::new(40, 52, 60)),
                Variant::Subgroup
            );
            let buf = ctx.buffer_zeros("x", 64);
            let mut enc = ctx.encoder();
            let err = gemm_variant(
                ctx,
                &mut enc,
                &Gemm::new(4, 4, 4),
                Variant::Subgroup,
                &buf,
                &buf,
                None,
                &buf,
            );
            assert!(matches!(err, Err(GpuError::Device(_))), "{err:?}");
            return;
        }
        check_aligned_shapes(Variant::Subgroup);
        check_batched_strided(Variant::Subgroup);
        // Picked on CPU adapters for aligned products (unless overridden).
        if std::env::var_os("FEDSB_MATMUL_VARIANT").is_none()
            && info.device_type == wgpu::DeviceType::Cpu
        {
            assert_eq!(
                Variant::for_gemm(ctx, &Gemm::new(40, 52, 60)),
                Variant::Subgroup
            );
        }
    }

    /// The GELU epilogue (C = gelu(x), slope = gelu'(x)) and the gate
    /// (C = x · slope) on every variant the device runs, against the CPU
    /// reference: edges inside the tiles, all orientations a variant
    /// supports, bias, alpha, accumulate, and a strided C with an offset,
    /// whose padding (and the slope buffer's) must stay untouched.
    #[test]
    fn matmul_epilogue_matches_reference() {
        let ctx = ctx();
        let variants: Vec<Variant> = [
            Variant::Tiled,
            Variant::Direct,
            Variant::Subgroup,
            Variant::Texture,
        ]
        .into_iter()
        .filter(|v| v.available(ctx))
        .collect();
        // (m, n, k, trans_a, trans_b): the texture copy needs stored rows of
        // whole multiples of 64 floats, so K (or M with A transposed) is 64 or
        // 128.
        let shapes = [
            (70, 36, 64, false, false),
            (70, 36, 64, false, true),
            (64, 52, 128, true, false),
            (1, 4, 64, false, true),
        ];
        let mut ran = 0;
        for variant in &variants {
            for (m, n, k, ta, tb) in shapes {
                let mut base = Gemm::new(m, n, k);
                if ta {
                    base = base.trans_a();
                }
                if tb {
                    base = base.trans_b();
                }
                let strided = base.ld(base.ld[0], base.ld[1], n + 3).offsets(0, 0, 5);
                for (g, bias) in [(base, true), (strided.alpha(-0.5).accumulate(), false)] {
                    if !variant.supports(&g) {
                        continue;
                    }
                    for gate in [false, true] {
                        check_epilogue(*variant, &g, bias, gate, 40 + ran);
                        ran += 1;
                    }
                }
            }
        }
        assert!(ran >= 24, "only {ran} epilogue runs");
    }

    fn check_epilogue(variant: Variant, g: &Gemm, bias: bool, gate: bool, seed: u64) {
        let ctx = ctx();
        let a_len = g.m.max(g.k) * g.ld[0];
        let b_len = g.n.max(g.k) * g.ld[1];
        let c_len = g.offsets[2] + g.m * g.ld[2];
        let a = values(seed, a_len);
        // Products of about ±3, where GELU bends.
        let b: Vec<f32> = values(seed + 1, b_len).iter().map(|x| 0.6 * x).collect();
        let c0 = values(seed + 2, c_len);
        let s0 = values(seed + 3, c_len);
        let bv = values(seed + 4, g.n);
        let (ga, gb, gc, gs, gbias) = (
            ctx.buffer_f32("a", &a),
            ctx.buffer_f32("b", &b),
            ctx.buffer_f32("c", &c0),
            ctx.buffer_f32("slope", &s0),
            ctx.buffer_f32("bias", &bv),
        );
        let epilogue = if gate {
            Epilogue::GeluGate { slope: &gs }
        } else {
            Epilogue::Gelu { slope: &gs }
        };
        let mut enc = ctx.encoder();
        let bias_buf = bias.then_some(&gbias);
        gemm_variant_epilogue(ctx, &mut enc, g, variant, &ga, &gb, bias_buf, &gc, epilogue)
            .expect("launch");
        ctx.submit(enc);
        let got_c = pollster::block_on(ctx.read_f32(&gc)).expect("read-back");
        let got_s = pollster::block_on(ctx.read_f32(&gs)).expect("read-back");
        // The product before the epilogue, then the epilogue in C's region.
        let mut want_c = c0;
        cpu_ref::gemm(g, &a, &b, bias.then_some(&bv[..]), &mut want_c);
        let mut want_s = s0.clone();
        for r in 0..g.m {
            for col in 0..g.n {
                let i = g.offsets[2] + r * g.ld[2] + col;
                let x = want_c[i];
                if gate {
                    want_c[i] = x * s0[i];
                } else {
                    want_c[i] = cpu_ref::gelu(x);
                    want_s[i] = cpu_ref::gelu_grad(x);
                }
            }
        }
        let label = format!("{variant:?} {g:?} bias={bias} gate={gate}");
        assert_matches(&format!("{label}: C"), &got_c, &want_c);
        assert_matches(&format!("{label}: slope"), &got_s, &want_s);
    }

    #[test]
    fn matmul_texture_matches_reference() {
        let ctx = ctx();
        if !Variant::Texture.available(ctx) {
            eprintln!(
                "skipped: {} has no fixed subgroup size of 8 or 16 ({:?})",
                ctx.adapter_info().name,
                ctx.subgroup_sizes()
            );
            assert_ne!(
                Variant::for_gemm(ctx, &Gemm::new(40, 52, 64)),
                Variant::Texture
            );
            return;
        }
        // Shapes that are not multiples of the 32×32 tile (8 lanes) or the
        // 32×64 one (16 lanes), both orientations
        // of A and B, dense and strided (lda, ldb multiples of 64 above the
        // row length), with offsets, bias, alpha and accumulate. A stored
        // transposed (K×M) needs M a multiple of 4, and dense, of 64.
        let shapes = [
            (40, 52, 64, false),
            (1, 4, 64, false),
            (37, 128, 128, false),
            (70, 36, 192, false),
            (44, 52, 68, true),
            (4, 4, 4, true),
            (128, 36, 100, true),
            (100, 128, 192, true),
            (70, 100, 128, false),
            (36, 132, 64, true),
        ];
        for (m, n, k, trans_a) in shapes {
            for trans_b in [false, true] {
                let mut g = Gemm::new(m, n, k);
                if trans_a {
                    g = g.trans_a();
                }
                if trans_b {
                    g = g.trans_b();
                }
                let (a_rows, a_cols) = if trans_a { (k, m) } else { (m, k) };
                let (b_rows, b_cols) = if trans_b { (n, k) } else { (k, n) };
                // Dense, the stored A's and B's rows must be whole multiples
                // of 64 floats (256 bytes) for the texture copy.
                let dense = a_cols.is_multiple_of(64) && b_cols.is_multiple_of(64);
                assert_eq!(Variant::Texture.supports(&g), dense, "{g:?}");
                if dense {
                    check(
                        Variant::Texture,
                        &g,
                        true,
                        [a_rows * a_cols, b_rows * b_cols, m * n],
                        11,
                    );
                }
                let lda = a_cols.next_multiple_of(64) + 64;
                let ldb = b_cols.next_multiple_of(64) + 64;
                let strided = g
                    .ld(lda, ldb, n + 3)
                    .offsets(8, 4, 5)
                    .alpha(-0.5)
                    .accumulate();
                assert!(Variant::Texture.supports(&strided), "{strided:?}");
                check(
                    Variant::Texture,
                    &strided,
                    false,
                    [8 + a_rows * lda, 4 + b_rows * ldb, 5 + m * (n + 3)],
                    12,
                );
            }
        }
        // K a multiple of 4 but not of 64: only with a padded lda.
        let g = Gemm::new(37, 44, 60).ld(64, 64, 44);
        assert!(Variant::Texture.supports(&g));
        check(Variant::Texture, &g, true, [37 * 64, 60 * 64, 37 * 44], 13);
        assert!(!Variant::Texture.supports(&Gemm::new(37, 44, 60)));
        // N not a multiple of 4 (B stored N×K with K aligned): not supported.
        assert!(!Variant::Texture.supports(&Gemm::new(37, 42, 64).trans_b()));

        // The scratch textures are reused and grown within one encoder: a
        // product that grows A's texture, then one on the same widths with
        // fewer rows (the texture's lower rows hold the first product's A),
        // then one with more rows again; each must see its own operands.
        let shapes = [(300, 64, 64), (40, 64, 64), (520, 64, 64)];
        let mut enc = ctx.encoder();
        let mut runs = Vec::new();
        for (i, &(m, n, k)) in shapes.iter().enumerate() {
            let g = Gemm::new(m, n, k).trans_b();
            let (a, b) = (values(20 + i as u64, m * k), values(30 + i as u64, n * k));
            let (ga, gb, gc) = (
                ctx.buffer_f32("a", &a),
                ctx.buffer_f32("b", &b),
                ctx.buffer_zeros("c", m * n),
            );
            gemm_variant(ctx, &mut enc, &g, Variant::Texture, &ga, &gb, None, &gc).unwrap();
            runs.push((g, a, b, gc));
        }
        ctx.submit(enc);
        for (g, a, b, gc) in runs {
            let got = pollster::block_on(ctx.read_f32(&gc)).unwrap();
            let mut want = vec![0.0; g.m * g.n];
            cpu_ref::gemm(&g, &a, &b, None, &mut want);
            assert_matches(&format!("reused texture, {g:?}"), &got, &want);
        }

        // Picked for the linear layers' products on CPU adapters; the others
        // fall back to Subgroup, and an explicit request is refused.
        let linear = [
            Gemm::new(2048, 1536, 384).trans_b(), // forward X·Wᵀ
            Gemm::new(2048, 384, 1536),           // input gradient dY·W
            Gemm::new(1536, 384, 2048).trans_a(), // weight gradient dYᵀ·X
        ];
        let others = [
            Gemm::new(32, 32, 2048).trans_a(), // R's gradient: lda 32
            Gemm::new(64, 64, 32).batched(4, 12, [0; 2], [0; 2], [0; 2]), // attention
            Gemm::new(40, 52, 60),             // lda 60
            Gemm::new(40, 52, 64).ld(64, 60, 52), // ldb 60
            Gemm::new(9000, 64, 64),           // M over 8192 rows
        ];
        for g in &linear {
            assert!(Variant::Texture.supports(g), "{g:?}");
        }
        for g in &others {
            assert!(!Variant::Texture.supports(g), "{g:?}");
        }
        if std::env::var_os("FEDSB_MATMUL_VARIANT").is_none()
            && ctx.adapter_info().device_type == wgpu::DeviceType::Cpu
        {
            for g in &linear {
                assert_eq!(Variant::for_gemm(ctx, g), Variant::Texture, "{g:?}");
            }
            for g in &others {
                assert_eq!(Variant::for_gemm(ctx, g), Variant::Subgroup, "{g:?}");
            }
        }
        let buf = ctx.buffer_zeros("x", 40 * 60 + 60 * 52);
        let mut enc = ctx.encoder();
        let err = gemm_variant(
            ctx,
            &mut enc,
            &Gemm::new(40, 52, 60),
            Variant::Texture,
            &buf,
            &buf,
            None,
            &ctx.buffer_zeros("c", 40 * 52),
        );
        assert!(
            matches!(&err, Err(GpuError::Shape(m)) if m.contains("multiples of 64")),
            "{err:?}"
        );
    }

    #[test]
    fn matmul_direct_needs_vec4_alignment() {
        let aligned = Gemm::new(40, 52, 60);
        assert!(aligned.vec4_aligned());
        for g in [
            Gemm::new(40, 52, 61),                            // K
            Gemm::new(40, 53, 60),                            // stored row of B
            Gemm::new(37, 52, 60).trans_a(),                  // stored row of Aᵀ
            aligned.ld(62, 52, 52),                           // lda
            aligned.offsets(0, 2, 0),                         // offset of B
            aligned.batched(2, 1, [2402, 0], [0; 2], [0; 2]), // batch stride of A
        ] {
            assert!(!g.vec4_aligned(), "{g:?}");
            assert!(!Variant::Direct.supports(&g) && Variant::Tiled.supports(&g));
            assert!(!Variant::Subgroup.supports(&g));
            assert!(!Variant::Texture.supports(&g));
        }
        // C needs no alignment.
        assert!(aligned.ld(60, 52, 53).offsets(0, 0, 1).vec4_aligned());
        // The launcher refuses an unsupported explicit variant.
        let ctx = ctx();
        let buf = ctx.buffer_zeros("x", 40 * 61 + 61 * 52);
        let mut enc = ctx.encoder();
        let err = gemm_variant(
            ctx,
            &mut enc,
            &Gemm::new(40, 52, 61),
            Variant::Direct,
            &buf,
            &buf,
            None,
            &ctx.buffer_zeros("c", 40 * 52),
        );
        assert!(matches!(err, Err(GpuError::Shape(_))), "{err:?}");
        // Selection: Subgroup or Direct only on CPU adapters (unless overridden)
        // and only for aligned products.
        if std::env::var_os("FEDSB_MATMUL_VARIANT").is_none() {
            let cpu = ctx.adapter_info().device_type == wgpu::DeviceType::Cpu;
            let want = match (cpu, Variant::Subgroup.available(ctx)) {
                (false, _) => Variant::Tiled,
                (true, true) => Variant::Subgroup,
                (true, false) => Variant::Direct,
            };
            assert_eq!(Variant::for_gemm(ctx, &aligned), want);
        }
        assert_eq!(
            Variant::for_gemm(ctx, &Gemm::new(40, 53, 60)),
            Variant::Tiled
        );
    }
}
