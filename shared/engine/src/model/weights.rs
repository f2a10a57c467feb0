//! Frozen encoder weights read from a Hugging Face `model.safetensors`.
//!
//! Tensor names mirror the checkpoint keys of `transformers.BertModel`
//! (`embeddings.word_embeddings.weight`, `encoder.layer.{i}.attention.self.query.weight`, …),
//! with or without the `bert.` prefix that `BertFor*` checkpoints such as
//! bert-base-uncased carry. Linear weights keep PyTorch's `out × in` layout.

use safetensors::{Dtype, SafeTensors};

use super::{BertConfig, ModelLoadError};

/// A dense row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    pub shape: Vec<usize>,
    pub data: Vec<T>,
}

impl<T: Copy> Tensor<T> {
    /// A tensor of `shape` filled with `value`.
    pub fn full(shape: &[usize], value: T) -> Self {
        Self {
            shape: shape.to_vec(),
            data: vec![value; shape.iter().product()],
        }
    }

    /// Applies `f` to every element.
    pub fn map<U>(&self, f: impl Fn(T) -> U) -> Tensor<U> {
        Tensor {
            shape: self.shape.clone(),
            data: self.data.iter().map(|&x| f(x)).collect(),
        }
    }
}

/// A linear layer `y = W·x + b` with `W` stored `out × in`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearWeights<T> {
    pub weight: Tensor<T>,
    pub bias: Tensor<T>,
}

impl<T: Copy> LinearWeights<T> {
    pub fn out_features(&self) -> usize {
        self.weight.shape[0]
    }
    pub fn in_features(&self) -> usize {
        self.weight.shape[1]
    }
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> LinearWeights<U> {
        LinearWeights {
            weight: self.weight.map(f),
            bias: self.bias.map(f),
        }
    }
}

/// LayerNorm scale (`weight`, γ) and shift (`bias`, β).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNormWeights<T> {
    pub weight: Tensor<T>,
    pub bias: Tensor<T>,
}

impl<T: Copy> LayerNormWeights<T> {
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> LayerNormWeights<U> {
        LayerNormWeights {
            weight: self.weight.map(f),
            bias: self.bias.map(f),
        }
    }
}

/// `embeddings.*`: word, absolute position and token type tables, then LayerNorm.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingWeights<T> {
    /// `vocab_size × hidden_size`.
    pub word: Tensor<T>,
    /// `max_position_embeddings × hidden_size`.
    pub position: Tensor<T>,
    /// `type_vocab_size × hidden_size`.
    pub token_type: Tensor<T>,
    pub layer_norm: LayerNormWeights<T>,
}

/// The six linear layers of an encoder layer that LoRA-SB adapts, in the
/// order used everywhere in the engine (adapter files, gradients, kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AdaptedLinear {
    Query,
    Key,
    Value,
    AttentionOutput,
    Intermediate,
    Output,
}

impl AdaptedLinear {
    /// All six, in engine order.
    pub const ALL: [AdaptedLinear; 6] = [
        AdaptedLinear::Query,
        AdaptedLinear::Key,
        AdaptedLinear::Value,
        AdaptedLinear::AttentionOutput,
        AdaptedLinear::Intermediate,
        AdaptedLinear::Output,
    ];

    /// Index into [`AdaptedLinear::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module path inside `encoder.layer.{i}`, as in the checkpoint and in
    /// PEFT's `target_modules`.
    pub fn checkpoint_name(self) -> &'static str {
        match self {
            AdaptedLinear::Query => "attention.self.query",
            AdaptedLinear::Key => "attention.self.key",
            AdaptedLinear::Value => "attention.self.value",
            AdaptedLinear::AttentionOutput => "attention.output.dense",
            AdaptedLinear::Intermediate => "intermediate.dense",
            AdaptedLinear::Output => "output.dense",
        }
    }

    /// `(out, in)` of this layer for `config`.
    pub fn shape(self, config: &BertConfig) -> (usize, usize) {
        let h = config.hidden_size;
        match self {
            AdaptedLinear::Intermediate => (config.intermediate_size, h),
            AdaptedLinear::Output => (h, config.intermediate_size),
            _ => (h, h),
        }
    }
}

