//! Tokenization of single sentences and sentence pairs through the
//! `tokenizers` crate (the Rust core of Hugging Face's fast tokenizers), with
//! truncation at a maximum length and dynamic padding to the longest sequence
//! in the batch — what `tokenizer(texts, padding=True, truncation=True,
//! max_length=128)` does in transformers.

use tokenizers::{
    EncodeInput, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection,
    TruncationParams, TruncationStrategy,
};

use super::ModelLoadError;

/// Default maximum sequence length (special tokens included).
pub const DEFAULT_MAX_LENGTH: usize = 128;

/// A tokenized batch, row-major `batch_size × seq_len`, padded on the right.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EncodedBatch {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u32>,
    pub batch_size: usize,
    pub seq_len: usize,
}

impl EncodedBatch {
    /// Number of real (non-padding) tokens of sample `n`.
    pub fn length(&self, n: usize) -> usize {
        let row = &self.attention_mask[n * self.seq_len..(n + 1) * self.seq_len];
        row.iter().filter(|&&m| m != 0).count()
    }

    /// The samples `range` as their own batch (same `seq_len`).
    pub fn slice(&self, range: std::ops::Range<usize>) -> EncodedBatch {
        let cols = range.start * self.seq_len..range.end * self.seq_len;
        EncodedBatch {
            input_ids: self.input_ids[cols.clone()].to_vec(),
            token_type_ids: self.token_type_ids[cols.clone()].to_vec(),
            attention_mask: self.attention_mask[cols].to_vec(),
            batch_size: range.len(),
            seq_len: self.seq_len,
        }
    }
}

/// A `tokenizer.json` tokenizer set up for classification batches.
#[derive(Clone)]
pub struct BertTokenizer {
    inner: Tokenizer,
    max_length: usize,
}

impl std::fmt::Debug for BertTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .finish()
    }
}

