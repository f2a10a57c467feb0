//! Centralized LoRA-SB training on the GPU: LoRA-SB initialization from the
//! gradients of the base model, a shuffled batch sampler, training steps and
//! evaluation, on top of [`GpuEncoder`].
//!
//! Everything here is `async` and never blocks, so the same code runs in a
//! browser tab; natively, wrap calls in `pollster::block_on` (as `fedsb train`
//! does).

use crate::data::Example;
use crate::gpu::encoder::{GpuEncoder, GradientMode};
use crate::gpu::{GpuContext, GpuError};
use crate::model::SplitMix64;
use crate::model::{
    AdaptedLinear, BertConfig, BertTokenizer, BertWeights, EncodedBatch, ModelLoadError,
};
use crate::reference::{
    adapter_from_update, ClassifierHead, LoraSbAdapters, LoraSbInitOptions, Matrix,
};

/// A tokenized batch and its labels.
pub type LabelledBatch = (EncodedBatch, Vec<u32>);

/// Why training could not proceed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Tokenizer(#[from] ModelLoadError),
    #[error("{0}")]
    Invalid(String),
}

/// LoRA-SB initialization on the GPU (the authors' update approximation):
/// `G = Σ_batches ∂L_batch/∂W0` for every adapted linear with the mean
/// cross-entropy of each batch, computed by the GPU backward pass of the plain
/// encoder with `head` ([`gpu_init_gradients`]); then, on the CPU,
/// `ΔW = −η·sign(G)` and the truncated SVD of [`adapter_from_update`]
/// (`A = Uᵀ`, `B = V`, `R₀ = diag(S)` of `ΔWᵀ`) ([`lora_sb_from_gradients`]).
pub async fn gpu_lora_sb_init(
    ctx: &GpuContext,
    weights: &BertWeights<f32>,
    head: &ClassifierHead<f32>,
    batches: &[(EncodedBatch, Vec<u32>)],
    options: &LoraSbInitOptions,
) -> Result<LoraSbAdapters<f32>, TrainError> {
    check_init_options(&weights.config, options)?;
    let grads = gpu_init_gradients(ctx, weights, head, batches).await?;
    lora_sb_from_gradients(&weights.config, &grads, options)
}

/// Centres the initial classification head: shifts `head`'s bias so that,
/// under the initial model (`weights` with `adapters` and `head`), the mean
/// logit over the samples of `batches` is the same for every class, and
/// returns the per-class means it had before ([`logit_sums`], then
/// [`centre_bias`]).
///
/// Why: the LoRA-SB initialization moves every weight by −η·sign(G) of a
/// gradient taken through a random head, and on SST-2 with
/// all-MiniLM-L6-v2 that moves every sentence's logits the same way: mean
/// logits of −0.7 and +0.7 (up to −1.4 and +1.4, by seed) after it, against
/// ±0.07 for the base model, so the initial model predicts one class for
/// nearly everything and the first rounds of a federation spend themselves
/// flipping it (BENCHMARKS.md). Subtracting each class's mean (plus their
/// average, so the logits' sum is unchanged) leaves every difference between
/// samples as it was.
pub async fn centre_head_bias(
    ctx: &GpuContext,
    weights: &BertWeights<f32>,
    adapters: &LoraSbAdapters<f32>,
    head: &mut ClassifierHead<f32>,
    batches: &[(EncodedBatch, Vec<u32>)],
) -> Result<Vec<f64>, TrainError> {
    let mut encoder = GpuEncoder::new(ctx, weights, Some(adapters), Some(head))?;
    let (sums, samples) = logit_sums(&mut encoder, batches).await?;
    centre_bias(&mut head.bias, &sums, samples)
}

/// The per-class sums of the logits of every sample of `batches` under the
/// encoder's current adapters and head, in f64, and the number of samples.
/// A federated participant sends these for its initialization samples, and
/// the sums of several participants add up to those of their pooled samples.
pub async fn logit_sums(
    encoder: &mut GpuEncoder<'_>,
    batches: &[(EncodedBatch, Vec<u32>)],
) -> Result<(Vec<f64>, u64), TrainError> {
    let classes = encoder.num_labels();
    let mut sums = vec![0f64; classes];
    let mut samples = 0u64;
    for (batch, _) in batches {
        let logits = encoder.logits(batch).await?;
        for row in logits.chunks(classes).take(batch.batch_size) {
            for (s, &z) in sums.iter_mut().zip(row) {
                *s += f64::from(z);
            }
            samples += 1;
        }
    }
    Ok((sums, samples))
}