/// `encoder.layer.{i}.*`.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderLayerWeights<T> {
    pub query: LinearWeights<T>,
    pub key: LinearWeights<T>,
    pub value: LinearWeights<T>,
    /// `attention.output.dense`.
    pub attention_output: LinearWeights<T>,
    /// `attention.output.LayerNorm`.
    pub attention_layer_norm: LayerNormWeights<T>,
    /// `intermediate.dense`.
    pub intermediate: LinearWeights<T>,
    /// `output.dense`.
    pub output: LinearWeights<T>,
    /// `output.LayerNorm`.
    pub output_layer_norm: LayerNormWeights<T>,
}

impl<T> EncoderLayerWeights<T> {
    /// The linear layer named by `which`.
    pub fn linear(&self, which: AdaptedLinear) -> &LinearWeights<T> {
        match which {
            AdaptedLinear::Query => &self.query,
            AdaptedLinear::Key => &self.key,
            AdaptedLinear::Value => &self.value,
            AdaptedLinear::AttentionOutput => &self.attention_output,
            AdaptedLinear::Intermediate => &self.intermediate,
            AdaptedLinear::Output => &self.output,
        }
    }
}

impl<T> EncoderLayerWeights<T> {
    /// The linear layer named by `which`, mutably.
    pub fn linear_mut(&mut self, which: AdaptedLinear) -> &mut LinearWeights<T> {
        match which {
            AdaptedLinear::Query => &mut self.query,
            AdaptedLinear::Key => &mut self.key,
            AdaptedLinear::Value => &mut self.value,
            AdaptedLinear::AttentionOutput => &mut self.attention_output,
            AdaptedLinear::Intermediate => &mut self.intermediate,
            AdaptedLinear::Output => &mut self.output,
        }
    }
}

impl<T: Copy> EncoderLayerWeights<T> {
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> EncoderLayerWeights<U> {
        EncoderLayerWeights {
            query: self.query.map(f),
            key: self.key.map(f),
            value: self.value.map(f),
            attention_output: self.attention_output.map(f),
            attention_layer_norm: self.attention_layer_norm.map(f),
            intermediate: self.intermediate.map(f),
            output: self.output.map(f),
            output_layer_norm: self.output_layer_norm.map(f),
        }
    }
}

/// All frozen weights of a BERT-family encoder (no pooler, no task head).
///
/// Loaded as `f32`; [`BertWeights::map`] converts to another element type
/// (the CPU reference runs in `f64` for gradient checks).
#[derive(Debug, Clone, PartialEq)]
pub struct BertWeights<T = f32> {
    pub config: BertConfig,
    pub embeddings: EmbeddingWeights<T>,
    pub layers: Vec<EncoderLayerWeights<T>>,
}

impl<T: Copy> BertWeights<T> {
    pub fn map<U>(&self, f: impl Fn(T) -> U + Copy) -> BertWeights<U> {
        BertWeights {
            config: self.config.clone(),
            embeddings: EmbeddingWeights {
                word: self.embeddings.word.map(f),
                position: self.embeddings.position.map(f),
                token_type: self.embeddings.token_type.map(f),
                layer_norm: self.embeddings.layer_norm.map(f),
            },
            layers: self.layers.iter().map(|l| l.map(f)).collect(),
        }
    }
}

impl BertWeights<f32> {
    /// Loads from the bytes of `config.json` and `model.safetensors` (what the
    /// browser has after fetching them).
    pub fn from_bytes(config_json: &[u8], safetensors: &[u8]) -> Result<Self, ModelLoadError> {
        let config = BertConfig::from_json(config_json)?;
        Self::from_safetensors(config, safetensors)
    }

