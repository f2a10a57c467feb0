//! The whole LoRA-SB encoder on the GPU, assembled from the kernels of this
//! module: forward (embeddings, encoder layers with LoRA-SB-adapted linears,
//! mean pooling, classification head, softmax cross-entropy), backward to every
//! `R` and the head (per batch and per sample), the gradients of every adapted
//! `W0` for LoRA-SB initialization, and AdamW.
//!
//! Mirrors [`crate::reference::ReferenceEncoder`] operation by operation; the
//! tests `tests/encoder_gpu.rs` compare the two.
//!
//! Layout on the device:
//! - frozen weights (`W0`, biases, LayerNorms, embedding tables, `A`, `B`) are
//!   uploaded once by [`GpuEncoder::new`];
//! - everything trained lives in one flat `params` buffer — every `R` layer by
//!   layer in [`AdaptedLinear::ALL`] order, row-major, then the head weight
//!   (`labels × hidden`) and bias — the order of
//!   [`TrainableGradients::flatten`]. The gradient and both AdamW moments have
//!   the same layout, so one AdamW dispatch updates everything;
//! - activations and scratch buffers are allocated for a capacity of
//!   `batch × seq` tokens and reused by every later batch that fits.
//!
//! Every buffer of a pass is bound whole, so none may exceed the device's
//! [`GpuContext::max_buffer_bytes`] (128 MiB on lavapipe and by default in
//! browsers). Before allocating, a pass checks the largest of them (for
//! BERT-sized models the attention scores `batch·heads·seq²` or the FFN
//! intermediate `batch·seq·intermediate`) and returns
//! [`GpuError::BufferLimit`] naming the batch, the buffer and the limit
//! instead of letting wgpu fail. [`GpuEncoder::dp_gradients`] and
//! [`crate::train::evaluate`] instead split a DP-SGD or evaluation batch that
//! is too large into chunks of sequences ([`GpuEncoder::pass_sequences`]),
//! with the same result.
//!
//! Only what is asked for is read back: losses after a step, logits or
//! embeddings, and `params` (the `R`s and the head) at the end of a round.

use crate::model::{AdaptedLinear, BertConfig, BertWeights, EncodedBatch};
use crate::reference::{ClassifierHead, LoraSbAdapters, Matrix, TrainableGradients};

use super::adamw::{adamw_step, AdamState, AdamW};
use super::attention::{attention_backward, attention_forward, AttentionShape};
use super::context::RowLayout;
use super::context::{GpuBuffer, GpuContext};
use super::dp::{dp_clip_sum, dp_sq_norms, SumInto};
use super::embeddings::{embeddings_forward, EmbeddingTables};
use super::gelu::{gelu_backward, gelu_forward};
use super::head::{
    head_grad_per_sample, mean_pool_backward, mean_pool_forward, softmax_cross_entropy, HeadShape,
};
use super::layernorm::{layernorm_backward, layernorm_forward, LayerNormShape};
use super::lora_sb::{lora_sb_grad_r, LoraSbDims};
use super::matmul::{gemm, gemm_epilogue, linear_backward_weight, Epilogue, Gemm};
use super::GpuError;

/// How [`GpuEncoder::record_backward`] scales and splits the gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradientMode {
    /// Gradients of the mean loss of the batch (ordinary training).
    BatchMean,
    /// Gradients of each sample's own loss, kept per sample (for DP-SGD
    /// clipping); the batch gradient buffer then holds their sum.
    PerSample,
}

/// A frozen linear layer `y = x·Wᵀ + b`.
struct LinearGpu {
    weight: GpuBuffer,
    bias: GpuBuffer,
    out_features: usize,
    in_features: usize,
}

/// The frozen adapter matrices of one linear and where its `R` lives in `params`.
struct AdapterGpu {
    a: GpuBuffer,
    b: GpuBuffer,
    offset: usize,
    /// `W0 + B·R·A` (out×in), rewritten by a forward pass that merges
    /// ([`AdapterMerge`]) when `R` changed since the last merge
    /// ([`GpuEncoder::merge_due`]); `br` (out×r) holds `B·R` on the way.
    merged: GpuBuffer,
    br: GpuBuffer,
}

/// Whether passes multiply by the merged weight `W0 + B·R·A` of each adapted
/// linear (recomputed from the current `R` at the start of a forward pass
/// when `R` has changed since the last merge: after every training step, not
/// between the batches of an evaluation or the chunks of a split pass) or
/// apply the LoRA-SB branch beside `W0`, `((X·Aᵀ)·Rᵀ)·Bᵀ` forward and
/// `((dY·B)·R)·A` for the input gradient. Both give the same result up to
/// f32 rounding; the `R` gradients use `X·Aᵀ` and `dY·B` either way.
///
/// Merging replaces the branch's two products with inner dimension r per
/// direction, which run far below a GPU's (and lavapipe's) matmul peak, by
/// one `out × in × r` product per layer and pass: it pays when a pass has
/// more token rows than `in·out / (in + out)` (192 for a 384×384 layer; a
/// training batch of 32 sentences has several hundred). The choice is the
/// same for every pass, not made per pass by its size, so that a batch
/// split into passes ([`GpuEncoder::set_max_pass_sequences`]) gives the
/// same result bit for bit as one pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdapterMerge {
    /// Multiply by `W0 + B·R·A`.
    #[default]
    Merged,
    /// Apply the branch beside `W0` (tests, and A/B measurements).
    Branch,
}

struct LayerGpu {
    linears: [LinearGpu; 6],
    ln1: (GpuBuffer, GpuBuffer),
    ln2: (GpuBuffer, GpuBuffer),
    adapters: [Option<AdapterGpu>; 6],
}

/// Activations of one encoder layer kept for the backward pass. Its input is
/// the previous layer's `h2` (or the embeddings).
struct LayerActivations {
    xa: [Option<GpuBuffer>; 6],
    q: GpuBuffer,
    k: GpuBuffer,
    v: GpuBuffer,
    probs: GpuBuffer,
    context: GpuBuffer,
    ao: GpuBuffer,
    stats1: GpuBuffer,
    h1: GpuBuffer,
    /// GELU's slope at the intermediate linear's output (the backward pass
    /// needs it, not the pre-activation).
    inter_slope: GpuBuffer,
    inter_act: GpuBuffer,
    out: GpuBuffer,
    stats2: GpuBuffer,
    h2: GpuBuffer,
}

/// Per-step inputs, activations and backward scratch for up to `batch × seq` tokens.
struct Workspace {
    batch: usize,
    seq: usize,
    ids: GpuBuffer,
    type_ids: GpuBuffer,
    mask: GpuBuffer,
    sample_of: GpuBuffer,
    labels: GpuBuffer,
    ones: GpuBuffer,
    emb_sum: GpuBuffer,
    emb_stats: GpuBuffer,
    emb_out: GpuBuffer,
    layers: Vec<LayerActivations>,
    pooled: GpuBuffer,
    logits: GpuBuffer,
    losses: GpuBuffer,
    dlogits: GpuBuffer,
    dpooled: GpuBuffer,
    dh: GpuBuffer,
    dsum2: GpuBuffer,
    d_pre: GpuBuffer,
    dh1: GpuBuffer,
    dsum1: GpuBuffer,
    dctx: GpuBuffer,
    dprobs: GpuBuffer,
    dq: GpuBuffer,
    dk: GpuBuffer,
    dv: GpuBuffer,
    u: GpuBuffer,
    tmp: GpuBuffer,
}

/// Per-sample gradients, allocated on the first [`GradientMode::PerSample`] pass.
struct PerSampleBuffers {
    batch: usize,
    /// Per layer, per adapted linear: `batch × r × r`.
    r: Vec<[Option<GpuBuffer>; 6]>,
    head_weight: GpuBuffer,
    head_bias: GpuBuffer,
}

/// Shape of the batch currently in the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BatchShape {
    batch: usize,
    seq: usize,
}

impl BatchShape {
    fn rows(&self) -> usize {
        self.batch * self.seq
    }
}

