//! The engine in headless Chromium: `www/tests/embed.html`, served by the
//! real aggregator with all-MiniLM-L6-v2 as its task's model, loads the
//! model files from `/files/{sha256}` into the engine's Web Worker
//! (`www/engine-worker.js`, fedsb-wasm-client on WebGPU) and embeds every
//! input of `shared/engine/tests/fixtures/minilm_embeddings.json`; each
//! coordinate must be within 1e-4 of PyTorch/transformers, as natively
//! (`shared/engine/tests/encoder_minilm_fixture.rs`).
//!
//! WebGPU runs on SwiftShader (Chromium's CPU Vulkan). Needs Chromium
//! (Debian `chromium`), the model (`cargo xtask fetch-model`, or
//! `FEDSB_MODEL_DIR`), the bundle in `www/pkg/` (`cargo xtask build-wasm`)
//! and the `fedsb` binary. Built only with `--features browser`; enabled, a
//! missing piece fails the test.
//!
//! `FEDSB_EMBED_REPEAT=N` embeds the inputs N times and prints each time
//! (the first call also compiles the pipelines); only the first is checked.
//!
//! Run: `cargo xtask build-wasm && cargo build -p fedsb-aggregator --bin fedsb &&
//! cargo test -p fedsb-e2e --features browser --test browser_embed -- --nocapture`
#![cfg(feature = "browser")]

mod browser;

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context};
use browser::Chromium;
use fedsb_e2e::{repo, Aggregator};
use serde_json::Value;

const TOLERANCE: f64 = 1e-4;
/// Longest the whole page run (fetch, upload, all embeddings) may take on SwiftShader.
const RUN_TIMEOUT: Duration = Duration::from_secs(600);

fn task_toml(model: &Path, www: &Path) -> String {
    format!(
        r#"[task]
id = "browser-embed"
rounds = 1
min_participants = 1
max_participants = 1
round_deadline_secs = 600
labels = ["negative", "positive"]
max_seq_len = 128
[model]
id = "all-MiniLM-L6-v2"
dir = {model:?}
[adapter]
rank = 4
[server]
www_dir = {www:?}
"#,
        model = model.display().to_string(),
        www = www.display().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn browser_embeddings_match_transformers() -> anyhow::Result<()> {
    let www = repo().join("www");
    ensure!(
        www.join("pkg/fedsb_wasm_client.js").is_file(),
        "{} is missing: run `cargo xtask build-wasm`",
        www.join("pkg/fedsb_wasm_client.js").display()
    );
    let fixture_path = repo().join("shared/engine/tests/fixtures/minilm_embeddings.json");
    let fixture: Value = serde_json::from_slice(
        &std::fs::read(&fixture_path).with_context(|| fixture_path.display().to_string())?,
    )?;
    let hidden = fixture["hidden_size"].as_u64().context("hidden_size")? as usize;
    let max_length = fixture["max_length"].as_u64().context("max_length")?;
    let entries = fixture["entries"].as_array().context("entries")?;
    let inputs: Vec<Value> = entries
        .iter()
        .map(|e| serde_json::json!({ "text": e["text"], "text_pair": e["text_pair"] }))
        .collect();

    let repeat: u32 = match std::env::var("FEDSB_EMBED_REPEAT") {
        Ok(v) => v.parse().context("FEDSB_EMBED_REPEAT")?,
        Err(_) => 1,
    };
    let aggregator = Aggregator::start(&task_toml(&fedsb_e2e::minilm_dir()?, &www))?;
    let mut chromium = Chromium::launch().await?;
    chromium
        .navigate(&aggregator.url("/tests/embed.html"))
        .await?;
    chromium
        .wait_for(
            "window.__fedsbReady === true",
            Duration::from_millis(200),
            Duration::from_secs(60),
        )
        .await
        .context("the test page did not load")?;
    chromium
        .eval(&format!(
            "window.fedsbEmbed({}, {max_length}, {repeat})",
            Value::Array(inputs)
        ))
        .await?;
    let text = chromium
        .wait_for(
            "window.__fedsbResult && JSON.stringify(window.__fedsbResult)",
            Duration::from_secs(1),
            RUN_TIMEOUT,
        )
        .await?;
    // Bad model bytes reject with a readable error (on the page itself).
    let error = chromium
        .eval(
            r#"import("/pkg/fedsb_wasm_client.js").then(async (m) => {
                await m.default();
                const empty = new Uint8Array(0);
                try {
                    await m.WasmEngine.create(new TextEncoder().encode("{}"), empty, empty);
                    return "resolved";
                } catch (e) {
                    return `${e.constructor.name}: ${e.message}`;
                }
            })"#,
        )
        .await?;
    chromium.close().await;
    let error = error.as_str().unwrap_or("?");
    eprintln!("bad model files: {error}");
    ensure!(
        error.starts_with("Error: cannot load the model"),
        "bad model files gave {error:?}"
    );
    let result: Value = serde_json::from_str(text.as_str().context("result is a string")?)?;
    ensure!(
        result["ok"] == true,
        "the page failed: {}",
        result["error"].as_str().unwrap_or("?")
    );
    let adapter = result["adapter"].as_str().unwrap_or("?");
    eprintln!("WebGPU adapter: {adapter}");
    ensure!(
        result["hiddenSize"] == hidden,
        "hidden size {}",
        result["hiddenSize"]
    );
    let got: Vec<f64> = result["embeddings"]
        .as_array()
        .context("embeddings")?
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NAN))
        .collect();
    ensure!(
        got.len() == entries.len() * hidden,
        "{} values for {} inputs of {hidden}",
        got.len(),
        entries.len()
    );
    let mut worst = 0.0f64;
    for (n, e) in entries.iter().enumerate() {
        let expected = e["embedding"].as_array().context("embedding")?;
        for (k, theirs) in expected.iter().enumerate() {
            let theirs = theirs.as_f64().context("number")?;
            let ours = got[n * hidden + k];
            let diff = (ours - theirs).abs();
            ensure!(
                diff <= TOLERANCE,
                "{:?}: coordinate {k}: browser {ours}, transformers {theirs}, difference {diff}",
                e["text"]
            );
            worst = worst.max(diff);
        }
    }
    eprintln!(
        "{} inputs on {adapter}: largest difference {worst:.2e}; fetch {:.0} ms, engine creation {:.0} ms, embedding {} ms",
        entries.len(),
        result["fetchMs"].as_f64().unwrap_or(f64::NAN),
        result["createMs"].as_f64().unwrap_or(f64::NAN),
        result["embedMs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| format!("{:.0}", t.as_f64().unwrap_or(f64::NAN)))
            .collect::<Vec<_>>()
            .join(", "),
    );
    Ok(())
}