/// Shifts `bias` by the per-class mean logits `sums / samples` (less their
/// average, so the bias's sum stays as it was): afterwards every class has
/// the same mean logit over those samples. Returns the means. Errors when
/// there are no samples, the sums do not match the classes, or a sum is
/// not finite; `bias` is then unchanged.
pub fn centre_bias(bias: &mut [f32], sums: &[f64], samples: u64) -> Result<Vec<f64>, TrainError> {
    if samples == 0 {
        return Err(TrainError::Invalid(
            "centring the head needs at least one sample".into(),
        ));
    }
    if sums.len() != bias.len() {
        return Err(TrainError::Invalid(format!(
            "{} logit sums for a head of {} classes",
            sums.len(),
            bias.len()
        )));
    }
    if let Some(s) = sums.iter().find(|s| !s.is_finite()) {
        return Err(TrainError::Invalid(format!(
            "a logit sum is not finite ({s})"
        )));
    }
    let means: Vec<f64> = sums.iter().map(|s| s / samples as f64).collect();
    let average = means.iter().sum::<f64>() / means.len() as f64;
    for (b, m) in bias.iter_mut().zip(&means) {
        *b -= (m - average) as f32;
    }
    Ok(means)
}

/// The initialization's batches: the first `init_samples` examples (all
/// when there are fewer) in the order of a [`BatchSampler`] over `examples`
/// seeded by `seed ^ 0x1417`, in batches of `batch_size`, as `fedsb init`,
/// `fedsb sim` and every federated participant draw them. Returns the
/// encoded batches and the number of examples in them.
pub fn init_batches(
    tokenizer: &BertTokenizer,
    examples: &[Example],
    batch_size: usize,
    seed: u64,
    init_samples: usize,
) -> Result<(Vec<LabelledBatch>, usize), TrainError> {
    if batch_size == 0 {
        return Err(TrainError::Invalid(
            "the initialization's batch size must be positive".into(),
        ));
    }
    let wanted = init_samples.min(examples.len());
    let mut batches = Vec::new();
    if wanted == 0 {
        return Ok((batches, 0));
    }
    let mut sampler = BatchSampler::new(examples.len(), batch_size, seed ^ 0x1417);
    let mut taken = 0;
    while taken < wanted {
        let idx = sampler.next_batch();
        let idx = &idx[..idx.len().min(wanted - taken)];
        taken += idx.len();
        let refs: Vec<&Example> = idx.iter().map(|&i| &examples[i]).collect();
        batches.push(encode_examples(tokenizer, &refs)?);
    }
    Ok((batches, taken))
}

/// The first half of the LoRA-SB initialization, which a federated
/// participant runs on its own data: `G = Σ_batches ∂L_batch/∂W0` of all six
/// linears of every layer (`[layer][AdaptedLinear::index()]`, each
/// `out × in`), with the mean cross-entropy of each batch and `head`.
/// Gradients of several participants add up to the gradient of their pooled
/// batches.
pub async fn gpu_init_gradients(
    ctx: &GpuContext,
    weights: &BertWeights<f32>,
    head: &ClassifierHead<f32>,
    batches: &[(EncodedBatch, Vec<u32>)],
) -> Result<Vec<[Matrix<f32>; 6]>, TrainError> {
    if batches.is_empty() {
        return Err(TrainError::Invalid(
            "LoRA-SB initialization needs at least one batch".into(),
        ));
    }
    let mut encoder = GpuEncoder::new(ctx, weights, None, Some(head))?;
    encoder.start_weight_gradients();
    for (batch, labels) in batches {
        encoder
            .loss_and_gradients(batch, labels, GradientMode::BatchMean)
            .await?;
    }
    Ok(encoder.read_weight_gradients().await?)
}

/// Checks `options.rank` against every adapted module's shape (the rank must
/// be in `1..=min(out, in)`), so that a caller can refuse it before the
/// gradients are computed.
pub fn check_init_options(
    config: &BertConfig,
    options: &LoraSbInitOptions,
) -> Result<(), TrainError> {
    for which in &options.modules {
        let (out, inp) = which.shape(config);
        if options.rank == 0 || options.rank > out.min(inp) {
            return Err(TrainError::Invalid(format!(
                "rank {} must be in 1..={} for {}",
                options.rank,
                out.min(inp),
                which.checkpoint_name()
            )));
        }
    }
    Ok(())
}