/// The encoder, its adapters and head, and its optimizer state on one device.
pub struct GpuEncoder<'c> {
    ctx: &'c GpuContext,
    config: BertConfig,
    word: GpuBuffer,
    position: GpuBuffer,
    token_type: GpuBuffer,
    emb_ln: (GpuBuffer, GpuBuffer),
    layers: Vec<LayerGpu>,
    rank: usize,
    num_labels: usize,
    head_weight_offset: usize,
    head_bias_offset: usize,
    params: GpuBuffer,
    grads: GpuBuffer,
    adam_m: GpuBuffer,
    adam_v: GpuBuffer,
    adam_steps: u32,
    workspace: Option<Workspace>,
    per_sample: Option<PerSampleBuffers>,
    /// Per layer, per linear: `Σ ∂L/∂W0` (for LoRA-SB initialization).
    weight_grads: Option<Vec<[GpuBuffer; 6]>>,
    current: Option<BatchShape>,
    /// Cap on the sequences of one DP-SGD or evaluation pass
    /// ([`Self::set_max_pass_sequences`]).
    max_pass_sequences: Option<usize>,
    /// When passes use the merged weights ([`Self::set_adapter_merge`]).
    adapter_merge: AdapterMerge,
    /// Version of `params`, bumped by every write to it (an AdamW step,
    /// [`Self::set_trainable`]).
    params_version: u64,
    /// The `params` version whose `R`s the merged weights hold: set once a
    /// pass that merged them was submitted (a recorded pass that is dropped
    /// unsubmitted leaves them, and this, as they were).
    merged_version: Option<u64>,
}

impl std::fmt::Debug for GpuEncoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEncoder")
            .field("layers", &self.layers.len())
            .field("hidden", &self.config.hidden_size)
            .field("rank", &self.rank)
            .field("num_labels", &self.num_labels)
            .finish_non_exhaustive()
    }
}

