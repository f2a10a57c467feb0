//! The browser's embedding path ([`embed_by_length`], what `WasmEngine.embed`
//! runs) natively on any wgpu adapter (lavapipe in CI): all-MiniLM-L6-v2
//! embeddings of every input of
//! `shared/engine/tests/fixtures/minilm_embeddings.json` within 1e-4 of
//! PyTorch/transformers, and the time it takes, to set beside the browser's
//! (`tests/tests/browser_embed.rs`, same inputs, same passes).
//!
//! `FEDSB_EMBED_REPEAT=N` embeds the inputs N times and prints each time
//! (the first call also compiles the pipelines); only the first is checked.
//!
//! Run: `cargo test -p fedsb-wasm-client --release --features minilm-fixture --test embed_minilm_fixture -- --nocapture`
//! (needs `cargo xtask fetch-model`, or `FEDSB_MODEL_DIR`).
#![cfg(feature = "minilm-fixture")]

use std::path::{Path, PathBuf};
use std::time::Instant;

use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_wasm_client::embed_by_length;
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("wasm-client lives in the workspace")
}

#[test]
fn browser_embedding_path_matches_transformers_natively() {
    let dir = std::env::var_os("FEDSB_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("models/all-MiniLM-L6-v2"));
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} not found: run `cargo xtask fetch-model` (or set FEDSB_MODEL_DIR)",
        dir.join("model.safetensors").display()
    );
    let path = repo().join("shared/engine/tests/fixtures/minilm_embeddings.json");
    let fixture: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let max_length = fixture["max_length"].as_u64().unwrap() as usize;
    let h = fixture["hidden_size"].as_u64().unwrap() as usize;
    let entries = fixture["entries"].as_array().unwrap();
    let inputs: Vec<(&str, Option<&str>)> = entries
        .iter()
        .map(|e| (e["text"].as_str().unwrap(), e["text_pair"].as_str()))
        .collect();

    let tokenizer = BertTokenizer::from_file(dir.join("tokenizer.json"))
        .unwrap()
        .with_max_length(max_length)
        .unwrap();
    let weights = BertWeights::from_dir(&dir).unwrap();
    let name = std::env::var("FEDSB_ADAPTER").ok();
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: name.as_deref(),
    }))
    .unwrap_or_else(|e| panic!("this test needs a wgpu adapter (lavapipe is enough): {e}"));
    let mut encoder = GpuEncoder::new(&ctx, &weights, None, None).unwrap();
    let repeat: u32 = std::env::var("FEDSB_EMBED_REPEAT").map_or(1, |v| v.parse().unwrap());
    let mut times = Vec::new();
    let mut got = Vec::new();
    for _ in 0..repeat.max(1) {
        let start = Instant::now();
        let out = pollster::block_on(embed_by_length(&mut encoder, &tokenizer, &inputs)).unwrap();
        times.push(format!("{:.0}", start.elapsed().as_secs_f64() * 1e3));
        if got.is_empty() {
            got = out;
        }
    }
    assert_eq!(got.len(), inputs.len() * h);

    let mut worst = 0.0f64;
    for (n, e) in entries.iter().enumerate() {
        for (k, theirs) in e["embedding"].as_array().unwrap().iter().enumerate() {
            let theirs = theirs.as_f64().unwrap();
            let ours = f64::from(got[n * h + k]);
            let diff = (ours - theirs).abs();
            assert!(
                diff <= TOLERANCE,
                "{:?}: coordinate {k}: ours {ours}, transformers {theirs}, difference {diff}",
                e["text"]
            );
            worst = worst.max(diff);
        }
    }
    eprintln!(
        "{} inputs on {}: largest difference {worst:.2e}, embedding {} ms",
        inputs.len(),
        ctx.adapter_name(),
        times.join(", ")
    );
}
