//! Model files are served by content hash with immutable caching headers, so
//! a participant's second visit downloads nothing.

use fedsb_e2e::*;

/// SHA-256 via coreutils' `sha256sum`, independent of the server's code.
fn sha256_hex(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn model_files_are_served_by_hash_with_caching_headers() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    std::fs::write(
        model.join("config.json"),
        r#"{"hidden_size": 8, "num_hidden_layers": 2}"#,
    )?;
    std::fs::write(model.join("model.safetensors"), vec![7u8; 100_000])?;
    std::fs::write(model.join("tokenizer.json"), "{}")?;
    let config = test_config(1, 1, 1, 60, "")
        .replace("hidden_size = 8\nnum_layers = 2\n", "dir = \"model\"\n");
    std::fs::write(dir.path().join("task.toml"), config)?;
    let agg = Aggregator::start_in(dir.path())?;

    let task = agg.json("/api/task").await?;
    let expected = sha256_hex(&model.join("model.safetensors"));
    assert_eq!(task["model_sha256"], expected.as_str());
    let files = task["files"].as_array().unwrap();
    assert_eq!(files.len(), 3);
    let f = files
        .iter()
        .find(|f| f["name"] == "model.safetensors")
        .unwrap();
    assert_eq!(f["size"], 100_000);
    let url = agg.url(f["url"].as_str().unwrap());

    let r = reqwest::get(&url).await?;
    assert_eq!(r.status(), 200);
    let etag = r.headers()["etag"].to_str()?.to_owned();
    assert_eq!(etag, format!("\"{expected}\""));
    assert!(r.headers()["cache-control"].to_str()?.contains("immutable"));
    assert_eq!(r.bytes().await?.len(), 100_000);

    let r = reqwest::Client::new()
        .get(&url)
        .header("if-none-match", &etag)
        .send()
        .await?;
    assert_eq!(r.status(), 304);
    assert!(r.bytes().await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn a_wrong_model_hash_is_refused_at_start() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    std::fs::write(
        model.join("config.json"),
        r#"{"hidden_size": 8, "num_hidden_layers": 2}"#,
    )?;
    std::fs::write(model.join("model.safetensors"), b"weights")?;
    std::fs::write(model.join("tokenizer.json"), "{}")?;
    let config = test_config(1, 1, 1, 60, "").replace(
        "hidden_size = 8\nnum_layers = 2\n",
        &format!("dir = \"model\"\nsha256 = \"{}\"\n", "0".repeat(64)),
    );
    std::fs::write(dir.path().join("task.toml"), config)?;
    let out = std::process::Command::new(fedsb_bin())
        .args(["serve", "--port", "0", "--config"])
        .arg(dir.path().join("task.toml"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors has SHA-256"), "{err}");
    Ok(())
}