impl<'c> GpuEncoder<'c> {
    /// Uploads the frozen weights, the adapters (`None`: plain encoder) and the
    /// head (`None`: embeddings only). All adapted linears must share one rank.
    pub fn new(
        ctx: &'c GpuContext,
        weights: &BertWeights<f32>,
        adapters: Option<&LoraSbAdapters<f32>>,
        head: Option<&ClassifierHead<f32>>,
    ) -> Result<Self, GpuError> {
        let config = weights.config.clone();
        let mut rank = 0;
        if let Some(a) = adapters {
            if a.layers.len() != weights.layers.len() {
                return Err(GpuError::Shape(format!(
                    "{} adapter layers for {} encoder layers",
                    a.layers.len(),
                    weights.layers.len()
                )));
            }
            for m in a.layers.iter().flat_map(|l| l.iter().flatten()) {
                if rank != 0 && m.rank() != rank {
                    return Err(GpuError::Shape(format!(
                        "adapters of ranks {rank} and {} (one rank expected)",
                        m.rank()
                    )));
                }
                rank = m.rank();
            }
        }
        let mut offset = 0;
        let mut initial = Vec::new();
        let mut layers = Vec::with_capacity(weights.layers.len());
        for (l, lw) in weights.layers.iter().enumerate() {
            let linears = AdaptedLinear::ALL.map(|which| {
                let lin = lw.linear(which);
                let name = which.checkpoint_name();
                LinearGpu {
                    weight: ctx.buffer_f32(&format!("{l}.{name}.weight"), &lin.weight.data),
                    bias: ctx.buffer_f32(&format!("{l}.{name}.bias"), &lin.bias.data),
                    out_features: lin.out_features(),
                    in_features: lin.in_features(),
                }
            });
            let mut adapter_gpu: [Option<AdapterGpu>; 6] = Default::default();
            if let Some(a) = adapters {
                for which in AdaptedLinear::ALL {
                    if let Some(m) = a.module(l, which) {
                        let (out, inp) = which.shape(&config);
                        if m.a.cols != inp || m.b.rows != out || m.a.rows != rank {
                            return Err(GpuError::Shape(format!(
                                "adapter {l}.{}: A {}×{}, B {}×{} for a {out}×{inp} layer",
                                which.checkpoint_name(),
                                m.a.rows,
                                m.a.cols,
                                m.b.rows,
                                m.b.cols
                            )));
                        }
                        adapter_gpu[which.index()] = Some(AdapterGpu {
                            a: ctx.buffer_f32("lora_sb.A", &m.a.data),
                            b: ctx.buffer_f32("lora_sb.B", &m.b.data),
                            offset,
                            merged: ctx.buffer_zeros("lora_sb.merged", out * inp),
                            br: ctx.buffer_zeros("lora_sb.BR", out * rank.max(1)),
                        });
                        initial.extend_from_slice(&m.r.data);
                        offset += rank * rank;
                    }
                }
            }
            layers.push(LayerGpu {
                linears,
                ln1: (
                    ctx.buffer_f32("ln1.weight", &lw.attention_layer_norm.weight.data),
                    ctx.buffer_f32("ln1.bias", &lw.attention_layer_norm.bias.data),
                ),
                ln2: (
                    ctx.buffer_f32("ln2.weight", &lw.output_layer_norm.weight.data),
                    ctx.buffer_f32("ln2.bias", &lw.output_layer_norm.bias.data),
                ),
                adapters: adapter_gpu,
            });
        }
        let head_weight_offset = offset;
        let num_labels = head.map_or(0, |h| h.num_labels());
        if let Some(h) = head {
            if h.weight.cols != config.hidden_size || h.bias.len() != num_labels {
                return Err(GpuError::Shape(format!(
                    "head {}×{} with {} biases for hidden size {}",
                    h.weight.rows,
                    h.weight.cols,
                    h.bias.len(),
                    config.hidden_size
                )));
            }
            initial.extend_from_slice(&h.weight.data);
            initial.extend_from_slice(&h.bias);
        }
        let head_bias_offset = head_weight_offset + num_labels * config.hidden_size;
        let n = initial.len();
        let e = &weights.embeddings;
        Ok(Self {
            ctx,
            word: ctx.buffer_f32("word_embeddings", &e.word.data),
            position: ctx.buffer_f32("position_embeddings", &e.position.data),
            token_type: ctx.buffer_f32("token_type_embeddings", &e.token_type.data),
            emb_ln: (
                ctx.buffer_f32("embeddings.ln.weight", &e.layer_norm.weight.data),
                ctx.buffer_f32("embeddings.ln.bias", &e.layer_norm.bias.data),
            ),
            config,
            layers,
            rank,
            num_labels,
            head_weight_offset,
            head_bias_offset,
            params: ctx.buffer_f32("trainable", &initial),
            grads: ctx.buffer_zeros("trainable.grad", n),
            adam_m: ctx.buffer_zeros("adamw.m", n),
            adam_v: ctx.buffer_zeros("adamw.v", n),
            adam_steps: 0,
            workspace: None,
            per_sample: None,
            weight_grads: None,
            current: None,
            max_pass_sequences: None,
            adapter_merge: AdapterMerge::default(),
            params_version: 0,
            merged_version: None,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Adapter rank (0 without adapters).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Classes of the head (0 without a head).
    pub fn num_labels(&self) -> usize {
        self.num_labels
    }

    /// Number of trained parameters (every `R` and the head).
    pub fn num_trainable(&self) -> usize {
        self.params.len
    }

    /// Reserves activations for batches of up to `batch × seq` tokens (done
    /// automatically, growing as needed, by every pass). The capacity grows to
    /// the larger batch and the longer sequences of the old and the new shape
    /// when that still fits the device's buffer limit, else it is reallocated
    /// for exactly `batch × seq`.
    ///
    /// # Errors
    /// [`GpuError::BufferLimit`] when `batch` sequences of `seq` tokens need
    /// a buffer larger than [`GpuContext::max_buffer_bytes`].
    pub fn reserve(&mut self, batch: usize, seq: usize) -> Result<(), GpuError> {
        self.check_pass(batch, seq, false)?;
        if let Some(w) = &self.workspace {
            if w.batch >= batch && w.seq >= seq {
                return Ok(());
            }
        }
        let (batch, seq) = match &self.workspace {
            Some(w) if self.pass_fits(w.batch.max(batch), w.seq.max(seq), false) => {
                (w.batch.max(batch), w.seq.max(seq))
            }
            _ => (batch, seq),
        };
        self.workspace = None; // free the old one first
        self.workspace = Some(self.allocate(batch, seq));
        Ok(())
    }

    /// Caps the number of sequences one pass of [`Self::dp_gradients`] (and
    /// of [`crate::train::evaluate`]) processes; larger DP-SGD and evaluation
    /// batches are split into chunks of at most this many (with the same
    /// result). `None` (the default): as many as the device's buffer limit
    /// allows ([`Self::max_pass_sequences`]). For tests and for callers that
    /// want to bound the activation memory.
    pub fn set_max_pass_sequences(&mut self, max: Option<usize>) {
        self.max_pass_sequences = max.map(|m| m.max(1));
    }

    /// Chooses when passes multiply by the merged weights `W0 + B·R·A`
    /// ([`AdapterMerge`]; default [`AdapterMerge::Merged`]). The results are the
    /// same up to f32 rounding; this is for tests and measurements.
    pub fn set_adapter_merge(&mut self, merge: AdapterMerge) {
        self.adapter_merge = merge;
    }

    /// [`Self::max_pass_sequences`] capped by [`Self::set_max_pass_sequences`]:
    /// how many sequences of `seq` tokens a splitting caller puts in one pass.
    pub fn pass_sequences(&self, seq: usize, per_sample: bool) -> usize {
        let fit = self.max_pass_sequences(seq, per_sample);
        self.max_pass_sequences.map_or(fit, |cap| fit.min(cap))
    }

    /// The most sequences of `seq` (padded) tokens one forward + backward
    /// pass can hold on this device: every buffer it allocates (with the
    /// per-sample gradients when `per_sample`) within
    /// [`GpuContext::max_buffer_bytes`], and `batch·heads`, `batch·classes`
    /// within the 65 535 workgroups of a dispatch dimension. 0 when not even
    /// one sequence fits.
    pub fn max_pass_sequences(&self, seq: usize, per_sample: bool) -> usize {
        let (_, per_seq) = self.largest_per_sequence(seq, per_sample);
        let by_memory = self.ctx.max_buffer_bytes() / (per_seq.max(1) * 4);
        let spread = self.config.num_attention_heads.max(self.num_labels).max(1);
        (by_memory.min(usize::MAX as u64) as usize).min(65_535 / spread)
    }

    /// The largest buffer of a pass, per sequence of `seq` tokens: its name
    /// and its 4-byte elements. Every buffer of [`Self::allocate`] (and of
    /// [`Self::ensure_per_sample`] when `per_sample`) is `batch ×` one of these.
    fn largest_per_sequence(&self, seq: usize, per_sample: bool) -> (&'static str, u64) {
        let c = &self.config;
        let t = seq as u64;
        let (h, i) = (c.hidden_size as u64, c.intermediate_size as u64);
        let heads = c.num_attention_heads as u64;
        let r = self.rank as u64;
        let nl = self.num_labels.max(1) as u64;
        let mut sizes = vec![
            ("attention scores (heads·seq²)", heads * t * t),
            ("FFN intermediate (seq·intermediate_size)", t * i),
            ("hidden states (seq·hidden)", t * h),
            ("LoRA-SB activations (seq·rank)", t * r.max(1)),
            ("LayerNorm statistics (2·seq)", 2 * t),
            ("pooled embeddings (hidden)", h),
            ("logits (labels)", nl),
        ];
        if per_sample {
            sizes.push(("per-sample R gradients (rank²)", r * r));
            sizes.push(("per-sample head gradients (labels·hidden)", nl * h));
        }
        sizes
            .into_iter()
            .max_by_key(|&(_, n)| n)
            .expect("non-empty")
    }

    fn pass_fits(&self, batch: usize, seq: usize, per_sample: bool) -> bool {
        let (_, per_seq) = self.largest_per_sequence(seq, per_sample);
        (batch as u64).saturating_mul(per_seq).saturating_mul(4) <= self.ctx.max_buffer_bytes()
    }

    /// [`GpuError::BufferLimit`] unless a pass over `batch` sequences of `seq`
    /// tokens keeps every buffer within the device's limit.
    fn check_pass(&self, batch: usize, seq: usize, per_sample: bool) -> Result<(), GpuError> {
        if self.pass_fits(batch, seq, per_sample) {
            return Ok(());
        }
        let (name, per_seq) = self.largest_per_sequence(seq, per_sample);
        let bytes = (batch as u64).saturating_mul(per_seq).saturating_mul(4);
        let limit = self.ctx.max_buffer_bytes();
        let fit = self.max_pass_sequences(seq, per_sample);
        let advice = if fit == 0 {
            "not even one sequence of this length fits; use shorter sequences".to_string()
        } else {
            format!("at most {fit} sequences of this length fit in one pass; use a smaller --batch")
        };
        let plural = if batch == 1 { "" } else { "s" };
        Err(GpuError::BufferLimit(format!(
            "a batch of {batch} sequence{plural} padded to {seq} tokens needs {bytes} bytes \
             ({batch} × {per_seq} values) for its {name} buffer, above this device's \
             limit of {limit} bytes per storage buffer (max_storage_buffer_binding_size, \
             max_buffer_size); {advice}"
        )))
    }

    fn allocate(&self, batch: usize, seq: usize) -> Workspace {
        let ctx = self.ctx;
        let c = &self.config;
        let (h, i, r) = (c.hidden_size, c.intermediate_size, self.rank);
        let rows = batch * seq;
        let z = |label: &str, n: usize| ctx.buffer_zeros(label, n);
        let probs = batch * c.num_attention_heads * seq * seq;
        let labels_or_one = self.num_labels.max(1);
        let layers = self
            .layers
            .iter()
            .map(|l| LayerActivations {
                xa: l
                    .adapters
                    .each_ref()
                    .map(|a| a.as_ref().map(|_| z("xa", rows * r))),
                q: z("q", rows * h),
                k: z("k", rows * h),
                v: z("v", rows * h),
                probs: z("probs", probs),
                context: z("context", rows * h),
                ao: z("attention_output", rows * h),
                stats1: z("ln1.stats", 2 * rows),
                h1: z("h1", rows * h),
                inter_slope: z("intermediate.slope", rows * i),
                inter_act: z("intermediate.gelu", rows * i),
                out: z("output", rows * h),
                stats2: z("ln2.stats", 2 * rows),
                h2: z("h2", rows * h),
            })
            .collect();
        Workspace {
            batch,
            seq,
            ids: z("input_ids", rows),
            type_ids: z("token_type_ids", rows),
            mask: z("attention_mask", rows),
            sample_of: z("sample_of", rows),
            labels: z("labels", batch),
            ones: ctx.buffer_f32("ones", &vec![1.0; batch]),
            emb_sum: z("embeddings.sum", rows * h),
            emb_stats: z("embeddings.ln.stats", 2 * rows),
            emb_out: z("embeddings", rows * h),
            layers,
            pooled: z("pooled", batch * h),
            logits: z("logits", batch * labels_or_one),
            losses: z("losses", batch),
            dlogits: z("dlogits", batch * labels_or_one),
            dpooled: z("dpooled", batch * h),
            dh: z("dh", rows * h),
            dsum2: z("dsum2", rows * h),
            d_pre: z("d_intermediate_pre", rows * i),
            dh1: z("dh1", rows * h),
            dsum1: z("dsum1", rows * h),
            dctx: z("dcontext", rows * h),
            dprobs: z("dprobs", probs),
            dq: z("dq", rows * h),
            dk: z("dk", rows * h),
            dv: z("dv", rows * h),
            u: z("lora_sb.u", rows * r.max(1)),
            tmp: z("lora_sb.tmp", rows * r.max(1)),
        }
    }

    /// Writes a tokenized batch (and its labels, if any) to the device.
    fn upload(&mut self, batch: &EncodedBatch, labels: Option<&[u32]>) -> Result<(), GpuError> {
        let (n, t) = (batch.batch_size, batch.seq_len);
        if n == 0 || t == 0 {
            return Err(GpuError::Shape("empty batch".into()));
        }
        if t > self.config.max_position_embeddings {
            return Err(GpuError::Shape(format!(
                "sequence length {t} exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        let rows = n * t;
        if batch.input_ids.len() != rows
            || batch.token_type_ids.len() != rows
            || batch.attention_mask.len() != rows
        {
            return Err(GpuError::Shape(format!(
                "batch {n}×{t}: ids, type ids and mask must hold {rows} entries"
            )));
        }
        if let Some(&id) = batch
            .input_ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(GpuError::Shape(format!(
                "token id {id} outside the vocabulary ({})",
                self.config.vocab_size
            )));
        }
        self.reserve(n, t)?;
        let w = self.workspace.as_ref().expect("reserved");
        let q = &self.ctx.queue;
        q.write_buffer(&w.ids.buffer, 0, bytemuck::cast_slice(&batch.input_ids));
        q.write_buffer(
            &w.type_ids.buffer,
            0,
            bytemuck::cast_slice(&batch.token_type_ids),
        );
        q.write_buffer(
            &w.mask.buffer,
            0,
            bytemuck::cast_slice(&batch.attention_mask),
        );
        let sample_of: Vec<u32> = (0..rows)
            .map(|row| {
                if batch.attention_mask[row] != 0 {
                    (row / t) as u32
                } else {
                    u32::MAX
                }
            })
            .collect();
        q.write_buffer(&w.sample_of.buffer, 0, bytemuck::cast_slice(&sample_of));
        if let Some(labels) = labels {
            if labels.len() != n {
                return Err(GpuError::Shape(format!(
                    "{} labels for a batch of {n}",
                    labels.len()
                )));
            }
            if let Some(&l) = labels.iter().find(|&&l| l as usize >= self.num_labels) {
                return Err(GpuError::Shape(format!(
                    "label {l} outside the head's {} classes",
                    self.num_labels
                )));
            }
            q.write_buffer(&w.labels.buffer, 0, bytemuck::cast_slice(labels));
        }
        self.current = Some(BatchShape { batch: n, seq: t });
        Ok(())
    }

    fn shape(&self) -> Result<BatchShape, GpuError> {
        self.current
            .ok_or_else(|| GpuError::Shape("no batch uploaded".into()))
    }

    fn head_shape(&self, s: BatchShape) -> HeadShape {
        HeadShape {
            batch: s.batch,
            seq: s.seq,
            hidden: self.config.hidden_size,
            classes: self.num_labels.max(1),
        }
    }

    /// The adapter whose merged weight `W0 + B·R·A` a pass multiplies by in
    /// place of `W0`: an adapted linear (one with activations `xa` kept) when
    /// passes merge ([`AdapterMerge`]); `None` where the pass uses `W0` and
    /// the branch.
    fn merging<'a>(
        &self,
        adapter: Option<&'a AdapterGpu>,
        xa: Option<&GpuBuffer>,
    ) -> Option<&'a AdapterGpu> {
        adapter.filter(|_| xa.is_some() && self.adapter_merge == AdapterMerge::Merged)
    }

    /// Whether the next forward pass must rewrite the merged weights: passes
    /// merge and `params` changed since the merged weights were written.
    fn merge_due(&self) -> bool {
        self.adapter_merge == AdapterMerge::Merged
            && self.merged_version != Some(self.params_version)
    }

    /// Records and submits a forward pass alone.
    fn submit_forward(&mut self) -> Result<(), GpuError> {
        let mut enc = self.ctx.encoder();
        self.record_forward(&mut enc)?;
        self.ctx.submit(enc);
        self.forward_submitted();
        Ok(())
    }

    /// Call after submitting an encoder with a recorded forward pass, before
    /// any change of `params` recorded after it is counted: the merged
    /// weights now hold the current `R`.
    fn forward_submitted(&mut self) {
        if self.adapter_merge == AdapterMerge::Merged {
            self.merged_version = Some(self.params_version);
        }
    }

    /// `y = x·W0ᵀ + b (+ ((x·Aᵀ)·Rᵀ)·Bᵀ)`, keeping `x·Aᵀ` in `xa`; where the
    /// pass merges ([`AdapterMerge`]) first `merged = W0 + (B·R)·A`, then
    /// `y = x·mergedᵀ + b`.
    ///
    /// With `gelu` (the intermediate linear), the layer's output goes through
    /// GELU: `gelu` receives `gelu(y)` and `y` the slopes `gelu'(y)` for the
    /// backward pass. Where the main product is the last to write `y` (the
    /// pass merges, or the linear has no adapter) its epilogue does that as it
    /// stores; otherwise `gelu.wgsl` does after the LoRA-SB branch.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        lin: &LinearGpu,
        adapter: Option<&AdapterGpu>,
        xa: Option<&GpuBuffer>,
        tmp: &GpuBuffer,
        x: &GpuBuffer,
        y: &GpuBuffer,
        gelu: Option<&GpuBuffer>,
        rows: usize,
    ) -> Result<(), GpuError> {
        let (out, inp, r) = (lin.out_features, lin.in_features, self.rank);
        let ctx = self.ctx;
        let merging = self.merging(adapter, xa);
        // Whether an unmerged LoRA-SB branch adds to y after the main product.
        let branch = merging.is_none() && adapter.is_some() && xa.is_some();
        if let Some(ad) = merging.filter(|_| self.merge_due()) {
            enc.copy_buffer_to_buffer(
                &lin.weight.buffer,
                0,
                &ad.merged.buffer,
                0,
                (out * inp * 4) as u64,
            );
            gemm(
                ctx,
                enc,
                &Gemm::new(out, r, r).offsets(0, ad.offset, 0),
                &ad.b,
                &self.params,
                None,
                &ad.br,
            )?;
            gemm(
                ctx,
                enc,
                &Gemm::new(out, inp, r).accumulate(),
                &ad.br,
                &ad.a,
                None,
                &ad.merged,
            )?;
        }
        let (main_out, epilogue) = match gelu {
            Some(act) if !branch => (act, Epilogue::Gelu { slope: y }),
            _ => (y, Epilogue::None),
        };
        gemm_epilogue(
            ctx,
            enc,
            &Gemm::new(rows, out, inp).trans_b(),
            x,
            merging.map_or(&lin.weight, |ad| &ad.merged),
            Some(&lin.bias),
            main_out,
            epilogue,
        )?;
        if let (Some(ad), Some(xa)) = (adapter, xa) {
            gemm(
                ctx,
                enc,
                &Gemm::new(rows, r, inp).trans_b(),
                x,
                &ad.a,
                None,
                xa,
            )?;
        }
        if let (true, Some(ad), Some(xa)) = (branch, adapter, xa) {
            gemm(
                ctx,
                enc,
                &Gemm::new(rows, r, r).trans_b().offsets(0, ad.offset, 0),
                xa,
                &self.params,
                None,
                tmp,
            )?;
            gemm(
                ctx,
                enc,
                &Gemm::new(rows, out, r).trans_b().accumulate(),
                tmp,
                &ad.b,
                None,
                y,
            )?;
            if let Some(act) = gelu {
                gelu_forward(ctx, enc, y, act, rows * out)?;
            }
        }
        Ok(())
    }

    /// Records the forward pass of the uploaded batch up to the pooled
    /// embedding (and the logits when there is a head).
    fn record_forward(&self, enc: &mut wgpu::CommandEncoder) -> Result<(), GpuError> {
        let s = self.shape()?;
        let w = self.workspace.as_ref().expect("uploaded");
        let c = &self.config;
        let ctx = self.ctx;
        let rows = s.rows();
        let h = c.hidden_size;
        let eps = c.layer_norm_eps as f32;
        let tables = EmbeddingTables {
            word: &self.word,
            position: &self.position,
            token_type: &self.token_type,
            vocab: c.vocab_size,
            positions: c.max_position_embeddings,
            types: c.type_vocab_size,
            hidden: h,
        };
        embeddings_forward(
            ctx,
            enc,
            &tables,
            &w.ids,
            &w.type_ids,
            rows,
            s.seq,
            &w.emb_sum,
        )?;
        let ln_shape = LayerNormShape { rows, h, eps };
        layernorm_forward(
            ctx,
            enc,
            RowLayout::for_device(ctx),
            &ln_shape,
            &w.emb_sum,
            None,
            &self.emb_ln.0,
            &self.emb_ln.1,
            &w.emb_out,
            &w.emb_stats,
        )?;
        let attn = AttentionShape {
            batch: s.batch,
            seq: s.seq,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        };
        for (l, (lg, a)) in self.layers.iter().zip(&w.layers).enumerate() {
            let x = if l == 0 {
                &w.emb_out
            } else {
                &w.layers[l - 1].h2
            };
            let lin = |enc: &mut wgpu::CommandEncoder,
                       which: AdaptedLinear,
                       input: &GpuBuffer,
                       y: &GpuBuffer,
                       gelu: Option<&GpuBuffer>| {
                let i = which.index();
                self.linear_forward(
                    enc,
                    &lg.linears[i],
                    lg.adapters[i].as_ref(),
                    a.xa[i].as_ref(),
                    &w.tmp,
                    input,
                    y,
                    gelu,
                    rows,
                )
            };
            lin(enc, AdaptedLinear::Query, x, &a.q, None)?;
            lin(enc, AdaptedLinear::Key, x, &a.k, None)?;
            lin(enc, AdaptedLinear::Value, x, &a.v, None)?;
            attention_forward(
                ctx, enc, &attn, &a.q, &a.k, &a.v, &w.mask, &a.probs, &a.context,
            )?;
            lin(enc, AdaptedLinear::AttentionOutput, &a.context, &a.ao, None)?;
            layernorm_forward(
                ctx,
                enc,
                RowLayout::for_device(ctx),
                &ln_shape,
                &a.ao,
                Some(x),
                &lg.ln1.0,
                &lg.ln1.1,
                &a.h1,
                &a.stats1,
            )?;
            // inter_act = gelu(h1·Wᵀ + b); inter_slope = its slope.
            lin(
                enc,
                AdaptedLinear::Intermediate,
                &a.h1,
                &a.inter_slope,
                Some(&a.inter_act),
            )?;
            lin(enc, AdaptedLinear::Output, &a.inter_act, &a.out, None)?;
            layernorm_forward(
                ctx,
                enc,
                RowLayout::for_device(ctx),
                &ln_shape,
                &a.out,
                Some(&a.h1),
                &lg.ln2.0,
                &lg.ln2.1,
                &a.h2,
                &a.stats2,
            )?;
        }
        let last = self.last_hidden(w);
        let hs = self.head_shape(s);
        mean_pool_forward(ctx, enc, &hs, &w.mask, last, &w.pooled)?;
        if self.num_labels > 0 {
            let nl = self.num_labels;
            gemm(
                ctx,
                enc,
                &Gemm::new(s.batch, nl, h)
                    .trans_b()
                    .offsets(0, self.head_weight_offset, 0),
                &w.pooled,
                &self.params,
                None,
                &w.logits,
            )?;
            // + bias: ones[batch×1] · b[1×labels].
            gemm(
                ctx,
                enc,
                &Gemm::new(s.batch, nl, 1)
                    .offsets(0, self.head_bias_offset, 0)
                    .accumulate(),
                &w.ones,
                &self.params,
                None,
                &w.logits,
            )?;
        }
        Ok(())
    }

    fn last_hidden<'w>(&self, w: &'w Workspace) -> &'w GpuBuffer {
        w.layers.last().map_or(&w.emb_out, |a| &a.h2)
    }

    /// Backward of one adapted linear: `dx (+)= dy·W0 + ((dy·B)·R)·A` (when
    /// `dx` is given; `dy·merged` where the pass merges, [`AdapterMerge`], with
    /// the merged weight the forward pass just wrote), the `R` gradient into
    /// `grads` (batch) and, per sample, into `per_sample`, and `Σ dyᵀ·x` into
    /// `dw`. With `gelu_slope` (the output linear, whose input went through
    /// GELU) `dx` is multiplied by the slopes the forward pass left: by the
    /// main product's epilogue where it is the last to write `dx`, otherwise
    /// by `gelu.wgsl` after the LoRA-SB branch (`dx` must then not accumulate).
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        w: &Workspace,
        s: BatchShape,
        lin: &LinearGpu,
        adapter: Option<&AdapterGpu>,
        xa: Option<&GpuBuffer>,
        per_sample: Option<&GpuBuffer>,
        dw: Option<&GpuBuffer>,
        x: &GpuBuffer,
        dy: &GpuBuffer,
        dx: Option<(&GpuBuffer, bool)>,
        gelu_slope: Option<&GpuBuffer>,
    ) -> Result<(), GpuError> {
        let ctx = self.ctx;
        let rows = s.rows();
        let (out, inp, r) = (lin.out_features, lin.in_features, self.rank);
        // The same choice as the forward pass of this batch made.
        let merging = self.merging(adapter, xa);
        // Whether an unmerged LoRA-SB branch adds to dx after the main product.
        let branch = merging.is_none() && adapter.is_some() && xa.is_some();
        if let Some((dx, accumulate)) = dx {
            let mut g = Gemm::new(rows, inp, out);
            g.accumulate = accumulate;
            let weight = merging.map_or(&lin.weight, |ad| &ad.merged);
            let epilogue = match gelu_slope {
                Some(_) if accumulate => {
                    return Err(GpuError::Shape(
                        "linear backward: the GELU gate needs a dx of its own".into(),
                    ))
                }
                Some(slope) if !branch => Epilogue::GeluGate { slope },
                _ => Epilogue::None,
            };
            gemm_epilogue(ctx, enc, &g, dy, weight, None, dx, epilogue)?;
        }
        if let (Some(ad), Some(xa)) = (adapter, xa) {
            gemm(ctx, enc, &Gemm::new(rows, r, out), dy, &ad.b, None, &w.u)?;
            // ∂L/∂R = (dY·B)ᵀ·(X·Aᵀ) over all tokens (padding rows carry zero gradient).
            gemm(
                ctx,
                enc,
                &Gemm::new(r, r, rows).trans_a().offsets(0, 0, ad.offset),
                &w.u,
                xa,
                None,
                &self.grads,
            )?;
            if let Some(ps) = per_sample {
                let d = LoraSbDims {
                    rows,
                    in_features: inp,
                    out_features: out,
                    rank: r,
                };
                lora_sb_grad_r(ctx, enc, &d, &w.u, xa, &w.sample_of, s.batch, s.seq, ps)?;
            }
            if let (Some((dx, _)), None) = (dx, merging) {
                gemm(
                    ctx,
                    enc,
                    &Gemm::new(rows, r, r).offsets(0, ad.offset, 0),
                    &w.u,
                    &self.params,
                    None,
                    &w.tmp,
                )?;
                gemm(
                    ctx,
                    enc,
                    &Gemm::new(rows, inp, r).accumulate(),
                    &w.tmp,
                    &ad.a,
                    None,
                    dx,
                )?;
                if let Some(slope) = gelu_slope {
                    gelu_backward(ctx, enc, slope, dx, rows * inp)?;
                }
            }
        }
        if let Some(dw) = dw {
            linear_backward_weight(ctx, enc, dy, x, dw, rows, inp, out, true)?;
        }
        Ok(())
    }

