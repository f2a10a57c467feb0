//! `BertConfig`: the subset of a Hugging Face `config.json` that a BERT-family
//! encoder needs, with the defaults of `transformers.BertConfig`.

use serde::{Deserialize, Serialize};

use super::ModelLoadError;

/// Hyper-parameters of a BERT-family encoder, read from `config.json`.
///
/// Field names and defaults mirror `transformers.BertConfig`; unknown keys
/// (`architectures`, `transformers_version`, …) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Only `"gelu"` (exact, erf-based) is supported.
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub pad_token_id: u32,
    /// Only `"absolute"` is supported.
    pub position_embedding_type: String,
    pub model_type: String,
}

impl Default for BertConfig {
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".to_owned(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".to_owned(),
            model_type: "bert".to_owned(),
        }
    }
}

impl BertConfig {
    /// Parses `config.json` and checks that the encoder is one this engine runs.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ModelLoadError> {
        let config: Self = serde_json::from_slice(bytes).map_err(ModelLoadError::Config)?;
        config.validate()?;
        Ok(config)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rejects configurations the reference and the kernels do not implement.
    pub fn validate(&self) -> Result<(), ModelLoadError> {
        let invalid = |msg: String| Err(ModelLoadError::InvalidConfig(msg));
        if self.hidden_size == 0 || self.num_attention_heads == 0 || self.num_hidden_layers == 0 {
            return invalid(format!(
                "hidden_size ({}), num_attention_heads ({}) and num_hidden_layers ({}) must be positive",
                self.hidden_size, self.num_attention_heads, self.num_hidden_layers
            ));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return invalid(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.hidden_act != "gelu" {
            return invalid(format!(
                "hidden_act {:?} is not supported (only \"gelu\")",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return invalid(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        if self.intermediate_size == 0 || self.vocab_size == 0 || self.type_vocab_size == 0 {
            return invalid(
                "intermediate_size, vocab_size and type_vocab_size must be positive".into(),
            );
        }
        Ok(())
    }
}
