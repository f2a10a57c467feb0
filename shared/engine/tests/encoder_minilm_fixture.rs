//! all-MiniLM-L6-v2 on the GPU ([`GpuEncoder`]) against PyTorch/transformers:
//! mean-pooled embeddings within 1e-4 per coordinate on the inputs of
//! `tests/fixtures/minilm_embeddings.json` (written by
//! `scripts/gen_minilm_fixture.py`), all in one padded batch and one by one.
//!
//! Needs a wgpu adapter (lavapipe is enough) and the model:
//! `cargo xtask fetch-model` unpacks it into `models/all-MiniLM-L6-v2/` (or
//! point `FEDSB_MODEL_DIR` at a copy). Built only with `--features
//! minilm-fixture`, like `model_minilm_fixture`; enabled without the model, it
//! fails and says so.
//!
//! Run: `cargo test -p fedsb-engine --release --features minilm-fixture --test encoder_minilm_fixture`
#![cfg(feature = "minilm-fixture")]

use std::path::PathBuf;

use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use serde::Deserialize;

const TOLERANCE: f32 = 1e-4;

#[derive(Deserialize)]
struct Fixture {
    max_length: usize,
    hidden_size: usize,
    entries: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    text: String,
    text_pair: Option<String>,
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
            "{} not found: run `cargo xtask fetch-model` (or set FEDSB_MODEL_DIR)",
            dir.join(file).display()
        );
    }
    dir
}

#[test]
fn minilm_gpu_embeddings_match_transformers() {
    let dir = model_dir();
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/minilm_embeddings.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fixture: Fixture = serde_json::from_slice(&bytes).expect("fixture JSON");
    let tokenizer = BertTokenizer::from_file(dir.join("tokenizer.json"))
        .unwrap()
        .with_max_length(fixture.max_length)
        .unwrap();
    let weights = BertWeights::from_dir(&dir).expect("model");
    assert_eq!(weights.config.hidden_size, fixture.hidden_size);
    let name = std::env::var("FEDSB_ADAPTER").ok();
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: name.as_deref(),
    }))
    .unwrap_or_else(|e| panic!("this test needs a wgpu adapter (lavapipe is enough): {e}"));
    let mut encoder = GpuEncoder::new(&ctx, &weights, None, None).expect("upload");
    let h = fixture.hidden_size;
    let inputs: Vec<(&str, Option<&str>)> = fixture
        .entries
        .iter()
        .map(|e| (e.text.as_str(), e.text_pair.as_deref()))
        .collect();
    let mut worst = 0.0f32;
    // All inputs in one batch (heavy padding), then one at a time.
    let batch = tokenizer.encode_mixed_batch(&inputs).unwrap();
    let pooled = pollster::block_on(encoder.embed(&batch)).expect("embed");
    let mut singles = Vec::new();
    for input in &inputs {
        let one = tokenizer.encode_mixed_batch(&[*input]).unwrap();
        singles.extend(pollster::block_on(encoder.embed(&one)).expect("embed"));
    }
    for (what, got) in [("batched", &pooled), ("single", &singles)] {
        for (n, e) in fixture.entries.iter().enumerate() {
            for (k, (&ours, &theirs)) in
                got[n * h..(n + 1) * h].iter().zip(&e.embedding).enumerate()
            {
                let diff = (ours - theirs).abs();
                worst = worst.max(diff);
                assert!(
                    diff <= TOLERANCE,
                    "{what} {:?}: coordinate {k}: gpu {ours}, transformers {theirs}, difference {diff}",
                    e.text
                );
            }
        }
    }
    eprintln!(
        "{} inputs, largest difference {worst:.2e} on {}",
        fixture.entries.len(),
        ctx.adapter_name()
    );
}