    fn ensure_per_sample(&mut self, batch: usize) -> Result<(), GpuError> {
        if self.per_sample.as_ref().is_some_and(|p| p.batch >= batch) {
            return Ok(());
        }
        let seq = self.shape().map_or(1, |s| s.seq);
        self.check_pass(batch, seq, true)?;
        self.per_sample = None; // free the old ones first
        let ctx = self.ctx;
        let rr = self.rank * self.rank;
        let nl = self.num_labels.max(1);
        self.per_sample = Some(PerSampleBuffers {
            batch,
            r: self
                .layers
                .iter()
                .map(|l| {
                    l.adapters.each_ref().map(|a| {
                        a.as_ref()
                            .map(|_| ctx.buffer_zeros("grad_r.per_sample", batch * rr))
                    })
                })
                .collect(),
            head_weight: ctx.buffer_zeros(
                "grad_head_weight.per_sample",
                batch * nl * self.config.hidden_size,
            ),
            head_bias: ctx.buffer_zeros("grad_head_bias.per_sample", batch * nl),
        });
        Ok(())
    }

    /// Records loss, `dlogits` and the backward pass of the uploaded batch
    /// (after [`Self::record_forward`]): gradients of every `R` and the head
    /// into the gradient buffer (overwritten) and, as asked, per sample and
    /// of every adapted `W0` (accumulated).
    fn record_backward(
        &self,
        enc: &mut wgpu::CommandEncoder,
        mode: GradientMode,
    ) -> Result<(), GpuError> {
        let s = self.shape()?;
        if self.num_labels == 0 {
            return Err(GpuError::Shape(
                "training needs a classification head".into(),
            ));
        }
        let w = self.workspace.as_ref().expect("uploaded");
        let ps = match mode {
            GradientMode::PerSample => Some(self.per_sample.as_ref().expect("allocated")),
            GradientMode::BatchMean => None,
        };
        let ctx = self.ctx;
        let c = &self.config;
        let (rows, h, nl) = (s.rows(), c.hidden_size, self.num_labels);
        let hs = self.head_shape(s);
        let scale = match mode {
            GradientMode::BatchMean => 1.0 / s.batch as f32,
            GradientMode::PerSample => 1.0,
        };
        softmax_cross_entropy(
            ctx, enc, &hs, &w.logits, &w.labels, scale, &w.losses, &w.dlogits,
        )?;
        // Head: dW = dlogitsᵀ·pooled, db = dlogitsᵀ·ones.
        gemm(
            ctx,
            enc,
            &Gemm::new(nl, h, s.batch)
                .trans_a()
                .offsets(0, 0, self.head_weight_offset),
            &w.dlogits,
            &w.pooled,
            None,
            &self.grads,
        )?;
        gemm(
            ctx,
            enc,
            &Gemm::new(nl, 1, s.batch)
                .trans_a()
                .offsets(0, 0, self.head_bias_offset),
            &w.dlogits,
            &w.ones,
            None,
            &self.grads,
        )?;
        if let Some(ps) = ps {
            head_grad_per_sample(
                ctx,
                enc,
                &hs,
                &w.pooled,
                &w.dlogits,
                &ps.head_weight,
                &ps.head_bias,
            )?;
        }
        gemm(
            ctx,
            enc,
            &Gemm::new(s.batch, h, nl).offsets(0, self.head_weight_offset, 0),
            &w.dlogits,
            &self.params,
            None,
            &w.dpooled,
        )?;
        mean_pool_backward(ctx, enc, &hs, &w.mask, &w.dpooled, &w.dh)?;

        let ln_shape = LayerNormShape {
            rows,
            h,
            eps: c.layer_norm_eps as f32,
        };
        let attn = AttentionShape {
            batch: s.batch,
            seq: s.seq,
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
        };
        let bytes_h = (rows * h * 4) as u64;
        for l in (0..self.layers.len()).rev() {
            let lg = &self.layers[l];
            let a = &w.layers[l];
            let x = if l == 0 {
                &w.emb_out
            } else {
                &w.layers[l - 1].h2
            };
            let back = |enc: &mut wgpu::CommandEncoder,
                        which: AdaptedLinear,
                        input: &GpuBuffer,
                        dy: &GpuBuffer,
                        dx: Option<(&GpuBuffer, bool)>,
                        gelu_slope: Option<&GpuBuffer>| {
                let i = which.index();
                self.linear_backward(
                    enc,
                    w,
                    s,
                    &lg.linears[i],
                    lg.adapters[i].as_ref(),
                    a.xa[i].as_ref(),
                    ps.and_then(|p| p.r[l][i].as_ref()),
                    self.weight_grads.as_ref().map(|g| &g[l][i]),
                    input,
                    dy,
                    dx,
                    gelu_slope,
                )
            };
            // h2 = LN2(out + h1)
            layernorm_backward(
                ctx,
                enc,
                RowLayout::for_device(ctx),
                &ln_shape,
                &a.out,
                Some(&a.h1),
                &lg.ln2.0,
                &a.stats2,
                &w.dh,
                &w.dsum2,
            )?;
            // d_pre = (dsum2·W) · gelu'(pre), through the GELU's slopes.
            back(
                enc,
                AdaptedLinear::Output,
                &a.inter_act,
                &w.dsum2,
                Some((&w.d_pre, false)),
                Some(&a.inter_slope),
            )?;
            enc.copy_buffer_to_buffer(&w.dsum2.buffer, 0, &w.dh1.buffer, 0, bytes_h);
            back(
                enc,
                AdaptedLinear::Intermediate,
                &a.h1,
                &w.d_pre,
                Some((&w.dh1, true)),
                None,
            )?;
            // h1 = LN1(ao + x)
            layernorm_backward(
                ctx,
                enc,
                RowLayout::for_device(ctx),
                &ln_shape,
                &a.ao,
                Some(x),
                &lg.ln1.0,
                &a.stats1,
                &w.dh1,
                &w.dsum1,
            )?;
            back(
                enc,
                AdaptedLinear::AttentionOutput,
                &a.context,
                &w.dsum1,
                Some((&w.dctx, false)),
                None,
            )?;
            attention_backward(
                ctx, enc, &attn, &a.q, &a.k, &a.v, &a.probs, &w.dctx, &w.dprobs, &w.dq, &w.dk,
                &w.dv,
            )?;
            // The embeddings are frozen: layer 0 needs no input gradient.
            let need_dx = l > 0;
            if need_dx {
                enc.copy_buffer_to_buffer(&w.dsum1.buffer, 0, &w.dh.buffer, 0, bytes_h);
            }
            for (which, d) in [
                (AdaptedLinear::Query, &w.dq),
                (AdaptedLinear::Key, &w.dk),
                (AdaptedLinear::Value, &w.dv),
            ] {
                back(enc, which, x, d, need_dx.then_some((&w.dh, true)), None)?;
            }
        }
        Ok(())
    }

