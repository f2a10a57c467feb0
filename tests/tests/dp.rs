//! Differential privacy end to end: `fedsb serve` runs a task with
//! `[privacy] enabled = true`, and real `fedsb join` processes train it with
//! DP-SGD on the GPU (lavapipe here) on a tiny random BERT:
//! - rounds commit, every update carries a privacy report, and `/api/status`
//!   shows each participant's ε, > 0 and within the task's target;
//! - a participant that spread its budget over fewer rounds (`--dp-rounds 1`)
//!   refuses to train past it, says so, and leaves cleanly; the task goes on;
//! - `fedsb train` with DP reports the ε it spent and writes its adapter;
//! - each participant's ε in `/api/status` is stored with the committed
//!   rounds and is the same after the aggregator restarts (`kill -9`).
//!
//! A missing GPU adapter fails these tests.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use fedsb_e2e::process::{check_success, fedsb_init, last_json_line, spawn_join, wait_child};
use fedsb_e2e::tiny_model::{labelled_tsv, write_tiny_model, LABELS};
use fedsb_e2e::*;

const ROUNDS: u64 = 3;
const RANK: u32 = 4;
const EPSILON: f64 = 3.0;
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Tiny model, seed data, two participants' data, the adapter from `fedsb init`.
fn task_dir() -> anyhow::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_tiny_model(&dir.join("model"), 11)?;
    std::fs::write(dir.join("seed.tsv"), labelled_tsv(48, 1, 0.5))?;
    std::fs::write(dir.join("a.tsv"), labelled_tsv(40, 2, 0.3))?;
    std::fs::write(dir.join("b.tsv"), labelled_tsv(56, 3, 0.7))?;
    std::fs::write(dir.join("eval.tsv"), labelled_tsv(24, 4, 0.5))?;
    fedsb_init(
        dir,
        RANK,
        &["--init-samples", "32", "--batch", "8", "--lr", "0.01"],
    )?;
    Ok(tmp)
}

fn write_config(dir: &Path, min_participants: u32, epsilon: f64) -> anyhow::Result<()> {
    let config = format!(
        r#"[task]
id = "dp-task"
rounds = {ROUNDS}
min_participants = {min_participants}
max_participants = 2
round_deadline_secs = 600
labels = ["{}", "{}"]
local_steps = 4
batch_size = 8
learning_rate = 0.01
max_seq_len = 16
[model]
id = "tiny-random-bert"
dir = "model"
[adapter]
rank = {RANK}
file = "adapter.safetensors"
[privacy]
enabled = true
epsilon = {epsilon}
delta = 1e-5
clip_norm = 1.0
[server]
ping_interval_secs = 1
idle_timeout_secs = 60
"#,
        LABELS[0], LABELS[1]
    );
    std::fs::write(dir.join("task.toml"), config)?;
    Ok(())
}

