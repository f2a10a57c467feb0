//! The engine in the browser: [`WasmEngine`] loads a BERT-family encoder from
//! the bytes of its `config.json`, `model.safetensors` and `tokenizer.json`
//! (the page or its Web Worker fetches them, e.g. from the aggregator's
//! `/files/{sha256}`), uploads it to the WebGPU device and computes
//! mean-pooled embeddings with the same WGSL kernels as the native engine.
//!
//! Every method that touches the GPU is `async` (a `Promise` in JS): the
//! browser cannot block on a buffer read-back. Nothing here uses `window`, so
//! the class works in a dedicated Web Worker as well as on a page.
//!
//! ```js
//! import init, { WasmEngine } from "/pkg/fedsb_wasm_client.js";
//! await init();
//! const engine = await WasmEngine.create(configBytes, modelBytes, tokenizerBytes, 128);
//! const flat = await engine.embed(["a fine film"], [null]); // Float32Array, n × engine.hiddenSize
//! ```

use std::cell::RefCell;

use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuError, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights, EncodedBatch, ModelLoadError};
use wasm_bindgen::prelude::*;

/// Most samples per GPU pass: bounds the activations of one pass.
const MAX_BATCH: usize = 32;

/// Why the engine could not be created or could not embed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot load the model: {0}")]
    Model(#[from] ModelLoadError),
    #[error("WebGPU: {0}")]
    Gpu(#[from] GpuError),
    #[error("invalid argument: {0}")]
    Argument(String),
    #[error("the engine is busy with another call; await it first")]
    Busy,
}

impl From<EngineError> for JsValue {
    fn from(e: EngineError) -> Self {
        JsError::new(&e.to_string()).into()
    }
}

/// A BERT-family encoder on the page's (or the worker's) WebGPU device.
///
/// The GPU context is created once per engine and lives as long as the
/// JavaScript realm: the encoder borrows it for `'static`, so it is leaked
/// (a few hundred bytes plus the compiled pipelines) while its device, and
/// with it every GPU buffer, is destroyed when the engine is freed. A worker
/// normally creates one engine.
#[wasm_bindgen]
pub struct WasmEngine {
    ctx: &'static GpuContext,
    /// `None` while a call uses it: a second concurrent call fails with
    /// [`EngineError::Busy`] instead of interleaving GPU passes.
    encoder: RefCell<Option<GpuEncoder<'static>>>,
    tokenizer: BertTokenizer,
    hidden_size: usize,
}

impl std::fmt::Debug for WasmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmEngine")
            .field("adapter", &self.ctx.adapter_name())
            .field("hidden_size", &self.hidden_size)
            .finish_non_exhaustive()
    }
}

#[wasm_bindgen]
impl WasmEngine {
    /// Parses the model files, requests the WebGPU adapter and device and
    /// uploads the weights. `maxLength` (default 128) truncates inputs,
    /// special tokens included.
    pub async fn create(
        config_json: Vec<u8>,
        model_safetensors: Vec<u8>,
        tokenizer_json: Vec<u8>,
        max_length: Option<usize>,
    ) -> Result<WasmEngine, JsValue> {
        Ok(Self::load(
            &config_json,
            &model_safetensors,
            &tokenizer_json,
            max_length,
        )
        .await?)
    }

    /// The WebGPU adapter as wgpu reports it ([`crate::describe_adapter`]; in
    /// headless Chromium on the CPU: an unnamed `Cpu` adapter, SwiftShader).
    #[wasm_bindgen(js_name = adapterName)]
    pub fn adapter_name(&self) -> String {
        crate::describe_adapter(self.ctx.adapter_info())
    }

    /// Size of one embedding.
    #[wasm_bindgen(getter, js_name = hiddenSize)]
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// The tokenizer's truncation length.
    #[wasm_bindgen(getter, js_name = maxLength)]
    pub fn max_length(&self) -> usize {
        self.tokenizer.max_length()
    }