    /// Mean-pooled last hidden states (`batch × hidden`, attention-masked mean,
    /// not normalized).
    pub async fn embed(&mut self, batch: &EncodedBatch) -> Result<Vec<f32>, GpuError> {
        self.upload(batch, None)?;
        self.submit_forward()?;
        let w = self.workspace.as_ref().expect("uploaded");
        let mut v = self.ctx.read_f32(&w.pooled).await?;
        v.truncate(batch.batch_size * self.config.hidden_size);
        Ok(v)
    }

    /// Logits of the head (`batch × labels`).
    pub async fn logits(&mut self, batch: &EncodedBatch) -> Result<Vec<f32>, GpuError> {
        if self.num_labels == 0 {
            return Err(GpuError::Shape("no classification head".into()));
        }
        self.upload(batch, None)?;
        self.submit_forward()?;
        let w = self.workspace.as_ref().expect("uploaded");
        let mut v = self.ctx.read_f32(&w.logits).await?;
        v.truncate(batch.batch_size * self.num_labels);
        Ok(v)
    }

    /// Logits and per-sample losses of a labelled batch (evaluation).
    ///
    /// # Errors
    /// [`GpuError::BufferLimit`] when the batch is larger than one pass may
    /// hold: beyond the device's buffer limit, or beyond the cap of
    /// [`Self::set_max_pass_sequences`] ([`crate::train::evaluate`] splits
    /// such batches).
    pub async fn evaluate(
        &mut self,
        batch: &EncodedBatch,
        labels: &[u32],
    ) -> Result<(Vec<f32>, Vec<f32>), GpuError> {
        if let Some(cap) = self.max_pass_sequences {
            if batch.batch_size > cap {
                return Err(GpuError::BufferLimit(format!(
                    "a batch of {} sequences is above the {cap} sequences per pass \
                     set with set_max_pass_sequences",
                    batch.batch_size
                )));
            }
        }
        self.upload(batch, Some(labels))?;
        let s = self.shape()?;
        let mut enc = self.ctx.encoder();
        self.record_forward(&mut enc)?;
        let w = self.workspace.as_ref().expect("uploaded");
        softmax_cross_entropy(
            self.ctx,
            &mut enc,
            &self.head_shape(s),
            &w.logits,
            &w.labels,
            1.0,
            &w.losses,
            &w.dlogits,
        )?;
        self.ctx.submit(enc);
        self.forward_submitted();
        let w = self.workspace.as_ref().expect("uploaded");
        let mut logits = self.ctx.read_f32(&w.logits).await?;
        logits.truncate(s.batch * self.num_labels);
        let mut losses = self.ctx.read_f32(&w.losses).await?;
        losses.truncate(s.batch);
        Ok((logits, losses))
    }