/// The `/api/status` privacy entries, by client name suffix.
fn privacy_of<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["privacy"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|p| p["client"].as_str().is_some_and(|c| c.ends_with(name)))
        })
        .unwrap_or_else(|| panic!("no privacy entry for {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_task_commits_rounds_and_reports_epsilon_per_participant() -> anyhow::Result<()> {
    let tmp = task_dir()?;
    let dir = tmp.path();
    write_config(dir, 2, EPSILON)?;
    let mut agg = Aggregator::start_in(dir)?;
    let task = agg.json("/api/task").await?;
    assert_eq!(task["privacy"]["epsilon"], EPSILON, "{task}");

    let a = spawn_join(dir, &agg, "a.tsv", "a", &[])?;
    let b = spawn_join(dir, &agg, "b.tsv", "b", &["--accountant", "rdp"])?;
    let (a, b) = tokio::join!(wait_child(a, JOIN_TIMEOUT), wait_child(b, JOIN_TIMEOUT));
    let (a, b) = (a?, b?);
    for (name, out, n) in [("a", &a, 40.0), ("b", &b, 56.0)] {
        check_success(&format!("fedsb join ({name})"), out)?;
        eprintln!(
            "--- fedsb join ({name}) stderr\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report = last_json_line(out)?;
        assert_eq!(report["finished"], true, "{name}: {report}");
        assert_eq!(report["rounds_participated"], ROUNDS, "{name}: {report}");
        assert_eq!(report["budget_exhausted"], false, "{name}: {report}");
        let eps = report["epsilon_spent"].as_f64().context("epsilon_spent")?;
        assert!(eps > 0.0 && eps <= EPSILON, "{name}: ε {eps}");
        // σ was calibrated for all 3 × 4 steps: they spend nearly all of ε.
        assert!(
            eps > 0.9 * EPSILON,
            "{name}: ε {eps} (calibration too loose)"
        );
        let q = report["sample_rate"].as_f64().context("sample_rate")?;
        assert!((q - 8.0 / n).abs() < 1e-12, "{name}: q {q}");
        // Updates are weighted by the expected samples q·N = 8 per step, not
        // by the Poisson batch sizes.
        assert_eq!(report["samples"], ROUNDS * 4 * 8, "{name}: {report}");
        assert!(report["noise_multiplier"].as_f64().unwrap_or(0.0) > 0.0);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("DP-SGD"), "{name}: {stderr}");
    }

    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(
        rounds.as_array().map(Vec::len),
        Some(ROUNDS as usize + 1),
        "{rounds}"
    );
    for r in &rounds.as_array().unwrap()[1..] {
        assert_eq!(r["participants"], 2, "{r}");
    }
    let status = agg.json("/api/status").await?;
    assert_eq!(status["state"], "finished", "{status}");
    assert_eq!(
        status["privacy"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    for name in ["a", "b"] {
        let p = privacy_of(&status, name);
        let eps = p["epsilon_spent"].as_f64().context("epsilon_spent")?;
        assert!(eps > 0.0 && eps <= EPSILON, "{name}: {p}");
        // Every accepted update carried a report.
        assert_eq!(p["updates"], ROUNDS, "{name}: {p}");
        assert_eq!(p["steps"], ROUNDS * 4, "{name}: {p}");
        assert_eq!(p["clip_norm"], 1.0, "{name}: {p}");
        assert_eq!(p["delta"], 1e-5, "{name}: {p}");
        assert_eq!(p["last_round"], ROUNDS, "{name}: {p}");
        // The aggregator's own account of the accepted steps: the same
        // PLD as a's ledger of the same steps; below b's looser RDP bound.
        let accounted = p["epsilon_accounted"]
            .as_f64()
            .context("epsilon_accounted")?;
        if name == "a" {
            assert_eq!(accounted, eps, "{name}: {p}");
        } else {
            assert!(accounted > 0.0 && accounted < eps, "{name}: {p}");
        }
    }

    // The exported model of each round names the largest ε any participant
    // had spent by then, as reported and as the aggregator accounts it: at
    // the last round, the larger of the two entries of each.
    let metadata_of = |bytes: &[u8]| -> anyhow::Result<std::collections::HashMap<String, String>> {
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes)?;
        header.metadata().clone().context("no metadata")
    };
    let mut last_eps = 0.0;
    let mut last_accounted = 0.0;
    for n in 1..=ROUNDS {
        let r = reqwest::get(agg.url(&format!("/api/rounds/{n}/adapter"))).await?;
        assert_eq!(r.status(), 200);
        let meta = metadata_of(&r.bytes().await?)?;
        let eps: f64 = meta["dp_epsilon_max"].parse()?;
        assert!(eps > last_eps, "round {n}: {meta:?} after ε = {last_eps}");
        let accounted: f64 = meta["dp_epsilon_accounted_max"].parse()?;
        assert!(
            accounted > last_accounted && accounted <= EPSILON * (1.0 + 1e-3),
            "round {n}: {meta:?} after ε = {last_accounted}"
        );
        assert_eq!(meta["dp_delta"], "0.00001", "{meta:?}");
        assert_eq!(meta["dp_participants"], "2", "{meta:?}");
        last_eps = eps;
        last_accounted = accounted;
    }
    let most = |key: &str| {
        ["a", "b"]
            .iter()
            .map(|n| privacy_of(&status, n)[key].as_f64().unwrap_or(0.0))
            .fold(0.0, f64::max)
    };
    // serde_json's default float parsing may miss the last bit.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-15 * b.abs();
    assert!(
        close(last_eps, most("epsilon_spent")),
        "{last_eps} {status}"
    );
    assert!(
        close(last_accounted, most("epsilon_accounted")),
        "{last_accounted} {status}"
    );

    // A crash and a restart on the same state directory: each participant's
    // spending is read back from the store, unchanged.
    agg.kill9();
    let agg = Aggregator::start_in(dir)?;
    let after = agg.json("/api/status").await?;
    assert_eq!(after["state"], "finished", "{after}");
    assert_eq!(
        after["privacy"].as_array().map(Vec::len),
        Some(2),
        "{after}"
    );
    for name in ["a", "b"] {
        let (before, restored) = (privacy_of(&status, name), privacy_of(&after, name));
        let eps = restored["epsilon_spent"]
            .as_f64()
            .context("epsilon_spent")?;
        assert!(eps > 0.0, "{name}: {restored}");
        assert_eq!(
            restored["epsilon_spent"], before["epsilon_spent"],
            "{name}: {restored} vs {before}"
        );
        assert_eq!(restored["connected"], false, "{name}: {restored}");
        assert_eq!(
            without_connected(restored),
            without_connected(before),
            "{name}"
        );
    }

    // `fedsb export` names both in its JSON line, as in the file.
    let out = Command::new(fedsb_bin())
        .args(["export", "--config"])
        .arg(dir.join("task.toml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--out")
        .arg(dir.join("exported.safetensors"))
        .output()?;
    check_success("fedsb export", &out)?;
    let line = last_json_line(&out)?;
    let number = |key: &str| line[key].as_f64().unwrap_or(f64::NAN);
    assert!(close(number("dp_epsilon_max"), last_eps), "{line}");
    assert!(
        close(number("dp_epsilon_accounted_max"), last_accounted),
        "{line}"
    );
    let meta = metadata_of(&std::fs::read(dir.join("exported.safetensors"))?)?;
    assert_eq!(
        meta["dp_epsilon_accounted_max"].parse::<f64>()?,
        last_accounted
    );
    Ok(())
}

/// `/api/status` once `ready` holds for it (the coordinator publishes its
/// status after it has answered the command that changed it).
async fn status_when(
    agg: &Aggregator,
    ready: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = agg.json("/api/status").await?;
        if ready(&status) {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            bail!("/api/status never got there: {status}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A privacy entry without its `connected` flag (which a restart resets).
fn without_connected(p: &serde_json::Value) -> serde_json::Value {
    let mut p = p.clone();
    if let Some(o) = p.as_object_mut() {
        o.remove("connected");
    }
    p
}

/// Scripted participants on a DP task: two rounds commit with their reports,
/// a third update is accepted but its round has not committed when the
/// aggregator is killed. The restarted one shows each participant's spending
/// exactly as before: the reports stored with rounds 1 and 2, and p's report
/// of round 3, whose update is back in the reopened round. p, joining again
/// with its participant key, keeps its id and entry; a participant without a
/// key gets a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privacy_spending_is_restored_after_a_restart() -> anyhow::Result<()> {
    use fedsb_protocol::{PrivacyReport, RoundId, ServerMessage};
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    std::fs::write(
        dir.join("task.toml"),
        test_config(3, 2, 2, 600, "")
            + "[privacy]\nenabled = true\nepsilon = 5.0\ndelta = 1e-5\nclip_norm = 0.5\n",
    )?;
    let mut agg = Aggregator::start_in(dir)?;
    const KEY_P: &str = "scripted-p-key-0123456789";
    let (mut p, _) = Participant::join_as(agg.addr, "scripted-p", Some(KEY_P)).await?;
    let (mut q, _) = Participant::join(agg.addr, "scripted-q").await?;
    let report = |sigma: f64, steps: u64, epsilon_spent: f64| PrivacyReport {
        noise_multiplier: sigma,
        sample_rate: 0.125,
        steps,
        clip_norm: 0.5,
        delta: 1e-5,
        epsilon_spent,
    };
    let sent = [
        [report(1.5, 4, 0.375), report(1.25, 3, 0.5)],
        [report(1.5, 4, 0.625), report(1.25, 5, 0.875)],
    ];
    for (i, reports) in sent.iter().enumerate() {
        let round = RoundId(i as u64 + 1);
        for (j, (c, r)) in [&mut p, &mut q].into_iter().zip(reports).enumerate() {
            assert_eq!(c.wait_round_open().await?, round);
            let mut u = update(
                round,
                10,
                known_state(&TEST_SHAPE, 10 * i as u64 + j as u64),
            );
            u.privacy = Some(r.clone());
            assert_eq!(c.submit(u).await?, ServerMessage::UpdateAccepted { round });
        }
        p.wait_global(round).await?;
        q.wait_global(round).await?;
    }
    let committed = status_when(&agg, |s| {
        s["round"] == 3
            && s["privacy"]
                .as_array()
                .is_some_and(|a| a.len() == 2 && a.iter().all(|e| e["updates"] == 2))
    })
    .await?;
    // Round 3: p's update is accepted, but the round waits for q.
    assert_eq!(p.wait_round_open().await?, RoundId(3));
    let mut u = update(RoundId(3), 10, known_state(&TEST_SHAPE, 99));
    u.privacy = Some(report(1.5, 4, 0.75));
    assert_eq!(
        p.submit(u).await?,
        ServerMessage::UpdateAccepted { round: RoundId(3) }
    );
    // Shown while this aggregator runs, before round 3 commits.
    status_when(&agg, |s| s["updates_in_round"] == 1).await?;
    let live = agg.json("/api/status").await?;
    assert_eq!(
        privacy_of(&live, "scripted-p")["epsilon_spent"],
        0.75,
        "{live}"
    );

    agg.kill9();
    drop((p, q));
    let agg = Aggregator::start_in(dir)?;
    let status = agg.json("/api/status").await?;
    assert_eq!(status["round"], 3, "{status}");
    assert_eq!(status["updates_in_round"], 1, "{status}");
    assert_eq!(
        status["privacy"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    // q: as committed with round 2.
    let e = privacy_of(&status, "scripted-q");
    assert_eq!(e["epsilon_spent"], sent[1][1].epsilon_spent, "{e}");
    assert_eq!(e["noise_multiplier"], sent[1][1].noise_multiplier, "{e}");
    assert_eq!(e["steps"], sent[0][1].steps + sent[1][1].steps, "{e}");
    assert_eq!(e["updates"], 2, "{e}");
    assert_eq!(e["last_round"], 2, "{e}");
    assert_eq!(e["connected"], false, "{e}");
    assert_eq!(
        without_connected(e),
        without_connected(privacy_of(&committed, "scripted-q"))
    );
    // p: with its round-3 report, exactly as the live aggregator showed it.
    let e = privacy_of(&status, "scripted-p");
    assert_eq!(e["epsilon_spent"], 0.75, "{e}");
    assert_eq!(e["noise_multiplier"], 1.5, "{e}");
    assert_eq!(e["sample_rate"], 0.125, "{e}");
    assert_eq!(e["delta"], 1e-5, "{e}");
    assert_eq!(e["clip_norm"], 0.5, "{e}");
    assert_eq!(e["steps"], 12, "{e}");
    assert_eq!(e["updates"], 3, "{e}");
    assert_eq!(e["last_round"], 3, "{e}");
    assert_eq!(e["connected"], false, "{e}");
    // The aggregator's own ε of those 12 steps, accounted again at start.
    assert!(
        e["epsilon_accounted"].as_f64().is_some_and(|a| a > 0.0),
        "{e}"
    );
    assert_eq!(
        without_connected(e),
        without_connected(privacy_of(&live, "scripted-p"))
    );

    // p joins again with its key: the same entry, connected, and its round-3
    // update is in.
    let (mut p, _) = Participant::join_as(agg.addr, "scripted-p", Some(KEY_P)).await?;
    assert_eq!(
        p.recv_until(|m| match m {
            ServerMessage::UpdateAccepted { round } => Some(*round),
            _ => None,
        })
        .await?,
        RoundId(3)
    );
    let status = status_when(&agg, |s| s["participants_connected"] == 1).await?;
    let e = privacy_of(&status, "scripted-p");
    assert_eq!(e["connected"], true, "{e}");
    assert_eq!(e["updates"], 3, "{e}");

    // A participant without a key that joins after the restart gets a new
    // entry; the restored ones stay.
    let (mut r, _) = Participant::join(agg.addr, "scripted-r").await?;
    assert_eq!(r.wait_round_open().await?, RoundId(3));
    let mut u = update(RoundId(3), 10, known_state(&TEST_SHAPE, 7));
    u.privacy = Some(report(2.0, 2, 0.25));
    assert_eq!(
        r.submit(u).await?,
        ServerMessage::UpdateAccepted { round: RoundId(3) }
    );
    // p's restored update and r's complete round 3.
    p.wait_global(RoundId(3)).await?;
    let status = status_when(&agg, |s| s["last_committed_round"] == 3).await?;
    assert_eq!(
        status["privacy"].as_array().map(Vec::len),
        Some(3),
        "{status}"
    );
    assert_eq!(privacy_of(&status, "scripted-r")["epsilon_spent"], 0.25);
    assert_eq!(privacy_of(&status, "scripted-p")["epsilon_spent"], 0.75);
    assert_eq!(privacy_of(&status, "scripted-p")["updates"], 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_stops_when_its_budget_is_spent() -> anyhow::Result<()> {
    let tmp = task_dir()?;
    let dir = tmp.path();
    write_config(dir, 1, EPSILON)?;
    let agg = Aggregator::start_in(dir)?;
    // The whole budget on one round: less noise, but round 2 would exceed it.
    let child = spawn_join(dir, &agg, "a.tsv", "a", &["--dp-rounds", "1"])?;
    let out = wait_child(child, JOIN_TIMEOUT).await?;
    check_success("fedsb join --dp-rounds 1", &out)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("privacy budget exhausted") && stderr.contains("stops here"),
        "the participant must say why it stops: {stderr}"
    );
    let report = last_json_line(&out)?;
    assert_eq!(report["budget_exhausted"], true, "{report}");
    assert_eq!(report["finished"], false, "{report}");
    assert_eq!(report["rounds"], serde_json::json!([1]), "{report}");
    let eps = report["epsilon_spent"].as_f64().context("epsilon_spent")?;
    assert!(eps > 0.0 && eps <= EPSILON, "ε {eps}");

    // Round 1 committed with its update; it left before round 2.
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds.as_array().map(Vec::len), Some(2), "{rounds}");
    let status = agg.json("/api/status").await?;
    assert_eq!(status["round"], 2, "{status}");
    assert_eq!(status["participants_connected"], 0, "{status}");
    let p = privacy_of(&status, "a");
    assert_eq!(p["epsilon_spent"].as_f64(), Some(eps), "{p}");
    assert_eq!(p["connected"], false, "{p}");
    assert_eq!(p["updates"], 1, "{p}");

    // Restarting it does not reset its budget: the ledger in its cache
    // remembers the steps, so it refuses round 2 without training.
    let ledgers: Vec<_> =
        std::fs::read_dir(dir.join("cache-a").join("privacy"))?.collect::<Result<_, _>>()?;
    assert_eq!(ledgers.len(), 1, "one ledger for the task and data");
    let child = spawn_join(dir, &agg, "a.tsv", "a", &["--dp-rounds", "1"])?;
    let out = wait_child(child, JOIN_TIMEOUT).await?;
    check_success("fedsb join again", &out)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("privacy budget exhausted") && stderr.contains("4 DP-SGD steps"),
        "{stderr}"
    );
    let report = last_json_line(&out)?;
    assert_eq!(report["budget_exhausted"], true, "{report}");
    assert_eq!(report["rounds"], serde_json::json!([]), "{report}");
    assert_eq!(report["epsilon_spent"].as_f64(), Some(eps), "{report}");
    assert_eq!(agg.metric("fedsb_updates_accepted_total").await?, 1.0);

    // Its ledger lost (the participant key kept): it believes the budget
    // unspent and trains round 2, but the aggregator accounts the steps it
    // accepted under that key, refuses the update and says why; the
    // participant stops.
    std::fs::remove_dir_all(dir.join("cache-a").join("privacy"))?;
    let child = spawn_join(dir, &agg, "a.tsv", "a", &["--dp-rounds", "1"])?;
    let out = wait_child(child, JOIN_TIMEOUT).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("beyond the task's ε = 3")
            && stderr.contains("8 DP-SGD steps in 2 updates")
            && stderr.contains("ledger may have been reset"),
        "{}: {stderr}",
        out.status
    );
    assert_eq!(agg.metric("fedsb_updates_accepted_total").await?, 1.0);
    let status = agg.json("/api/status").await?;
    let p = privacy_of(&status, "a");
    assert_eq!(p["updates"], 1, "{p}");
    assert_eq!(p["epsilon_accounted"].as_f64(), Some(eps), "{p}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn train_with_dp_reports_epsilon_and_writes_the_adapter() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_tiny_model(&dir.join("model"), 11)?;
    std::fs::write(dir.join("seed.tsv"), labelled_tsv(48, 1, 0.5))?;
    std::fs::write(dir.join("train.tsv"), labelled_tsv(64, 2, 0.5))?;
    std::fs::write(dir.join("eval.tsv"), labelled_tsv(24, 4, 0.5))?;
    let train = |extra: &[&str]| {
        Command::new(fedsb_bin())
            .arg("train")
            .arg("--model")
            .arg(dir.join("model"))
            .arg("--train")
            .arg(dir.join("train.tsv"))
            .arg("--eval")
            .arg(dir.join("eval.tsv"))
            .args([
                "--rank", "4", "--steps", "6", "--batch", "8", "--lr", "0.01",
            ])
            .args(["--init-samples", "16"])
            .args(extra)
            .output()
    };
    // DP without public seed data is refused: the init would read private data.
    let out = train(&["--dp-epsilon", "2", "--clip", "0.5"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--init-data"), "{stderr}");
    let out = train(&["--dp-epsilon", "2"])?;
    assert!(String::from_utf8_lossy(&out.stderr).contains("--clip"));

    let adapter = dir.join("trained.safetensors");
    let seed = dir.join("seed.tsv");
    let out = train(&[
        "--dp-epsilon",
        "2",
        "--dp-delta",
        "1e-5",
        "--clip",
        "0.5",
        "--accountant",
        "rdp",
        "--init-data",
        seed.to_str().unwrap(),
        "--output",
        adapter.to_str().unwrap(),
    ])?;
    check_success("fedsb train with DP", &out)?;
    let report = last_json_line(&out)?;
    let eps = report["epsilon"].as_f64().context("epsilon")?;
    assert!(eps > 1.8 && eps <= 2.0, "ε {eps}: {report}");
    assert_eq!(report["delta"], 1e-5, "{report}");
    assert_eq!(report["sample_rate"], 8.0 / 64.0, "{report}");
    assert!(
        report["noise_multiplier"].as_f64().unwrap_or(0.0) > 0.0,
        "{report}"
    );
    assert!(report["eval_accuracy"].as_f64().is_some(), "{report}");
    // The adapter file has A, B, R of all 12 modules and the head.
    let bytes = std::fs::read(&adapter)?;
    let n = u64::from_le_bytes(bytes[..8].try_into()?) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let names = header.as_object().context("header")?;
    assert_eq!(
        names["encoder.layer.1.output.dense.lora_R"]["shape"],
        serde_json::json!([4, 4])
    );
    assert!(names.contains_key("encoder.layer.0.attention.self.query.lora_A"));
    assert_eq!(
        names["classifier.weight"]["shape"],
        serde_json::json!([2, 16])
    );
    assert_eq!(names["__metadata__"]["trained_by"], "fedsb train");

    // A given σ: ε is only reported.
    let out = train(&[
        "--noise-multiplier",
        "1.0",
        "--clip",
        "0.5",
        "--accountant",
        "rdp",
        "--init-data",
        seed.to_str().unwrap(),
    ])?;
    check_success("fedsb train --noise-multiplier", &out)?;
    let report = last_json_line(&out)?;
    assert_eq!(report["noise_multiplier"], 1.0, "{report}");
    assert!(report["epsilon"].as_f64().unwrap_or(0.0) > 0.0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dp_task_rejects_updates_without_a_fitting_privacy_report() -> anyhow::Result<()> {
    use fedsb_protocol::{ErrorCode, PrivacyReport, RoundId, ServerMessage};
    let config = test_config(2, 1, 2, 600, "")
        + "[privacy]\nenabled = true\nepsilon = 2.0\ndelta = 1e-5\nclip_norm = 0.5\n";
    let agg = Aggregator::start(&config)?;
    let (mut p, _) = Participant::join(agg.addr, "scripted").await?;
    p.wait_global(RoundId(0)).await?;
    let round = p.wait_round_open().await?;
    let good = PrivacyReport {
        noise_multiplier: 1.2,
        sample_rate: 0.1,
        steps: 4,
        clip_norm: 0.5,
        delta: 1e-5,
        epsilon_spent: 0.7,
    };
    let cases = [
        (None, "must carry a privacy report"),
        (
            Some(PrivacyReport {
                clip_norm: 5.0,
                ..good.clone()
            }),
            "requires clip norm 0.5",
        ),
        (
            Some(PrivacyReport {
                noise_multiplier: 0.0,
                ..good.clone()
            }),
            "without noise",
        ),
        (
            Some(PrivacyReport {
                epsilon_spent: 2.5,
                ..good.clone()
            }),
            "beyond the task's target",
        ),
        (
            Some(PrivacyReport {
                noise_multiplier: f64::NAN,
                ..good.clone()
            }),
            "without noise (σ = NaN)",
        ),
        // Trained without any DP-SGD step.
        (
            Some(PrivacyReport {
                steps: 0,
                ..good.clone()
            }),
            "0 DP-SGD steps",
        ),
        // A σ that spends the budget in one step: refused before any PLD.
        (
            Some(PrivacyReport {
                noise_multiplier: 0.15,
                sample_rate: 0.5,
                ..good.clone()
            }),
            "one DP-SGD step at q = 0.5, σ = 0.15 alone spends more than the task's ε = 2",
        ),
        // Out of range: said so, not "cannot bound".
        (
            Some(PrivacyReport {
                sample_rate: 1.5,
                ..good.clone()
            }),
            "privacy report out of range",
        ),
        // More steps than a round has (the task's local_steps, 20 here).
        (
            Some(PrivacyReport {
                steps: 21,
                ..good.clone()
            }),
            "21 DP-SGD steps, but a round of this task has 20 local steps",
        ),
        // Honestly reported, but more than the budget by the aggregator's
        // own account (one step of it alone is within the budget).
        (
            Some(PrivacyReport {
                noise_multiplier: 1.0,
                steps: 20,
                ..good.clone()
            }),
            "beyond the task's ε = 2",
        ),
    ];
    for (i, (report, why)) in cases.into_iter().enumerate() {
        let mut u = update(round, 10, known_state(&TEST_SHAPE, i as u64));
        u.privacy = report;
        match p.submit(u).await? {
            ServerMessage::Error { code, message } => {
                assert_eq!(code, ErrorCode::InvalidPrivacyReport, "{message}");
                assert!(message.contains(why), "case {i}: {message}");
            }
            other => bail!("case {i}: expected a rejection, got {other:?}"),
        }
    }
    assert_eq!(agg.metric("fedsb_updates_accepted_total").await?, 0.0);
    let mut u = update(round, 10, known_state(&TEST_SHAPE, 9));
    u.privacy = Some(good);
    let answer = p.submit(u).await?;
    assert!(
        matches!(answer, ServerMessage::UpdateAccepted { .. }),
        "{answer:?}"
    );
    p.wait_global(round).await?;
    let status = agg.json("/api/status").await?;
    let entry = privacy_of(&status, "scripted");
    assert_eq!(entry["epsilon_spent"], 0.7, "{entry}");
    assert_eq!(entry["steps"], 4, "{entry}");
    Ok(())
}

/// Accounting a report runs beside the coordinator, not on it: while the
/// PLD of an expensive report (2,000 steps at σ = 0.8, q = 0.5: seconds
/// and hundreds of MB; one step of it alone is within ε = 10) is built,
/// another participant joins and is welcomed; then the report is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expensive_report_does_not_hold_up_the_other_participants() -> anyhow::Result<()> {
    use fedsb_protocol::{ClientMessage, ErrorCode, PrivacyReport, ServerMessage};
    let config = test_config(2, 2, 2, 600, "local_steps = 2000")
        + "[privacy]\nenabled = true\nepsilon = 10.0\ndelta = 1e-5\nclip_norm = 0.5\n";
    let agg = Aggregator::start(&config)?;
    let (mut heavy, _) = Participant::join(agg.addr, "heavy").await?;
    let round = heavy.wait_round_open().await?;
    let mut u = update(round, 10, known_state(&TEST_SHAPE, 1));
    u.privacy = Some(PrivacyReport {
        noise_multiplier: 0.8,
        sample_rate: 0.5,
        steps: 2000,
        clip_norm: 0.5,
        delta: 1e-5,
        epsilon_spent: 9.0,
    });
    heavy.send(&ClientMessage::Update(u)).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Welcomed while the report is still being accounted.
    let (_other, welcome) = Participant::join(agg.addr, "other").await?;
    assert!(
        matches!(welcome, ServerMessage::Welcome { .. }),
        "{welcome:?}"
    );
    let early = tokio::time::timeout(Duration::from_millis(10), heavy.recv()).await;
    assert!(early.is_err(), "the report was answered first: {early:?}");
    match heavy.recv().await? {
        ServerMessage::Error { code, message } => {
            assert_eq!(code, ErrorCode::InvalidPrivacyReport, "{message}");
            assert!(message.contains("beyond the task's ε = 10"), "{message}");
        }
        other => bail!("expected a refusal, got {other:?}"),
    }
    Ok(())
}
