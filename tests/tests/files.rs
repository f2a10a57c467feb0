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

#[tokio::test]
async fn demo_shards_are_handed_out_round_robin_with_the_header() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("demo.tsv"),
        "sentence\tlabel\nr0\t0\nr1\t1\n\nr2\t0\nr3\t1\nr4\t0\n",
    )?;
    let config = format!(
        "{}[demo]\ndata = \"demo.tsv\"\nshard_rows = 2\n",
        test_config(1, 1, 1, 60, "")
    );
    std::fs::write(dir.path().join("task.toml"), config)?;
    let agg = Aggregator::start_in(dir.path())?;
    let info = agg.json("/api/demo").await?;
    assert_eq!(info["enabled"], true, "{info}");
    assert_eq!(info["shard_rows"], 2, "{info}");
    assert_eq!(info["rows"], 5, "{info}");
    let mut shards = Vec::new();
    for k in 0..3 {
        let r = reqwest::get(agg.url("/api/demo-shard")).await?;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-disposition"],
            format!("attachment; filename=\"demo-shard-{k}.tsv\"").as_str()
        );
        shards.push(r.text().await?);
    }
    // Consecutive rows, the blank line skipped, wrapping at the end.
    assert_eq!(shards[0], "sentence\tlabel\nr0\t0\nr1\t1\n");
    assert_eq!(shards[1], "sentence\tlabel\nr2\t0\nr3\t1\n");
    assert_eq!(shards[2], "sentence\tlabel\nr4\t0\nr0\t0\n");
    Ok(())
}

#[tokio::test]
async fn a_task_without_demo_data_says_so() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(1, 1, 1, 60, ""))?;
    assert_eq!(agg.json("/api/demo").await?["enabled"], false);
    let r = reqwest::get(agg.url("/api/demo-shard")).await?;
    assert_eq!(r.status(), 404);
    let body = r.text().await?;
    assert!(body.contains("[demo] data is not set"), "{body}");
    Ok(())
}

#[test]
fn unreadable_demo_data_stops_the_server_with_its_name() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("demo.txt"), "a\nb\n")?;
    let config = format!(
        "{}[demo]\ndata = \"demo.txt\"\n",
        test_config(1, 1, 1, 60, "")
    );
    std::fs::write(dir.path().join("task.toml"), config)?;
    let out = std::process::Command::new(fedsb_bin())
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("task.toml"))
        .args(["--port", "0", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("demo.txt") && stderr.contains("unknown extension"),
        "{stderr}"
    );
    Ok(())
}