    /// Forward and backward of a labelled batch; returns the per-sample losses.
    /// Gradients stay on the device: [`Self::read_gradients`],
    /// [`Self::read_per_sample_gradients`].
    pub async fn loss_and_gradients(
        &mut self,
        batch: &EncodedBatch,
        labels: &[u32],
        mode: GradientMode,
    ) -> Result<Vec<f32>, GpuError> {
        self.upload(batch, Some(labels))?;
        if mode == GradientMode::PerSample {
            self.ensure_per_sample(batch.batch_size)?;
        }
        let mut enc = self.ctx.encoder();
        self.record_forward(&mut enc)?;
        self.record_backward(&mut enc, mode)?;
        self.ctx.submit(enc);
        self.forward_submitted();
        self.read_losses().await
    }

    async fn read_losses(&self) -> Result<Vec<f32>, GpuError> {
        let s = self.shape()?;
        let w = self.workspace.as_ref().expect("uploaded");
        let mut v = self.ctx.read_f32(&w.losses).await?;
        v.truncate(s.batch);
        Ok(v)
    }

    /// One training step on the mean loss of the batch: forward, backward and
    /// AdamW on every `R` and the head, in one submission. Returns the mean loss.
    pub async fn train_step(
        &mut self,
        batch: &EncodedBatch,
        labels: &[u32],
        opt: &AdamW,
    ) -> Result<f32, GpuError> {
        self.upload(batch, Some(labels))?;
        let mut enc = self.ctx.encoder();
        self.record_forward(&mut enc)?;
        self.record_backward(&mut enc, GradientMode::BatchMean)?;
        self.adam_steps += 1;
        adamw_step(
            self.ctx,
            &mut enc,
            opt,
            self.adam_steps,
            self.params.len,
            self.head_weight_offset,
            &self.grads,
            &self.params,
            &self.adam_m,
            &self.adam_v,
        )?;
        self.ctx.submit(enc);
        // The pass merged the R it started from; the step then changed R.
        self.forward_submitted();
        self.params_version += 1;
        let losses = self.read_losses().await?;
        Ok(losses.iter().sum::<f32>() / losses.len() as f32)
    }

