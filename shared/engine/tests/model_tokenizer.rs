//! The tokenizer wrapper on a tiny WordPiece `tokenizer.json` written in the
//! test (the same components as bert-base-uncased / all-MiniLM-L6-v2):
//! special tokens, sentence pairs, truncation and dynamic padding.

use fedsb_engine::model::{
    wordpiece_tokenizer_json, BertTokenizer, EncodedBatch, DEFAULT_MAX_LENGTH,
};
use serde_json::json;

const VOCAB: [&str; 15] = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "dog", "ran", "##s", "a",
    ".", "cafe",
];

/// A BERT-style tokenizer.json; like all-MiniLM-L6-v2's, it asks for fixed
/// padding to 128, which the wrapper must replace by dynamic padding.
fn tokenizer_json() -> Vec<u8> {
    let mut t: serde_json::Value =
        serde_json::from_slice(&wordpiece_tokenizer_json(&VOCAB, true).unwrap()).unwrap();
    t["truncation"] =
        json!({"direction": "Right", "max_length": 128, "strategy": "LongestFirst", "stride": 0});
    t["padding"] = json!({"strategy": {"Fixed": 128}, "direction": "Right", "pad_to_multiple_of": null,
                          "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"});
    serde_json::to_vec(&t).unwrap()
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

#[test]
fn vocab_txt_gives_the_same_tokenizer_and_missing_specials_are_named() {
    let from_json = tokenizer();
    let from_txt = BertTokenizer::from_vocab_txt(&VOCAB.join("\n"), true).unwrap();
    let texts = ["The cats sat on a mat.", "dog ran cafe"];
    assert_eq!(
        from_txt.encode_batch(&texts).unwrap(),
        from_json.encode_batch(&texts).unwrap()
    );
    let e = BertTokenizer::from_vocab_txt("[PAD]\n[UNK]\nthe\n", true).unwrap_err();
    assert!(e.to_string().contains("[CLS]"), "{e}");
}

#[test]
fn a_max_length_without_room_for_text_is_refused() {
    // tokenizers reads 0 as "no truncation"; 1 and 2 leave no text.
    for n in [0, 1, 2] {
        let err = tokenizer().with_max_length(n).unwrap_err().to_string();
        assert!(
            err.contains(&format!("maximum sequence length of {n} tokens")),
            "{err}"
        );
    }
    assert!(tokenizer().with_max_length(3).is_ok());
}