/// The second half of the LoRA-SB initialization (CPU), shared by
/// `fedsb init` and the aggregator's federated initialization: for every
/// adapted module of `options.modules`, `ΔW = −η·sign(G)` and the truncated
/// SVD of `ΔWᵀ` to rank r. `grads` is indexed `[layer][AdaptedLinear::index()]`
/// as [`gpu_init_gradients`] returns it; only the adapted modules are read.
pub fn lora_sb_from_gradients<G>(
    config: &BertConfig,
    grads: &[G],
    options: &LoraSbInitOptions,
) -> Result<LoraSbAdapters<f32>, TrainError>
where
    G: std::ops::Index<usize, Output = Matrix<f32>>,
{
    check_init_options(config, options)?;
    if grads.len() != config.num_hidden_layers {
        return Err(TrainError::Invalid(format!(
            "gradients of {} layers for a model of {}",
            grads.len(),
            config.num_hidden_layers
        )));
    }
    let eta = options.learning_rate as f32;
    // Check every shape before any SVD runs.
    let mut jobs = Vec::new();
    for (l, layer) in grads.iter().enumerate() {
        for which in AdaptedLinear::ALL {
            if !options.modules.contains(&which) {
                continue;
            }
            let g: &Matrix<f32> = &layer[which.index()];
            let (out, inp) = which.shape(config);
            if (g.rows, g.cols) != (out, inp) {
                return Err(TrainError::Invalid(format!(
                    "gradient of {} is {}×{}, expected {out}×{inp}",
                    which.checkpoint_name(),
                    g.rows,
                    g.cols
                )));
            }
            jobs.push((l, which, g));
        }
    }
    // The modules' SVDs are independent: natively they run on all cores.
    let adapters = map_in_parallel(&jobs, |&(_, _, g)| {
        let delta_w = g.map(|x| {
            if x > 0.0 {
                -eta
            } else if x < 0.0 {
                eta
            } else {
                0.0
            }
        });
        adapter_from_update(&delta_w, options.rank)
    });
    let mut layers: Vec<[Option<_>; 6]> = (0..grads.len()).map(|_| Default::default()).collect();
    for (&(l, which, _), adapter) in jobs.iter().zip(adapters) {
        layers[l][which.index()] = Some(adapter);
    }
    Ok(LoraSbAdapters { layers })
}

/// `items.iter().map(f).collect()`, with the items shared among scoped
/// threads, one per core, natively; in order, on the calling thread, in the
/// browser (no threads there).
fn map_in_parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    #[cfg(not(target_arch = "wasm32"))]
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    #[cfg(target_arch = "wasm32")]
    let threads = 1;
    map_on_threads(threads, items, f)
}

