//! A tiny random BERT model directory (config.json, model.safetensors,
//! tokenizer.json with a WordPiece vocabulary of a few dozen words) and tiny
//! labelled datasets of two separable classes, for tests that run the real
//! GPU engine through `fedsb init` and `fedsb join` in seconds on lavapipe.

use std::fmt::Write as _;
use std::path::Path;

use fedsb_engine::model::{wordpiece_tokenizer_json, BertConfig, BertWeights};
use serde_json::json;

/// Words that only occur in class 1 (`positive`).
pub const POSITIVE_WORDS: [&str; 6] = ["good", "great", "happy", "nice", "fine", "love"];
/// Words that only occur in class 0 (`negative`).
pub const NEGATIVE_WORDS: [&str; 6] = ["bad", "awful", "sad", "poor", "ugly", "hate"];
/// Words of both classes.
pub const NEUTRAL_WORDS: [&str; 8] = ["the", "a", "movie", "was", "very", "it", "is", "food"];
/// The task's class names, in head order.
pub const LABELS: [&str; 2] = ["negative", "positive"];

/// The vocabulary: special tokens first (`[PAD]` = 0), then every word.
pub fn vocabulary() -> Vec<&'static str> {
    let mut v = vec!["[PAD]", "[UNK]", "[CLS]", "[SEP]", "."];
    v.extend(NEUTRAL_WORDS);
    v.extend(POSITIVE_WORDS);
    v.extend(NEGATIVE_WORDS);
    v
}

/// The model's configuration: hidden 16, 2 layers of 2 heads, intermediate 32.
pub fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: vocabulary().len(),
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        intermediate_size: 32,
        max_position_embeddings: 32,
        type_vocab_size: 2,
        ..BertConfig::default()
    }
}

/// A BERT-style `tokenizer.json` (BertNormalizer, BertPreTokenizer, WordPiece,
/// `[CLS] … [SEP]` template) over [`vocabulary`].
pub fn tokenizer_json() -> Vec<u8> {
    wordpiece_tokenizer_json(&vocabulary(), true).expect("the vocabulary has BERT's special tokens")
}

/// Writes `config.json`, `model.safetensors` (random weights, a deterministic
/// function of `seed`) and `tokenizer.json` into `dir` (created if needed).
pub fn write_tiny_model(dir: &Path, seed: u64) -> anyhow::Result<BertConfig> {
    let config = tiny_config();
    write_bert(
        dir,
        &BertWeights::random(&config, seed, 0.3),
        &tokenizer_json(),
    )?;
    Ok(config)
}

/// Writes a model directory: `config.json` (of `weights`), `model.safetensors`
/// and `tokenizer` as `tokenizer.json` (its vocabulary must have
/// `weights.config.vocab_size` entries) into `dir` (created if needed).
pub fn write_bert(dir: &Path, weights: &BertWeights, tokenizer: &[u8]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut json = serde_json::to_value(&weights.config)?;
    json["architectures"] = json!(["BertModel"]);
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(dir.join("model.safetensors"), weights.to_safetensors())?;
    std::fs::write(dir.join("tokenizer.json"), tokenizer)?;
    Ok(())
}

/// The words of `text` as BERT's lowercasing normalizer and pre-tokenizer
/// see them: split at whitespace, every ASCII punctuation character a word
/// of its own (`n't` → `n`, `'`, `t`).
pub fn bert_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    for chunk in text.split_whitespace() {
        let mut word = String::new();
        for c in chunk.chars() {
            if c.is_ascii_punctuation() {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
                words.push(c.to_string());
            } else {
                word.extend(c.to_lowercase());
            }
        }
        if !word.is_empty() {
            words.push(word);
        }
    }
    words
}

/// A WordPiece vocabulary of BERT's special tokens (`[PAD]` = 0, `[UNK]`,
/// `[CLS]`, `[SEP]`) and the `words` most frequent words of `texts` (by
/// [`bert_words`]; ties broken alphabetically, so the result depends only
/// on the texts). Other words become `[UNK]`.
pub fn frequent_word_vocabulary<'a>(
    texts: impl IntoIterator<Item = &'a str>,
    words: usize,
) -> Vec<String> {
    let mut counts = std::collections::HashMap::<String, usize>::new();
    for text in texts {
        for w in bert_words(text) {
            *counts.entry(w).or_default() += 1;
        }
    }
    let mut ranked: Vec<(String, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let mut vocab: Vec<String> = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        .map(str::to_owned)
        .to_vec();
    // `bert_words` splits `[` and `]` off, so no word is a special token.
    vocab.extend(ranked.into_iter().map(|(w, _)| w).take(words));
    vocab
}

/// Rows of a labelled TSV file with a header (`sentence<TAB>label`, as
/// GLUE's SST-2): (sentence, label) pairs, in file order.
pub fn read_labelled_tsv(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    use anyhow::Context as _;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let (sentence, label) = line
            .split_once('\t')
            .with_context(|| format!("{}:{}: no tab", path.display(), i + 1))?;
        rows.push((sentence.to_owned(), label.trim().to_owned()));
    }
    Ok(rows)
}

/// `rows` as TSV with the header `sentence<TAB>label`.
pub fn to_labelled_tsv<'a>(rows: impl IntoIterator<Item = &'a (String, String)>) -> String {
    let mut out = String::from("sentence\tlabel\n");
    for (sentence, label) in rows {
        let _ = writeln!(out, "{sentence}\t{label}");
    }
    out
}

/// A cheap deterministic generator for the datasets.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// `rows` labelled sentences as TSV (`sentence<TAB>label`, labels by name):
/// each sentence mixes neutral words with two or three words of its class
/// only, so the classes are separable. `positive_share` of the rows are
/// positive (0.5 for balanced data).
pub fn labelled_tsv(rows: usize, seed: u64, positive_share: f64) -> String {
    let mut rng = Lcg(seed ^ 0xda7a);
    let mut out = String::from("sentence\tlabel\n");
    for i in 0..rows {
        let positive = (i as f64 + 0.5) / rows as f64 <= positive_share;
        let class_words: &[&str] = if positive {
            &POSITIVE_WORDS
        } else {
            &NEGATIVE_WORDS
        };
        let mut words = Vec::new();
        for _ in 0..2 + rng.next(3) {
            words.push(NEUTRAL_WORDS[rng.next(NEUTRAL_WORDS.len())]);
        }
        for _ in 0..2 + rng.next(2) {
            let at = rng.next(words.len() + 1);
            words.insert(at, class_words[rng.next(class_words.len())]);
        }
        let label = LABELS[usize::from(positive)];
        let _ = writeln!(out, "{} .\t{label}", words.join(" "));
    }
    out
}
