//! The tokenizer wrapper on a tiny WordPiece `tokenizer.json` written in the
//! test (the same components as bert-base-uncased / all-MiniLM-L6-v2):
//! special tokens, sentence pairs, truncation and dynamic padding.

use fedsb_engine::model::{BertTokenizer, EncodedBatch, DEFAULT_MAX_LENGTH};
use serde_json::json;

const VOCAB: [&str; 15] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "dog", "ran", "##s", "a",
    ".", "cafe",
];

/// A BERT-style tokenizer.json; like all-MiniLM-L6-v2's, it asks for fixed
/// padding to 128, which the wrapper must replace by dynamic padding.
fn tokenizer_json() -> Vec<u8> {
    let vocab: serde_json::Map<String, serde_json::Value> = VOCAB
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), json!(i)))
        .collect();
    let added: Vec<_> = VOCAB[..4]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": true})
        })
        .collect();
    let special =
        |name: &str, type_id: u32| json!({"SpecialToken": {"id": name, "type_id": type_id}});
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    serde_json::to_vec(&json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0},
        "padding": {"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
                    "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
        "added_tokens": added,
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[CLS]", 0), seq("A", 0), special("[SEP]", 0)],
            "pair": [special("[CLS]", 0), seq("A", 0), special("[SEP]", 0), seq("B", 1), special("[SEP]", 1)],
            "special_tokens": {
                "[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}
            }
        },
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    }))
    .unwrap()
}

fn tokenizer() -> BertTokenizer {
    BertTokenizer::from_bytes(&tokenizer_json()).unwrap()
}

#[test]
fn single_sentences_with_dynamic_padding() {
    let tok = tokenizer();
    assert_eq!(tok.max_length(), DEFAULT_MAX_LENGTH);
    assert_eq!(tok.vocab_size(), VOCAB.len());
    let batch = tok
        .encode_batch(&["The cat sat.", "dog", "Café dogs zebra"])
        .unwrap();
    assert_eq!((batch.batch_size, batch.seq_len), (3, 6));
    #[rustfmt::skip]
    assert_eq!(batch.input_ids, vec![
        2, 4, 5, 6, 13, 3,
        2, 9, 3, 0, 0, 0,
        2, 14, 9, 11, 1, 3, // lowercased, accent stripped, word pieces, [UNK]
    ]);
    #[rustfmt::skip]
    assert_eq!(batch.attention_mask, vec![
        1, 1, 1, 1, 1, 1,
        1, 1, 1, 0, 0, 0,
        1, 1, 1, 1, 1, 1,
    ]);
    assert_eq!(batch.token_type_ids, vec![0; 18]);
    assert_eq!((batch.length(0), batch.length(1)), (6, 3));
    assert_eq!(batch.slice(1..2).input_ids, vec![2, 9, 3, 0, 0, 0]);
}

#[test]
fn sentence_pairs_have_token_types() {
    let batch = tokenizer()
        .encode_pair_batch(&[("the cat", "a dog ran"), ("dog", "cat")])
        .unwrap();
    assert_eq!((batch.batch_size, batch.seq_len), (2, 8));
    assert_eq!(&batch.input_ids[..8], &[2, 4, 5, 3, 12, 9, 10, 3]);
    assert_eq!(&batch.token_type_ids[..8], &[0, 0, 0, 0, 1, 1, 1, 1]);
    assert_eq!(&batch.input_ids[8..], &[2, 9, 3, 5, 3, 0, 0, 0]);
    assert_eq!(&batch.token_type_ids[8..], &[0, 0, 0, 1, 1, 0, 0, 0]);
    assert_eq!(&batch.attention_mask[8..], &[1, 1, 1, 1, 1, 0, 0, 0]);

    let mixed = tokenizer()
        .encode_mixed_batch(&[("the cat", Some("a dog ran")), ("dog", None)])
        .unwrap();
    assert_eq!(&mixed.input_ids[8..], &[2, 9, 3, 0, 0, 0, 0, 0]);
}

#[test]
fn truncation_at_max_length() {
    let tok = tokenizer().with_max_length(6).unwrap();
    let batch = tok
        .encode_batch(&["the cat sat on the mat", "dog"])
        .unwrap();
    assert_eq!(batch.seq_len, 6);
    assert_eq!(&batch.input_ids[..6], &[2, 4, 5, 6, 7, 3]);

    // Pairs: the longer side loses tokens first ("longest_first").
    let tok = tokenizer().with_max_length(7).unwrap();
    let batch = tok
        .encode_pair_batch(&[("the cat sat on the mat", "dog")])
        .unwrap();
    assert_eq!(batch.input_ids, vec![2, 4, 5, 6, 3, 9, 3]);
    assert_eq!(batch.token_type_ids, vec![0, 0, 0, 0, 0, 1, 1]);
}

#[test]
fn empty_batch_and_bad_json() {
    assert_eq!(
        tokenizer().encode_batch(&[]).unwrap(),
        EncodedBatch::default()
    );
    let err = BertTokenizer::from_bytes(b"{}").unwrap_err();
    assert!(err.to_string().starts_with("tokenizer:"), "{err}");
}