    /// The DP-SGD gradient of one Poisson-sampled batch, left in the gradient
    /// buffer (read it with [`Self::read_gradients`]; step with
    /// [`Self::apply_adamw`]): per-sample gradients of every `R` and the head,
    /// each sample's joint L2 norm over all of them, clipped to `clip`, summed,
    /// plus `noise` (one value per trained parameter, in the layout of
    /// [`Self::read_trainable`], already scaled by σ·C), all times `scale`
    /// (1 / expected batch size). Everything stays on the device; `None` (an
    /// empty batch) gives `noise · scale`. Returns the per-sample losses in
    /// batch order.
    ///
    /// A batch larger than one pass can hold ([`Self::max_pass_sequences`] for
    /// its padded length, capped by [`Self::set_max_pass_sequences`]) is split
    /// into chunks of consecutive sequences of about equal size, each at the
    /// batch's padded length: forward, backward, norms and clipped sum per
    /// chunk into a separate sum buffer (each backward overwrites the gradient
    /// buffer), the first chunk writing it with the noise, the others adding
    /// to it with zero noise; the sum is then copied into the gradient buffer.
    /// Clipping is per sample, so the result is that of one pass up to the
    /// order of the float sums.
    ///
    /// # Errors
    /// [`GpuError::BufferLimit`] when not even one sequence of the batch's
    /// padded length fits the device's buffer limit.
    pub async fn dp_gradients(
        &mut self,
        batch: Option<(&EncodedBatch, &[u32])>,
        noise: &[f32],
        clip: f32,
        scale: f32,
    ) -> Result<Vec<f32>, GpuError> {
        if noise.len() != self.params.len {
            return Err(GpuError::Shape(format!(
                "dp: {} noise values for {} trained parameters",
                noise.len(),
                self.params.len
            )));
        }
        let ctx = self.ctx;
        let noise_buf = ctx.buffer_f32("dp.noise", noise);
        let Some((batch, labels)) = batch.filter(|(b, _)| b.batch_size > 0) else {
            let mut enc = ctx.encoder();
            dp_clip_sum(
                ctx,
                &mut enc,
                &ctx.dummy,
                0,
                self.params.len,
                &ctx.dummy,
                clip,
                &noise_buf,
                scale,
                &self.grads,
                0,
                SumInto::Overwrite,
            )?;
            ctx.submit(enc);
            return Ok(Vec::new());
        };
        let n = batch.batch_size;
        if labels.len() != n {
            return Err(GpuError::Shape(format!(
                "{} labels for a batch of {n}",
                labels.len()
            )));
        }
        let per_pass = self.pass_sequences(batch.seq_len, true);
        if per_pass == 0 {
            // Not even one sequence fits: the error names the buffer and the limit.
            self.check_pass(n, batch.seq_len, true)?;
            return Err(GpuError::Shape(format!(
                "dp: {} heads or {} classes exceed the 65535 workgroups of a dispatch",
                self.config.num_attention_heads, self.num_labels
            )));
        }
        if per_pass >= n {
            self.dp_pass(batch, labels, &noise_buf, clip, scale, None)?;
            return self.read_losses().await;
        }
        // Chunks of about equal size, at most `per_pass` sequences each.
        let chunks = n.div_ceil(per_pass);
        let size = n.div_ceil(chunks);
        tracing::debug!(
            batch = n,
            seq = batch.seq_len,
            per_pass,
            chunks,
            size,
            "DP-SGD batch split into passes"
        );
        let zeros = ctx.buffer_zeros("dp.noise.zero", self.params.len);
        let all_losses = ctx.buffer_zeros("dp.losses", n);
        // Every backward pass overwrites the gradient buffer with its batch
        // gradient, so the clipped sum is built in a buffer of its own.
        let sum = ctx.buffer_zeros("dp.clipped_sum", self.params.len);
        for (k, start) in (0..n).step_by(size).enumerate() {
            let end = (start + size).min(n);
            let chunk = batch.slice(start..end);
            let (noise, into) = if k == 0 {
                (&noise_buf, SumInto::Overwrite)
            } else {
                (&zeros, SumInto::Accumulate)
            };
            self.dp_pass(
                &chunk,
                &labels[start..end],
                noise,
                clip,
                scale,
                Some((&sum, into)),
            )?;
            // Keep the chunk's losses on the device; read them all at the end.
            let w = self.workspace.as_ref().expect("uploaded");
            let mut enc = ctx.encoder();
            enc.copy_buffer_to_buffer(
                &w.losses.buffer,
                0,
                &all_losses.buffer,
                (start * 4) as u64,
                ((end - start) * 4) as u64,
            );
            ctx.submit(enc);
        }
        let mut enc = ctx.encoder();
        enc.copy_buffer_to_buffer(
            &sum.buffer,
            0,
            &self.grads.buffer,
            0,
            (self.params.len * 4) as u64,
        );
        ctx.submit(enc);
        ctx.read_f32(&all_losses).await
    }

    /// One DP-SGD pass of [`Self::dp_gradients`] over a batch that fits:
    /// upload, forward, per-sample backward, joint norms and the clipped,
    /// noised, scaled sum written into the gradient buffer, or with
    /// `Some((out, into))` into `out` (added to it with
    /// [`SumInto::Accumulate`]). Submitted, not waited for.
    fn dp_pass(
        &mut self,
        batch: &EncodedBatch,
        labels: &[u32],
        noise: &GpuBuffer,
        clip: f32,
        scale: f32,
        out: Option<(&GpuBuffer, SumInto)>,
    ) -> Result<(), GpuError> {
        let ctx = self.ctx;
        self.upload(batch, Some(labels))?;
        self.ensure_per_sample(batch.batch_size)?;
        let s = self.shape()?;
        let mut enc = ctx.encoder();
        self.record_forward(&mut enc)?;
        self.record_backward(&mut enc, GradientMode::PerSample)?;
        let ps = self.per_sample.as_ref().expect("allocated");
        let rr = self.rank * self.rank;
        let mut segments: Vec<(&GpuBuffer, usize, usize)> = Vec::new();
        for (lg, pl) in self.layers.iter().zip(&ps.r) {
            for (ad, buf) in lg.adapters.iter().zip(pl) {
                if let (Some(ad), Some(buf)) = (ad, buf) {
                    segments.push((buf, rr, ad.offset));
                }
            }
        }
        let nl = self.num_labels;
        segments.push((
            &ps.head_weight,
            nl * self.config.hidden_size,
            self.head_weight_offset,
        ));
        segments.push((&ps.head_bias, nl, self.head_bias_offset));
        let norms = ctx.buffer_zeros("dp.norms", s.batch);
        for &(buf, len, _) in &segments {
            dp_sq_norms(ctx, &mut enc, buf, s.batch, len, &norms)?;
        }
        let (out, into) = out.unwrap_or((&self.grads, SumInto::Overwrite));
        for &(buf, len, offset) in &segments {
            dp_clip_sum(
                ctx, &mut enc, buf, s.batch, len, &norms, clip, noise, scale, out, offset, into,
            )?;
        }
        ctx.submit(enc);
        self.forward_submitted();
        Ok(())
    }

    /// Applies one AdamW step with the gradient currently in the gradient
    /// buffer (e.g. after [`Self::loss_and_gradients`]).
    pub fn apply_adamw(&mut self, opt: &AdamW) -> Result<(), GpuError> {
        let mut enc = self.ctx.encoder();
        self.adam_steps += 1;
        adamw_step(
            self.ctx,
            &mut enc,
            opt,
            self.adam_steps,
            self.params.len,
            self.head_weight_offset,
            &self.grads,
            &self.params,
            &self.adam_m,
            &self.adam_v,
        )?;
        self.ctx.submit(enc);
        self.params_version += 1;
        Ok(())
    }