    /// Loads from a Hugging Face model directory holding `config.json` and
    /// `model.safetensors`.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_dir(dir: impl AsRef<std::path::Path>) -> Result<Self, ModelLoadError> {
        let dir = dir.as_ref();
        let config = super::read_file(&dir.join("config.json"))?;
        let tensors = super::read_file(&dir.join("model.safetensors"))?;
        Self::from_bytes(&config, &tensors)
    }

    /// Reads every tensor named by `config` from a safetensors buffer,
    /// checking shapes and converting f16/bf16/f64 to f32.
    pub fn from_safetensors(config: BertConfig, bytes: &[u8]) -> Result<Self, ModelLoadError> {
        config.validate()?;
        let st = SafeTensors::deserialize(bytes).map_err(ModelLoadError::Safetensors)?;
        let prefix = if st.tensor("embeddings.word_embeddings.weight").is_ok() {
            ""
        } else if st.tensor("bert.embeddings.word_embeddings.weight").is_ok() {
            "bert."
        } else {
            ""
        };
        let reader = TensorReader { st: &st, prefix };
        let h = config.hidden_size;

        let embeddings = EmbeddingWeights {
            word: reader.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: reader.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: reader.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            layer_norm: reader.layer_norm("embeddings.LayerNorm", h)?,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                let linear = |which: AdaptedLinear| {
                    let (out, inp) = which.shape(&config);
                    reader.linear(&format!("{p}.{}", which.checkpoint_name()), out, inp)
                };
                Ok(EncoderLayerWeights {
                    query: linear(AdaptedLinear::Query)?,
                    key: linear(AdaptedLinear::Key)?,
                    value: linear(AdaptedLinear::Value)?,
                    attention_output: linear(AdaptedLinear::AttentionOutput)?,
                    attention_layer_norm: reader
                        .layer_norm(&format!("{p}.attention.output.LayerNorm"), h)?,
                    intermediate: linear(AdaptedLinear::Intermediate)?,
                    output: linear(AdaptedLinear::Output)?,
                    output_layer_norm: reader.layer_norm(&format!("{p}.output.LayerNorm"), h)?,
                })
            })
            .collect::<Result<Vec<_>, ModelLoadError>>()?;
        Ok(Self {
            config,
            embeddings,
            layers,
        })
    }

    /// Serializes to safetensors (f32, keys without prefix, as
    /// all-MiniLM-L6-v2 names them); [`BertWeights::from_safetensors`] reads it back.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let mut named: Vec<(String, &Tensor<f32>)> = vec![
            (
                "embeddings.word_embeddings.weight".into(),
                &self.embeddings.word,
            ),
            (
                "embeddings.position_embeddings.weight".into(),
                &self.embeddings.position,
            ),
            (
                "embeddings.token_type_embeddings.weight".into(),
                &self.embeddings.token_type,
            ),
            (
                "embeddings.LayerNorm.weight".into(),
                &self.embeddings.layer_norm.weight,
            ),
            (
                "embeddings.LayerNorm.bias".into(),
                &self.embeddings.layer_norm.bias,
            ),
        ];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("encoder.layer.{i}");
            for which in AdaptedLinear::ALL {
                let lin = layer.linear(which);
                let name = which.checkpoint_name();
                named.push((format!("{p}.{name}.weight"), &lin.weight));
                named.push((format!("{p}.{name}.bias"), &lin.bias));
            }
            for (name, ln) in [
                ("attention.output.LayerNorm", &layer.attention_layer_norm),
                ("output.LayerNorm", &layer.output_layer_norm),
            ] {
                named.push((format!("{p}.{name}.weight"), &ln.weight));
                named.push((format!("{p}.{name}.bias"), &ln.bias));
            }
        }
        let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = named
            .into_iter()
            .map(|(name, t)| {
                let data = t.data.iter().flat_map(|x| x.to_le_bytes()).collect();
                (name, t.shape.clone(), data)
            })
            .collect();
        let views = bytes.iter().map(|(name, shape, data)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data)
                .expect("shape matches data");
            (name.as_str(), view)
        });
        safetensors::tensor::serialize(views, None).expect("serializing in memory cannot fail")
    }

    /// Random weights for tests and benchmarks: a deterministic function of
    /// `seed`; matrices uniform in ±`scale`, LayerNorm γ near 1 and β near 0.
    pub fn random(config: &BertConfig, seed: u64, scale: f32) -> Self {
        let mut rng = SplitMix64(seed);
        let mut uniform = |shape: &[usize], center: f32, scale: f32| Tensor {
            shape: shape.to_vec(),
            data: (0..shape.iter().product::<usize>())
                .map(|_| center + scale * rng.next_signed())
                .collect(),
        };
        let h = config.hidden_size;
        let mut layer_norm = |n: usize| LayerNormWeights {
            weight: uniform(&[n], 1.0, 0.1),
            bias: uniform(&[n], 0.0, 0.1),
        };
        let embeddings_ln = layer_norm(h);
        let layers_ln: Vec<_> = (0..config.num_hidden_layers)
            .map(|_| (layer_norm(h), layer_norm(h)))
            .collect();
        let mut linear = |which: AdaptedLinear| {
            let (out, inp) = which.shape(config);
            LinearWeights {
                weight: uniform(&[out, inp], 0.0, scale),
                bias: uniform(&[out], 0.0, scale),
            }
        };
        let layers = layers_ln
            .into_iter()
            .map(|(ln1, ln2)| EncoderLayerWeights {
                query: linear(AdaptedLinear::Query),
                key: linear(AdaptedLinear::Key),
                value: linear(AdaptedLinear::Value),
                attention_output: linear(AdaptedLinear::AttentionOutput),
                attention_layer_norm: ln1,
                intermediate: linear(AdaptedLinear::Intermediate),
                output: linear(AdaptedLinear::Output),
                output_layer_norm: ln2,
            })
            .collect();
        let mut rng = SplitMix64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let mut table = |rows: usize| Tensor {
            shape: vec![rows, h],
            data: (0..rows * h).map(|_| rng.next_signed()).collect(),
        };
        let embeddings = EmbeddingWeights {
            word: table(config.vocab_size),
            position: table(config.max_position_embeddings),
            token_type: table(config.type_vocab_size),
            layer_norm: embeddings_ln,
        };
        Self {
            config: config.clone(),
            embeddings,
            layers,
        }
    }
}