    /// Mean-pooled last hidden states (attention-masked mean, not
    /// normalized) of `texts`, row-major `texts.length × hiddenSize`.
    /// `pairs`, when given, has one entry per text: a second segment
    /// (`[CLS] text [SEP] pair [SEP]`) or `null`.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        pairs: Option<Vec<JsValue>>,
    ) -> Result<Vec<f32>, JsValue> {
        let pairs = match pairs {
            None => vec![None; texts.len()],
            Some(p) => {
                if p.len() != texts.len() {
                    return Err(EngineError::Argument(format!(
                        "{} pairs for {} texts",
                        p.len(),
                        texts.len()
                    ))
                    .into());
                }
                p.iter()
                    .enumerate()
                    .map(|(n, v)| {
                        if v.is_null() || v.is_undefined() {
                            Ok(None)
                        } else {
                            v.as_string().map(Some).ok_or_else(|| {
                                EngineError::Argument(format!(
                                    "pairs[{n}] is neither a string nor null"
                                ))
                            })
                        }
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let inputs: Vec<(&str, Option<&str>)> = texts
            .iter()
            .zip(&pairs)
            .map(|(t, p)| (t.as_str(), p.as_deref()))
            .collect();
        Ok(self.embed_inputs(&inputs).await?)
    }
}

impl WasmEngine {
    async fn load(
        config_json: &[u8],
        model_safetensors: &[u8],
        tokenizer_json: &[u8],
        max_length: Option<usize>,
    ) -> Result<Self, EngineError> {
        let mut tokenizer = BertTokenizer::from_bytes(tokenizer_json)?;
        if let Some(n) = max_length {
            tokenizer = tokenizer.with_max_length(n)?;
        }
        let weights = BertWeights::from_bytes(config_json, model_safetensors)?;
        let ctx: &'static GpuContext =
            Box::leak(Box::new(GpuContext::new(&GpuOptions::default()).await?));
        let encoder = GpuEncoder::new(ctx, &weights, None, None).inspect_err(|_| {
            // No engine will own this device: free what was uploaded.
            ctx.device.destroy();
        })?;
        Ok(Self {
            ctx,
            hidden_size: weights.config.hidden_size,
            encoder: RefCell::new(Some(encoder)),
            tokenizer,
        })
    }

    async fn embed_inputs(&self, inputs: &[(&str, Option<&str>)]) -> Result<Vec<f32>, EngineError> {
        let mut encoder = self.encoder.take().ok_or(EngineError::Busy)?;
        let result = embed_by_length(&mut encoder, &self.tokenizer, inputs).await;
        self.encoder.replace(Some(encoder));
        result
    }
}

/// Mean-pooled embeddings of `inputs` (`inputs.len() × hidden`): tokenizes
/// all inputs at once, then runs them in passes of similar lengths (sorted,
/// at most [`MAX_BATCH`] samples and twice the shortest length each), so one
/// long input does not pad every other one. What [`WasmEngine::embed`] runs;
/// public so that native tests run the same code on lavapipe.
pub async fn embed_by_length(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    inputs: &[(&str, Option<&str>)],
) -> Result<Vec<f32>, EngineError> {
    let h = encoder.config().hidden_size;
    let mut out = vec![0.0f32; inputs.len() * h];
    if inputs.is_empty() {
        return Ok(out);
    }
    let all = tokenizer.encode_mixed_batch(inputs)?;
    for group in length_groups(&all, MAX_BATCH) {
        let pooled = encoder.embed(&gather(&all, &group)).await?;
        for (row, &n) in group.iter().enumerate() {
            out[n * h..(n + 1) * h].copy_from_slice(&pooled[row * h..(row + 1) * h]);
        }
    }
    Ok(out)
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        // Frees every buffer of this engine at once; the leaked context keeps
        // only handles to the destroyed device.
        self.ctx.device.destroy();
    }
}

/// Sample indices sorted by length, cut into groups of at most `max_batch`
/// whose longest sample is at most twice the shortest.
fn length_groups(batch: &EncodedBatch, max_batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..batch.batch_size).collect();
    order.sort_by_key(|&n| batch.length(n));
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for n in order {
        match groups.last_mut() {
            Some(g) if g.len() < max_batch && batch.length(n) <= 2 * batch.length(g[0]) => {
                g.push(n)
            }
            _ => groups.push(vec![n]),
        }
    }
    groups
}

/// The samples `rows` of a right-padded batch as their own batch, padded
/// only to their own longest sample.
fn gather(batch: &EncodedBatch, rows: &[usize]) -> EncodedBatch {
    let seq = rows.iter().map(|&n| batch.length(n)).max().unwrap_or(0);
    let mut out = EncodedBatch {
        input_ids: Vec::with_capacity(rows.len() * seq),
        token_type_ids: Vec::with_capacity(rows.len() * seq),
        attention_mask: Vec::with_capacity(rows.len() * seq),
        batch_size: rows.len(),
        seq_len: seq,
    };
    for &n in rows {
        let cols = n * batch.seq_len..n * batch.seq_len + seq;
        out.input_ids
            .extend_from_slice(&batch.input_ids[cols.clone()]);
        out.token_type_ids
            .extend_from_slice(&batch.token_type_ids[cols.clone()]);
        out.attention_mask
            .extend_from_slice(&batch.attention_mask[cols]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(lengths: &[usize]) -> EncodedBatch {
        let seq = *lengths.iter().max().unwrap();
        let mut b = EncodedBatch {
            batch_size: lengths.len(),
            seq_len: seq,
            ..Default::default()
        };
        for (n, &len) in lengths.iter().enumerate() {
            for k in 0..seq {
                let real = k < len;
                b.input_ids
                    .push(if real { (100 * n + k) as u32 } else { 0 });
                b.token_type_ids.push(u32::from(real && k % 2 == 1));
                b.attention_mask.push(u32::from(real));
            }
        }
        b
    }

    #[test]
    fn groups_cover_every_sample_once_within_twice_the_shortest() {
        let b = batch(&[12, 3, 128, 7, 4, 60, 5, 6, 64]);
        let groups = length_groups(&b, 3);
        let mut seen: Vec<usize> = groups.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..9).collect::<Vec<_>>());
        for g in &groups {
            assert!(g.len() <= 3);
            let lens: Vec<usize> = g.iter().map(|&n| b.length(n)).collect();
            assert!(
                lens.iter().max().unwrap() <= &(2 * lens.iter().min().unwrap()),
                "{lens:?}"
            );
        }
    }

    #[test]
    fn gather_keeps_rows_and_trims_padding() {
        let b = batch(&[5, 2, 9]);
        let g = gather(&b, &[1, 0]);
        assert_eq!((g.batch_size, g.seq_len), (2, 5));
        assert_eq!(g.length(0), 2);
        assert_eq!(g.length(1), 5);
        assert_eq!(&g.input_ids[..2], &b.input_ids[9..11]);
        assert_eq!(&g.input_ids[5..10], &b.input_ids[..5]);
        assert_eq!(&g.token_type_ids[5..10], &b.token_type_ids[..5]);
    }
}
