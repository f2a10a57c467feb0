//! The frozen BERT-family encoder: configuration, weights and tokenizer.
//!
//! Mirrors `transformers.BertModel` (Devlin et al. 2019, "BERT: Pre-training of
//! Deep Bidirectional Transformers"): [`BertConfig`] reads `config.json`,
//! [`BertWeights`] reads `model.safetensors` (keys with or without the `bert.`
//! prefix), [`BertTokenizer`] wraps `tokenizer.json` through the `tokenizers`
//! crate. Everything loads from bytes (the browser fetches them) or, natively,
//! from a Hugging Face model directory. The computation itself lives in
//! [`crate::reference`] (CPU) and the GPU kernels.

mod config;
mod tokenizer;
mod weights;

pub use config::BertConfig;
pub use tokenizer::{wordpiece_tokenizer_json, BertTokenizer, EncodedBatch, DEFAULT_MAX_LENGTH};
pub(crate) use weights::SplitMix64;
pub use weights::{
    AdaptedLinear, BertWeights, EmbeddingWeights, EncoderLayerWeights, LayerNormWeights,
    LinearWeights, Tensor,
};

/// Why a model, its configuration or its tokenizer could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelLoadError {
    #[error("config.json is not valid: {0}")]
    Config(#[source] serde_json::Error),
    #[error("config.json describes an unsupported model: {0}")]
    InvalidConfig(String),
    #[error("model.safetensors could not be parsed: {0}")]
    Safetensors(#[source] safetensors::SafeTensorError),
    #[error("tensor `{name}` is missing from model.safetensors (expected shape {expected:?})")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor `{name}` has dtype {dtype}, expected F32, F16, BF16 or F64")]
    UnsupportedDtype { name: String, dtype: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(not(target_arch = "wasm32"))]
fn read_file(path: &std::path::Path) -> Result<Vec<u8>, ModelLoadError> {
    std::fs::read(path).map_err(|source| ModelLoadError::Io {
        path: path.display().to_string(),
        source,
    })
}