/// SplitMix64: a small seeded generator, so that random test models and
/// adapters need no OS entropy (and run the same on wasm).
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub(crate) fn signed(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }

    fn next_signed(&mut self) -> f32 {
        self.signed() as f32
    }
}

struct TensorReader<'a, 'data> {
    st: &'a SafeTensors<'data>,
    prefix: &'a str,
}

impl TensorReader<'_, '_> {
    fn get(&self, name: &str, expected: &[usize]) -> Result<Tensor<f32>, ModelLoadError> {
        self.get_any(&[name], expected)
    }

    /// The first of `names` present (old checkpoints spell LayerNorm
    /// parameters `gamma`/`beta`).
    fn get_any(&self, names: &[&str], expected: &[usize]) -> Result<Tensor<f32>, ModelLoadError> {
        let full = |n: &str| format!("{}{n}", self.prefix);
        let Some((name, view)) = names
            .iter()
            .find_map(|n| self.st.tensor(&full(n)).ok().map(|v| (full(n), v)))
        else {
            return Err(ModelLoadError::MissingTensor {
                name: full(names[0]),
                expected: expected.to_vec(),
            });
        };
        if view.shape() != expected {
            return Err(ModelLoadError::ShapeMismatch {
                name,
                expected: expected.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let bytes = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|c| {
                    f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32
                })
                .collect(),
            other => {
                return Err(ModelLoadError::UnsupportedDtype {
                    name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(Tensor {
            shape: expected.to_vec(),
            data,
        })
    }

    fn linear(
        &self,
        path: &str,
        out: usize,
        inp: usize,
    ) -> Result<LinearWeights<f32>, ModelLoadError> {
        Ok(LinearWeights {
            weight: self.get(&format!("{path}.weight"), &[out, inp])?,
            bias: self.get(&format!("{path}.bias"), &[out])?,
        })
    }

    fn layer_norm(&self, path: &str, n: usize) -> Result<LayerNormWeights<f32>, ModelLoadError> {
        Ok(LayerNormWeights {
            weight: self.get_any(&[&format!("{path}.weight"), &format!("{path}.gamma")], &[n])?,
            bias: self.get_any(&[&format!("{path}.bias"), &format!("{path}.beta")], &[n])?,
        })
    }
}
