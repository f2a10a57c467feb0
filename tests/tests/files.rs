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

/// A served file that changes on disk while the server runs is no longer
/// served under its startup hash (clients would cache the new bytes as the
/// old, immutable ones): 500 with a JSON error naming it, until it is
/// restored.
#[tokio::test]
async fn a_file_changed_on_disk_is_not_served_under_its_old_hash() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let model = dir.path().join("model");
    std::fs::create_dir(&model)?;
    std::fs::write(
        model.join("config.json"),
        r#"{"hidden_size": 8, "num_hidden_layers": 2}"#,
    )?;
    std::fs::write(model.join("model.safetensors"), vec![7u8; 1000])?;
    std::fs::write(model.join("tokenizer.json"), "{}")?;
    let config = test_config(1, 1, 1, 60, "")
        .replace("hidden_size = 8\nnum_layers = 2\n", "dir = \"model\"\n");
    std::fs::write(dir.path().join("task.toml"), config)?;
    let agg = Aggregator::start_in(dir.path())?;
    let task = agg.json("/api/task").await?;
    let url = |name: &str| {
        let f = task["files"]
            .as_array()
            .and_then(|files| files.iter().find(|f| f["name"] == name))
            .and_then(|f| f["url"].as_str())
            .map(|u| agg.url(u));
        f.unwrap_or_default()
    };
    let r = reqwest::get(url("model.safetensors")).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await?.len(), 1000);

    std::fs::write(model.join("model.safetensors"), vec![8u8; 1001])?;
    let r = reqwest::get(url("model.safetensors")).await?;
    assert_eq!(r.status(), 500);
    assert!(!r.headers().contains_key("etag"));
    let body: serde_json::Value = r.json().await?;
    let err = body["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("model.safetensors changed on the server since it started"),
        "{body}"
    );
    assert_eq!(reqwest::get(url("model.safetensors")).await?.status(), 500);
    // Each refusal is counted for an alert.
    assert_eq!(agg.metric("fedsb_file_errors_total").await?, 2.0);
    // The files that did not change are still served.
    assert_eq!(reqwest::get(url("tokenizer.json")).await?.status(), 200);
    // Restored (with a new modification time), it is served again.
    std::fs::write(model.join("model.safetensors"), vec![7u8; 1000])?;
    let r = reqwest::get(url("model.safetensors")).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await?.as_ref(), &[7u8; 1000][..]);
    Ok(())
}

/// A HEAD request describes the next demo shard without handing it out.
#[tokio::test]
async fn a_head_request_does_not_hand_out_a_demo_shard() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(
        dir.path().join("demo.tsv"),
        "sentence\tlabel\nr0\t0\nr1\t1\nr2\t0\n",
    )?;
    let config = format!(
        "{}[demo]\ndata = \"demo.tsv\"\nshard_rows = 1\n",
        test_config(1, 1, 1, 60, "")
    );
    std::fs::write(dir.path().join("task.toml"), config)?;
    let agg = Aggregator::start_in(dir.path())?;
    let client = reqwest::Client::new();
    for _ in 0..2 {
        let r = client.head(agg.url("/api/demo-shard")).send().await?;
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-disposition"],
            "attachment; filename=\"demo-shard-0.tsv\""
        );
    }
    let r = reqwest::get(agg.url("/api/demo-shard")).await?;
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"demo-shard-0.tsv\""
    );
    assert_eq!(r.text().await?, "sentence\tlabel\nr0\t0\n");
    let r = reqwest::get(agg.url("/api/demo-shard")).await?;
    assert_eq!(r.text().await?, "sentence\tlabel\nr1\t1\n");
    Ok(())
}

/// A `--www-dir` (or `[server] www_dir`) that does not exist is refused,
/// naming it, and nothing is written; a page without its WebAssembly
/// bundle starts with a warning saying how to build it.
#[test]
fn a_missing_www_dir_is_refused_and_a_page_without_its_bundle_warns() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("task.toml"), test_config(1, 1, 1, 60, ""))?;
    let serve = |www: &std::path::Path| {
        let mut cmd = Command::new(fedsb_bin());
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.path().join("task.toml"))
            .args(["--port", "0", "--bind", "127.0.0.1", "--state-dir"])
            .arg(dir.path().join("state"))
            .arg("--www-dir")
            .arg(www)
            .env("RUST_LOG", "warn");
        cmd
    };
    let missing = dir.path().join("no-such-www");
    let out = serve(&missing).output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("www_dir {} is not a directory", missing.display())),
        "{err}"
    );
    assert!(!dir.path().join("state/e2e.sqlite3").exists());

    let www = dir.path().join("www");
    std::fs::create_dir(&www)?;
    std::fs::write(www.join("index.html"), "<html></html>")?;
    let mut child = serve(&www)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let warned = loop {
        match rx.recv_timeout(std::time::Duration::from_secs(30)) {
            Ok(line) if line.contains("cargo xtask build-wasm") => break Some(line),
            Ok(line) => seen.push(line),
            Err(_) => break None,
        }
    };
    let running = child.try_wait()?.is_none();
    let _ = child.kill();
    let _ = child.wait();
    let warned = warned.unwrap_or_else(|| panic!("no warning; stderr:\n{}", seen.join("\n")));
    assert!(warned.contains("pkg/fedsb_wasm_client.js"), "{warned}");
    assert!(running, "the server did not start");
    Ok(())
}

/// An adapter file whose frozen A or B is missing or misshapen is refused
/// at start, naming the tensor: the aggregator reads only R₀ and the head,
/// but no participant could train with it.
#[tokio::test]
async fn an_adapter_file_without_a_and_b_is_refused_at_start() -> anyhow::Result<()> {
    use fedsb_e2e::tiny_model::{labelled_tsv, write_tiny_model};
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    write_tiny_model(&d.join("model"), 3)?;
    std::fs::write(d.join("seed.tsv"), labelled_tsv(16, 1, 0.5))?;
    fedsb_e2e::process::fedsb_init(d, 4, &["--init-samples", "8", "--batch", "8"])?;
    let adapter = d.join("adapter.safetensors");
    let bytes = std::fs::read(&adapter)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let dropped = "encoder.layer.1.output.dense.lora_A";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != dropped)
        .collect();
    std::fs::write(
        d.join("no-a.safetensors"),
        safetensors::serialize(kept, None)?,
    )?;
    let config = "[task]\nid = \"frozen\"\nrounds = 1\nmin_participants = 1\n\
                  max_participants = 1\nround_deadline_secs = 60\n\
                  labels = [\"negative\", \"positive\"]\nmax_seq_len = 16\n\
                  [model]\nid = \"tiny\"\ndir = \"model\"\n\
                  [adapter]\nrank = 4\nfile = \"no-a.safetensors\"\n";
    std::fs::write(d.join("task.toml"), config)?;
    // A server that started would run on: wait for its exit with a limit.
    let child = std::process::Command::new(fedsb_bin())
        .args(["serve", "--port", "0", "--config"])
        .arg(d.join("task.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let out = fedsb_e2e::process::wait_child(child, std::time::Duration::from_secs(60)).await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("it has no tensor {dropped}")),
        "{err}"
    );
    assert!(!d.join("state/frozen.sqlite3").exists(), "{err}");
    Ok(())
}
