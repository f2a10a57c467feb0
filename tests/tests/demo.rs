//! `cargo xtask demo`'s task as it ships: `configs/sst2-demo.toml` with
//! all-MiniLM-L6-v2 and the adapter the demo makes, unchanged but for its
//! paths. The README's first command must work for everyone who tries
//! fedsb, so its configuration, page, demo shards and evaluation are run
//! here with a real participant, not only read.
//!
//! Needs the model (`cargo xtask fetch-model`) and SST-2 (`cargo xtask
//! fetch-data`); `cargo xtask test` fetches both.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use fedsb_e2e::process::{check_success, last_json_line, spawn_join, wait_child};
use fedsb_e2e::*;

/// The demo task starts on the shipped configuration, serves the page and
/// 200-row demo shards, evaluates its initial model on 200 dev sentences,
/// and a `fedsb join` given a demo shard trains round 1 (20 steps of 32, as
/// the demo asks), which commits with its update and is evaluated above
/// the initial model.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_task_serves_its_page_and_shards_and_trains_a_round() -> anyhow::Result<()> {
    let model = minilm_dir()?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let adapter = dir.join("sst2-demo-adapter.safetensors");
    let started = Instant::now();
    make_demo_adapter(&model, &adapter)?;
    eprintln!("demo adapter made in {:.1?}", started.elapsed());
    std::fs::write(
        dir.join("task.toml"),
        demo_config(dir, &model, &adapter, &[])?,
    )?;
    let agg = Aggregator::start_in(dir)?;

    let status = agg.json("/api/status").await?;
    ensure!(
        status["task_id"] == "sst2-demo" && status["round"] == 1 && status["total_rounds"] == 30,
        "{status}"
    );
    let page = reqwest::get(agg.url("/")).await?;
    ensure!(page.status().is_success(), "GET /: {}", page.status());
    // The page may talk to its own origin only (tested in a browser in
    // browser_participant.rs).
    let policy = page
        .headers()
        .get("content-security-policy")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    ensure!(
        policy.contains("connect-src 'self'")
            && policy.contains("script-src 'self' 'wasm-unsafe-eval'"),
        "GET / has the policy {policy:?}"
    );
    let page = page.text().await?;
    ensure!(
        page.contains("<title>fedsb") && page.contains("id=\"join-button\""),
        "GET / is not the page: {}",
        &page[..page.len().min(300)]
    );
    let task = agg.json("/api/task").await?;
    ensure!(
        task.to_string()
            .contains("sentence-transformers/all-MiniLM-L6-v2"),
        "{task}"
    );

    // A volunteer without data of their own takes a demo shard.
    let shard = reqwest::get(agg.url("/api/demo-shard")).await?;
    ensure!(
        shard.status().is_success(),
        "GET /api/demo-shard: {}",
        shard.status()
    );
    let shard = shard.text().await?;
    let rows = shard.lines().filter(|l| !l.trim().is_empty()).count();
    ensure!(
        rows == 201 && shard.starts_with("sentence\tlabel"),
        "a shard of {rows} lines: {}",
        &shard[..shard.len().min(200)]
    );
    std::fs::write(dir.join("shard.tsv"), &shard)?;

    let join = spawn_join(
        dir,
        &agg,
        "shard.tsv",
        "volunteer",
        &["--max-rounds", "1", "--seed", "1"],
    )?;
    let out = wait_child(join, Duration::from_secs(900)).await?;
    check_success("fedsb join", &out)?;
    let report = last_json_line(&out)?;
    // 20 steps of at most 32: each pass over the 200 rows ends with a batch
    // of 8.
    ensure!(
        report["rounds"] == serde_json::json!([1])
            && report["steps"] == 20
            && report["samples"] == 2 * 200 + 6 * 32,
        "{report}"
    );

    let started = Instant::now();
    let rounds = loop {
        let list = agg.json("/api/rounds").await?;
        let list = list.as_array().context("/api/rounds")?.clone();
        if list.len() == 2 && list.iter().all(|r| !r["eval"].is_null()) {
            break list;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(300),
            "round 1 not committed and evaluated with round 0: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    ensure!(
        rounds[1]["participants"] == 1 && rounds[1]["total_samples"] == report["samples"],
        "{}",
        rounds[1]
    );
    for r in &rounds {
        let (accuracy, examples) = (&r["eval"]["accuracy"], &r["eval"]["samples"]);
        ensure!(
            accuracy.as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)) && examples == 200,
            "round {}: {}",
            r["round"],
            r["eval"]
        );
    }
    let (before, after) = (
        &rounds[0]["eval"]["accuracy"],
        &rounds[1]["eval"]["accuracy"],
    );
    eprintln!("accuracy on 200 dev sentences: {before} at round 0, {after} after round 1");
    // One round of the demo's training already helps (58 % → 73 % here).
    ensure!(
        after.as_f64() > before.as_f64(),
        "round 1 did not raise the accuracy: {before} → {after}"
    );
    Ok(())
}
