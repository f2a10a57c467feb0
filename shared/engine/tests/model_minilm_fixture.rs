//! all-MiniLM-L6-v2 on the CPU reference against PyTorch/transformers: token
//! ids identical and mean-pooled embeddings within 1e-4 per coordinate, on the
//! inputs of `tests/fixtures/minilm_embeddings.json` (written by
//! `scripts/gen_minilm_fixture.py`).
//!
//! Needs the model: `cargo xtask fetch-model` unpacks it into
//! `models/all-MiniLM-L6-v2/` (or point `FEDSB_MODEL_DIR` at a copy). Built
//! only with `--features minilm-fixture`, which xtask turns on once the model
//! is there; when enabled without the model, the test fails and says so.
//!
//! Run: `cargo test -p fedsb-engine --release --features minilm-fixture --test model_minilm_fixture`

use std::path::PathBuf;

use fedsb_engine::model::{BertTokenizer, BertWeights, EncodedBatch};
use fedsb_engine::reference::ReferenceEncoder;
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    max_length: usize,
    hidden_size: usize,
    model_safetensors_sha256: String,
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    text: String,
    text_pair: Option<String>,
    input_ids: Vec<u32>,
    token_type_ids: Vec<u32>,
    embedding: Vec<f32>,
}

fn model_dir() -> PathBuf {
    let dir = std::env::var_os("FEDSB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/all-MiniLM-L6-v2")
        });
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(
            dir.join(file).is_file(),
            "{} not found: run `cargo xtask fetch-model` to download all-MiniLM-L6-v2 into models/ \
             (or set FEDSB_MODEL_DIR to a directory holding config.json, model.safetensors, tokenizer.json)",
            dir.join(file).display()
        );
    }
    dir
}

fn fixture() -> Fixture {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_embeddings.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("fixture JSON")
}

fn encode(tokenizer: &BertTokenizer, entries: &[&Entry]) -> EncodedBatch {
    let inputs: Vec<(&str, Option<&str>)> = entries
        .iter()
        .map(|e| (e.text.as_str(), e.text_pair.as_deref()))
        .collect();
    tokenizer.encode_mixed_batch(&inputs).expect("tokenize")
}

#[test]
fn minilm_token_ids_and_embeddings_match_transformers() {
    let dir = model_dir();
    let fixture = fixture();
    assert!(fixture.entries.len() >= 20);
    let tokenizer = BertTokenizer::from_file(dir.join("tokenizer.json"))
        .unwrap()
        .with_max_length(fixture.max_length)
        .unwrap();
    let weights = BertWeights::from_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "loading {}: {e} (the fixture was made from model.safetensors with sha256 {})",
            dir.display(),
            fixture.model_safetensors_sha256
        )
    });
    assert_eq!(weights.config.hidden_size, fixture.hidden_size);

    // Token ids, one input at a time (no padding).
    for e in &fixture.entries {
        let enc = encode(&tokenizer, &[e]);
        assert_eq!(
            enc.input_ids, e.input_ids,
            "input ids of {:?} / {:?}",
            e.text, e.text_pair
        );
        assert_eq!(
            enc.token_type_ids, e.token_type_ids,
            "token types of {:?}",
            e.text
        );
        assert!(enc.attention_mask.iter().all(|&m| m == 1));
    }

    // Embeddings, in padded batches of four inputs of similar length.
    let mut order: Vec<&Entry> = fixture.entries.iter().collect();
    order.sort_by_key(|e| e.input_ids.len());
    let encoder = ReferenceEncoder::new(&weights, None);
    let mut worst = (0.0f32, String::new());
    // Up to four per batch, never padding an input to more than twice its length.
    let mut chunks: Vec<Vec<&Entry>> = Vec::new();
    for e in order {
        match chunks.last_mut() {
            Some(c) if c.len() < 4 && e.input_ids.len() <= 2 * c[0].input_ids.len() => c.push(e),
            _ => chunks.push(vec![e]),
        }
    }
    let mut padding_tokens = 0;
    for chunk in &chunks {
        let batch = encode(&tokenizer, chunk);
        for (n, e) in chunk.iter().enumerate() {
            // Dynamic padding: each row is the unpadded ids followed by [PAD]s.
            let row = &batch.input_ids[n * batch.seq_len..(n + 1) * batch.seq_len];
            assert_eq!(&row[..e.input_ids.len()], e.input_ids.as_slice());
            assert!(row[e.input_ids.len()..].iter().all(|&id| id == 0));
            assert_eq!(batch.length(n), e.input_ids.len());
        }
        assert_eq!(
            batch.seq_len,
            chunk.iter().map(|e| e.input_ids.len()).max().unwrap()
        );
        padding_tokens += batch.attention_mask.iter().filter(|&&m| m == 0).count();
        let pooled = encoder.mean_pooled(&batch);
        for (n, e) in chunk.iter().enumerate() {
            for (k, (&ours, &theirs)) in pooled.row(n).iter().zip(&e.embedding).enumerate() {
                let diff = (ours - theirs).abs();
                assert!(
                    diff <= TOLERANCE,
                    "{:?}: coordinate {k}: reference {ours}, transformers {theirs}, difference {diff}",
                    e.text
                );
                if diff > worst.0 {
                    worst = (diff, e.text.chars().take(40).collect());
                }
            }
        }
    }
    assert!(padding_tokens > 0, "some batches must be padded");
    println!(
        "max |reference − transformers| over {} inputs: {:e} (at {:?})",
        fixture.entries.len(),
        worst.0,
        worst.1
    );
}
