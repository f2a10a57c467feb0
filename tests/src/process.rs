//! Running `fedsb` subcommands from tests: success checks that show the
//! output, the last JSON line a command prints, waiting on a child without
//! blocking the async runtime, `fedsb init` on a task directory, and
//! starting `fedsb join` participants.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::tiny_model::LABELS;
use crate::{fedsb_bin, Aggregator};

/// Fails with the command's stdout and stderr unless it exited with 0.
pub fn check_success(what: &str, out: &Output) -> anyhow::Result<()> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The last non-empty line of stdout, parsed as JSON.
pub fn last_json_line(out: &Output) -> anyhow::Result<serde_json::Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| {
            format!(
                "no output on stdout; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    serde_json::from_str(line).with_context(|| format!("last stdout line is not JSON: {line}"))
}

/// Waits for a child without blocking the async runtime, killing it after `limit`.
pub async fn wait_child(mut child: Child, limit: Duration) -> anyhow::Result<Output> {
    let started = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(tokio::task::spawn_blocking(move || child.wait_with_output()).await??);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await??;
            bail!(
                "process still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fedsb init` of a task directory: the model in `dir/model`, the seed data
/// `dir/seed.tsv`, the classes [`LABELS`], rank `rank`, then `args`; writes
/// `dir/adapter.safetensors` and returns the command's JSON report.
pub fn fedsb_init(dir: &Path, rank: u32, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = Command::new(fedsb_bin())
        .arg("init")
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--train")
        .arg(dir.join("seed.tsv"))
        .args(["--labels", &LABELS.join(",")])
        .args(["--rank", &rank.to_string()])
        .args(args)
        .arg("--out")
        .arg(dir.join("adapter.safetensors"))
        .env("RUST_LOG", "info")
        .output()
        .context("running fedsb init")?;
    check_success("fedsb init", &out)?;
    last_json_line(&out)
}

/// Starts `fedsb join` against `agg` as participant `name` on `dir/data`
/// (an absolute `data` is taken as it is), with its own cache directory
/// `dir/cache-<name>` (the cache also holds its privacy ledger), then
/// `extra` flags (`--seed`, `--max-rounds`, …). It logs at `info`; stdout
/// and stderr are piped, for [`wait_child`].
pub fn spawn_join(
    dir: &Path,
    agg: &Aggregator,
    data: impl AsRef<Path>,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<Child> {
    Command::new(fedsb_bin())
        .arg("join")
        .args(["--server", &agg.url("")])
        .arg("--data")
        .arg(dir.join(data))
        .arg("--cache-dir")
        .arg(dir.join(format!("cache-{name}")))
        .args(["--name", name])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning fedsb join")
}