/// [`map_in_parallel`] on at most `threads` threads (one: the calling thread).
fn map_on_threads<T: Sync, R: Send>(
    threads: usize,
    items: &[T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let threads = threads.min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut results: Vec<(usize, R)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        done.push((i, f(item)));
                    }
                    done
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    results.sort_by_key(|&(i, _)| i);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Tokenizes examples (single sentences or pairs) into one padded batch and
/// their labels (examples without a label get an error).
pub fn encode_examples(
    tokenizer: &BertTokenizer,
    examples: &[&Example],
) -> Result<(EncodedBatch, Vec<u32>), TrainError> {
    let inputs: Vec<(&str, Option<&str>)> = examples
        .iter()
        .map(|e| (e.text.as_str(), e.text_pair.as_deref()))
        .collect();
    let batch = tokenizer.encode_mixed_batch(&inputs)?;
    let labels = examples
        .iter()
        .map(|e| {
            e.label.ok_or_else(|| {
                TrainError::Invalid(format!("example without a label: {:?}", e.text))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((batch, labels))
}

/// Draws batches from a dataset: a seeded shuffle per epoch, every example
/// once per epoch, as `torch.utils.data.DataLoader(shuffle=True)`.
#[derive(Debug, Clone)]
pub struct BatchSampler {
    len: usize,
    batch: usize,
    order: Vec<usize>,
    next: usize,
    rng: SplitMix64,
    /// Completed epochs.
    pub epochs: usize,
}

impl BatchSampler {
    /// A sampler over `len` examples in batches of `batch`.
    pub fn new(len: usize, batch: usize, seed: u64) -> Self {
        let mut s = Self {
            len,
            batch: batch.max(1),
            order: (0..len).collect(),
            next: 0,
            rng: SplitMix64(seed),
            epochs: 0,
        };
        s.shuffle();
        s
    }

    fn shuffle(&mut self) {
        for i in (1..self.order.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            self.order.swap(i, j);
        }
        self.next = 0;
    }

    /// Indices of the next batch (a short last batch ends an epoch).
    pub fn next_batch(&mut self) -> Vec<usize> {
        if self.len == 0 {
            return Vec::new();
        }
        if self.next >= self.len {
            self.epochs += 1;
            self.shuffle();
        }
        let end = (self.next + self.batch).min(self.len);
        let out = self.order[self.next..end].to_vec();
        self.next = end;
        out
    }
}

/// Accuracy and mean cross-entropy on a labelled set.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub samples: usize,
    /// The confusion matrix: `confusion[label][predicted]` counts the
    /// examples of class `label` whose largest logit is class `predicted`
    /// (`num_labels × num_labels`; the diagonal sums to the correct ones).
    /// It shows what the accuracy alone hides, such as a head that has
    /// swung towards one class.
    pub confusion: Vec<Vec<u64>>,
}

/// Evaluates the encoder's head on `examples` in batches of `batch`. A batch
/// whose buffers would exceed the device's limit
/// ([`GpuEncoder::pass_sequences`]) is evaluated in smaller batches that
/// fit: the forward pass is per sample, so the result is the same.
pub async fn evaluate(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    examples: &[Example],
    batch: usize,
) -> Result<Evaluation, TrainError> {
    let never = std::sync::atomic::AtomicBool::new(false);
    let evaluation = evaluate_unless(encoder, tokenizer, examples, batch, &never).await?;
    Ok(evaluation.expect("never stopped"))
}

/// [`evaluate`], stopping before the next batch once `stop` is set (a
/// server shutting down): `None` when it stopped before the end.
pub async fn evaluate_unless(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    examples: &[Example],
    batch: usize,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<Evaluation>, TrainError> {
    let nl = encoder.num_labels();
    let (mut correct, mut loss_sum) = (0usize, 0f64);
    let mut confusion = vec![vec![0u64; nl]; nl];
    // A stack, so that a split batch's parts are evaluated in order.
    let mut pending: Vec<&[Example]> = examples.chunks(batch.max(1)).rev().collect();
    while let Some(chunk) = pending.pop() {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(None);
        }
        let refs: Vec<&Example> = chunk.iter().collect();
        let (b, labels) = encode_examples(tokenizer, &refs)?;
        let fit = encoder.pass_sequences(b.seq_len, false);
        if fit > 0 && fit < chunk.len() {
            pending.extend(chunk.chunks(fit).rev());
            continue;
        }
        let (logits, losses) = encoder.evaluate(&b, &labels).await?;
        for (n, &label) in labels.iter().enumerate() {
            let row = &logits[n * nl..(n + 1) * nl];
            let argmax = row
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (j, &z)| {
                    if z > best.1 {
                        (j, z)
                    } else {
                        best
                    }
                })
                .0;
            correct += usize::from(argmax == label as usize);
            if let Some(row) = confusion.get_mut(label as usize) {
                row[argmax] += 1;
            }
        }
        loss_sum += losses.iter().map(|&l| l as f64).sum::<f64>();
    }
    let samples = examples.len();
    Ok(Some(Evaluation {
        accuracy: correct as f64 / samples.max(1) as f64,
        loss: loss_sum / samples.max(1) as f64,
        samples,
        confusion,
    }))
}

#[cfg(test)]
mod tests {
    use super::{centre_bias, map_on_threads};

    /// The bias moves by each class's mean less their average; bad sums
    /// leave it alone.
    #[test]
    fn centre_bias_equalizes_the_means_and_keeps_the_sum() {
        let mut bias = vec![0.25f32, -0.25, 1.0];
        // Means −1, 2 and 2 over 4 samples; their average 1.
        let means = centre_bias(&mut bias, &[-4.0, 8.0, 8.0], 4).unwrap();
        assert_eq!(means, [-1.0, 2.0, 2.0]);
        assert_eq!(bias, [2.25, -1.25, 0.0]);
        for (sums, samples, why) in [
            (vec![1.0, 2.0, 3.0], 0, "at least one sample"),
            (vec![1.0, 2.0], 4, "2 logit sums for a head of 3 classes"),
            (vec![1.0, f64::NAN, 3.0], 4, "not finite"),
        ] {
            let e = centre_bias(&mut bias, &sums, samples).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
            assert_eq!(bias, [2.25, -1.25, 0.0]);
        }
    }

    /// The results come back in the items' order however the threads share
    /// them: the first items take longest, so the threads interleave.
    #[test]
    fn map_on_threads_keeps_the_items_order() {
        let items: Vec<u64> = (0..24).collect();
        for threads in [1, 2, 3, 8, 100] {
            let got = map_on_threads(threads, &items, |&i| {
                std::thread::sleep(std::time::Duration::from_millis(24 - i));
                i * 10
            });
            assert_eq!(
                got,
                items.iter().map(|i| i * 10).collect::<Vec<_>>(),
                "{threads} threads"
            );
        }
        assert!(map_on_threads(4, &[] as &[u64], |&i| i).is_empty());
    }
}