impl BertTokenizer {
    /// Parses the bytes of `tokenizer.json`; truncates at [`DEFAULT_MAX_LENGTH`].
    pub fn from_bytes(tokenizer_json: &[u8]) -> Result<Self, ModelLoadError> {
        let inner = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|e| ModelLoadError::Tokenizer(e.to_string()))?;
        Self::new(inner, DEFAULT_MAX_LENGTH)
    }

    /// Reads `tokenizer.json` from a file.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self, ModelLoadError> {
        Self::from_bytes(&super::read_file(path.as_ref())?)
    }

    /// The same tokenizer truncating at `max_length` tokens (special tokens included).
    pub fn with_max_length(self, max_length: usize) -> Result<Self, ModelLoadError> {
        Self::new(self.inner, max_length)
    }

    /// The standard BERT tokenizer over a WordPiece `vocab.txt` (one token per
    /// line, id = line number), for BERT-family models that ship no
    /// `tokenizer.json`; see [`wordpiece_tokenizer_json`].
    pub fn from_vocab_txt(vocab_txt: &str, lowercase: bool) -> Result<Self, ModelLoadError> {
        let vocab: Vec<&str> = vocab_txt
            .lines()
            .map(|l| l.trim_end_matches('\r'))
            .collect();
        Self::from_bytes(&wordpiece_tokenizer_json(&vocab, lowercase)?)
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn new(mut inner: Tokenizer, max_length: usize) -> Result<Self, ModelLoadError> {
        // tokenizers reads a max length of 0 as "no truncation", and [CLS]
        // and [SEP] alone take 2.
        if max_length < 3 {
            return Err(ModelLoadError::Tokenizer(format!(
                "a maximum sequence length of {max_length} tokens leaves no room for text; \
                 it counts [CLS] and [SEP], so give at least 3"
            )));
        }
        // tokenizer.json files often carry their own fixed padding (all-MiniLM-L6-v2
        // pads to 128); replace it by dynamic padding and our truncation.
        let pad_token = ["[PAD]", "<pad>"]
            .into_iter()
            .find(|t| inner.token_to_id(t).is_some())
            .ok_or_else(|| ModelLoadError::Tokenizer("no [PAD] token in the vocabulary".into()))?;
        let pad_id = inner.token_to_id(pad_token).unwrap_or(0);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| ModelLoadError::Tokenizer(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad_token.to_owned(),
        }));
        Ok(Self { inner, max_length })
    }

    /// Tokenizes single sentences.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<EncodedBatch, ModelLoadError> {
        self.encode_inputs(texts.iter().map(|&t| EncodeInput::from(t)).collect())
    }

    /// Tokenizes sentence pairs (`[CLS] a [SEP] b [SEP]`, token type 1 for `b`).
    pub fn encode_pair_batch(
        &self,
        pairs: &[(&str, &str)],
    ) -> Result<EncodedBatch, ModelLoadError> {
        self.encode_inputs(
            pairs
                .iter()
                .map(|&(a, b)| EncodeInput::from((a, b)))
                .collect(),
        )
    }

    /// Tokenizes a mixed batch: `(text, Some(pair))` or `(text, None)`.
    pub fn encode_mixed_batch(
        &self,
        inputs: &[(&str, Option<&str>)],
    ) -> Result<EncodedBatch, ModelLoadError> {
        self.encode_inputs(
            inputs
                .iter()
                .map(|&(a, b)| match b {
                    Some(b) => EncodeInput::from((a, b)),
                    None => EncodeInput::from(a),
                })
                .collect(),
        )
    }

    fn encode_inputs(&self, inputs: Vec<EncodeInput<'_>>) -> Result<EncodedBatch, ModelLoadError> {
        let batch_size = inputs.len();
        if batch_size == 0 {
            return Ok(EncodedBatch::default());
        }
        // One input at a time, then batch padding: `Tokenizer::encode_batch` would
        // go through rayon, which has no threads in a browser tab.
        let tokenizer_error = |e: tokenizers::Error| ModelLoadError::Tokenizer(e.to_string());
        let mut encodings = inputs
            .into_iter()
            .map(|input| self.inner.encode(input, true))
            .collect::<Result<Vec<_>, _>>()
            .map_err(tokenizer_error)?;
        if let Some(padding) = self.inner.get_padding() {
            tokenizers::utils::padding::pad_encodings(&mut encodings, padding)
                .map_err(tokenizer_error)?;
        }
        let seq_len = encodings[0].get_ids().len();
        let mut batch = EncodedBatch {
            input_ids: Vec::with_capacity(batch_size * seq_len),
            token_type_ids: Vec::with_capacity(batch_size * seq_len),
            attention_mask: Vec::with_capacity(batch_size * seq_len),
            batch_size,
            seq_len,
        };
        for e in &encodings {
            debug_assert_eq!(e.get_ids().len(), seq_len);
            batch.input_ids.extend_from_slice(e.get_ids());
            batch.token_type_ids.extend_from_slice(e.get_type_ids());
            batch
                .attention_mask
                .extend_from_slice(e.get_attention_mask());
        }
        Ok(batch)
    }
}

/// A `tokenizer.json` with BERT's pipeline (BertNormalizer, BertPreTokenizer,
/// WordPiece with `##` continuations, `[CLS] A [SEP] (B [SEP])` template with
/// token types) over `vocab` (id = position), as bert-base-uncased and
/// all-MiniLM-L6-v2 use. The vocabulary must hold `[PAD]`, `[UNK]`, `[CLS]`
/// and `[SEP]`.
pub fn wordpiece_tokenizer_json(
    vocab: &[&str],
    lowercase: bool,
) -> Result<Vec<u8>, ModelLoadError> {
    use serde_json::json;
    let id = |token: &str| {
        vocab.iter().position(|t| *t == token).ok_or_else(|| {
            ModelLoadError::Tokenizer(format!("the vocabulary has no {token} token"))
        })
    };
    let mut specials = Vec::new();
    for token in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] {
        specials.push((token, id(token)?));
    }
    for token in ["[MASK]"] {
        if let Ok(i) = id(token) {
            specials.push((token, i));
        }
    }
    let added: Vec<_> = specials
        .iter()
        .map(|(t, i)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
    let special =
        |name: &str, type_id: u32| json!({"SpecialToken": {"id": name, "type_id": type_id}});
    let seq = |name: &str, type_id: u32| json!({"Sequence": {"id": name, "type_id": type_id}});
    serde_json::to_vec(&json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": lowercase},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]", 0), seq("A", 0), special("[SEP]", 0)],
            "pair": [special("[CLS]", 0), seq("A", 0), special("[SEP]", 0), seq("B", 1), special("[SEP]", 1)],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [cls], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [sep], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": map}
    }))
    .map_err(|e| ModelLoadError::Tokenizer(e.to_string()))
}