    /// Replaces every `R` and the head (e.g. with the global ones of a new
    /// round) and resets the optimizer state.
    pub fn set_trainable(
        &mut self,
        adapters: &LoraSbAdapters<f32>,
        head: &ClassifierHead<f32>,
    ) -> Result<(), GpuError> {
        let mut flat = Vec::with_capacity(self.params.len);
        for (l, layer) in self.layers.iter().enumerate() {
            for which in AdaptedLinear::ALL {
                if layer.adapters[which.index()].is_some() {
                    let m = adapters.module(l, which).ok_or_else(|| {
                        GpuError::Shape(format!("adapter {l}.{} missing", which.checkpoint_name()))
                    })?;
                    flat.extend_from_slice(&m.r.data);
                }
            }
        }
        flat.extend_from_slice(&head.weight.data);
        flat.extend_from_slice(&head.bias);
        if flat.len() != self.params.len {
            return Err(GpuError::Shape(format!(
                "{} trainable values for {} parameters",
                flat.len(),
                self.params.len
            )));
        }
        self.ctx.write_f32(&self.params, &flat)?;
        self.params_version += 1;
        let zeros = vec![0.0; self.params.len];
        self.ctx.write_f32(&self.adam_m, &zeros)?;
        self.ctx.write_f32(&self.adam_v, &zeros)?;
        self.adam_steps = 0;
        Ok(())
    }

    /// The AdamW state (both moments and the step count) of the current
    /// trainable parameters, e.g. to carry it into a participant's next round
    /// ([`Self::set_trainable`] resets it).
    pub async fn read_optimizer_state(&self) -> Result<AdamState, GpuError> {
        Ok(AdamState {
            m: self.ctx.read_f32(&self.adam_m).await?,
            v: self.ctx.read_f32(&self.adam_v).await?,
            steps: self.adam_steps,
        })
    }

    /// Replaces the AdamW state (after [`Self::set_trainable`], which resets
    /// it): the next step continues from these moments and step count.
    pub fn set_optimizer_state(&mut self, state: &AdamState) -> Result<(), GpuError> {
        for (name, moments) in [("first", &state.m), ("second", &state.v)] {
            if moments.len() != self.params.len {
                return Err(GpuError::Shape(format!(
                    "AdamW state: {} {name} moments for {} parameters",
                    moments.len(),
                    self.params.len
                )));
            }
        }
        if let Some(i) = state.v.iter().position(|v| !(*v >= 0.0 && v.is_finite())) {
            return Err(GpuError::Shape(format!(
                "AdamW state: second moment {i} is {}, not a finite value ≥ 0",
                state.v[i]
            )));
        }
        if let Some(i) = state.m.iter().position(|m| !m.is_finite()) {
            return Err(GpuError::Shape(format!(
                "AdamW state: first moment {i} is {}, not finite",
                state.m[i]
            )));
        }
        self.ctx.write_f32(&self.adam_m, &state.m)?;
        self.ctx.write_f32(&self.adam_v, &state.v)?;
        self.adam_steps = state.steps;
        Ok(())
    }

    /// Splits a flat trainable vector into `R`s and head.
    fn unflatten(&self, flat: &[f32]) -> TrainableGradients<f32> {
        let r = self.rank;
        let rr = r * r;
        let h = self.config.hidden_size;
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.adapters.each_ref().map(|a| {
                    a.as_ref()
                        .map(|a| Matrix::from_vec(r, r, flat[a.offset..a.offset + rr].to_vec()))
                })
            })
            .collect();
        let hw = self.head_weight_offset;
        let hb = self.head_bias_offset;
        TrainableGradients {
            r: layers,
            head_weight: Matrix::from_vec(self.num_labels, h, flat[hw..hb].to_vec()),
            head_bias: flat[hb..hb + self.num_labels].to_vec(),
        }
    }

    /// Reads every `R` and the head back (end of a round). The structure is
    /// that of the gradients: `r[layer][linear]` and the head.
    pub async fn read_trainable(&self) -> Result<TrainableGradients<f32>, GpuError> {
        let flat = self.ctx.read_f32(&self.params).await?;
        Ok(self.unflatten(&flat))
    }

    /// The current `R`s and head as adapters (with the frozen `A`, `B` given
    /// by `frozen`) and a head.
    pub async fn read_adapters(
        &self,
        frozen: &LoraSbAdapters<f32>,
    ) -> Result<(LoraSbAdapters<f32>, ClassifierHead<f32>), GpuError> {
        let t = self.read_trainable().await?;
        let mut adapters = frozen.clone();
        for (l, layer) in t.r.iter().enumerate() {
            for (i, r) in layer.iter().enumerate() {
                if let (Some(r), Some(m)) = (r, adapters.layers[l][i].as_mut()) {
                    m.r = r.clone();
                }
            }
        }
        Ok((
            adapters,
            ClassifierHead {
                weight: t.head_weight,
                bias: t.head_bias,
            },
        ))
    }

    /// The gradient of the last [`Self::loss_and_gradients`]: of the mean loss
    /// ([`GradientMode::BatchMean`]) or the sum of per-sample gradients
    /// ([`GradientMode::PerSample`]).
    pub async fn read_gradients(&self) -> Result<TrainableGradients<f32>, GpuError> {
        let flat = self.ctx.read_f32(&self.grads).await?;
        Ok(self.unflatten(&flat))
    }

    /// Per-sample gradients of the last [`GradientMode::PerSample`] pass.
    pub async fn read_per_sample_gradients(
        &self,
    ) -> Result<Vec<TrainableGradients<f32>>, GpuError> {
        let s = self.shape()?;
        let ps = self
            .per_sample
            .as_ref()
            .ok_or_else(|| GpuError::Shape("no per-sample pass yet".into()))?;
        let (r, h, nl) = (self.rank, self.config.hidden_size, self.num_labels);
        let rr = r * r;
        let mut r_all: Vec<[Option<Vec<f32>>; 6]> = Vec::new();
        for layer in &ps.r {
            let mut out: [Option<Vec<f32>>; 6] = Default::default();
            for (i, b) in layer.iter().enumerate() {
                if let Some(b) = b {
                    out[i] = Some(self.ctx.read_f32(b).await?);
                }
            }
            r_all.push(out);
        }
        let hw = self.ctx.read_f32(&ps.head_weight).await?;
        let hb = self.ctx.read_f32(&ps.head_bias).await?;
        Ok((0..s.batch)
            .map(|n| TrainableGradients {
                r: r_all
                    .iter()
                    .map(|l| {
                        l.each_ref().map(|g| {
                            g.as_ref()
                                .map(|g| Matrix::from_vec(r, r, g[n * rr..(n + 1) * rr].to_vec()))
                        })
                    })
                    .collect(),
                head_weight: Matrix::from_vec(nl, h, hw[n * nl * h..(n + 1) * nl * h].to_vec()),
                head_bias: hb[n * nl..(n + 1) * nl].to_vec(),
            })
            .collect())
    }

    /// Starts accumulating `Σ ∂L_batch/∂W0` of every linear (LoRA-SB
    /// initialization) from zero; every later backward pass adds to it.
    pub fn start_weight_gradients(&mut self) {
        let ctx = self.ctx;
        self.weight_grads = Some(
            self.layers
                .iter()
                .map(|l| {
                    l.linears
                        .each_ref()
                        .map(|lin| ctx.buffer_zeros("grad_w0", lin.out_features * lin.in_features))
                })
                .collect(),
        );
    }

    /// Reads the accumulated weight gradients: per layer, per
    /// [`AdaptedLinear`], `out × in`.
    pub async fn read_weight_gradients(&self) -> Result<Vec<[Matrix<f32>; 6]>, GpuError> {
        let grads = self
            .weight_grads
            .as_ref()
            .ok_or_else(|| GpuError::Shape("weight gradients were not started".into()))?;
        let mut out = Vec::with_capacity(grads.len());
        for (layer, lg) in grads.iter().zip(&self.layers) {
            let mut mats = Vec::with_capacity(6);
            for (b, lin) in layer.iter().zip(&lg.linears) {
                let data = self.ctx.read_f32(b).await?;
                mats.push(Matrix::from_vec(lin.out_features, lin.in_features, data));
            }
            let arr: [Matrix<f32>; 6] = mats.try_into().expect("six linears");
            out.push(arr);
        }
        Ok(out)
    }
}
