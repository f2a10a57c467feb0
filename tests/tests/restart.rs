//! `kill -9` after round 3: the restarted aggregator resumes at round 4 from
//! a bit-identical global state, and refuses a state directory that belongs
//! to a different task configuration. `kill -9` in the middle of a round: the
//! updates it had accepted count in the reopened round, once. The demo
//! shards go on where they stopped, and a start refused for its eval file
//! creates and touches no state.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use reqwest::Method;

use fedsb_e2e::*;
use fedsb_protocol::*;

async fn run_round(ps: &mut [Participant], round: RoundId) -> anyhow::Result<AdapterState> {
    let mut sent = Vec::new();
    for (i, p) in ps.iter_mut().enumerate() {
        assert_eq!(p.wait_round_open().await?, round);
        let s = known_state(&TEST_SHAPE, round.0 * 100 + i as u64);
        let n = 5 + i as u64;
        assert_eq!(
            p.submit(update(round, n, s.clone())).await?,
            ServerMessage::UpdateAccepted { round }
        );
        sent.push((n as f64, s));
    }
    let refs: Vec<_> = sent.iter().map(|(w, s)| (*w, s)).collect();
    let want = weighted_mean(&refs);
    let mut global = None;
    for p in ps.iter_mut() {
        let g = p.wait_global(round).await?;
        assert!(max_rel_error(&g, &want) <= 1e-6);
        global = Some(g);
    }
    Ok(global.unwrap())
}

fn bits(s: &AdapterState) -> Vec<u32> {
    s.named_tensors()
        .flat_map(|(_, t)| t.data.iter().map(|x| x.to_bits()))
        .collect()
}

#[tokio::test]
async fn kill_nine_after_round_three_resumes_identically() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("task.toml"), test_config(6, 3, 3, 60, ""))?;
    let mut agg = Aggregator::start_in(dir.path())?;

    let mut ps = Vec::new();
    for i in 0..3 {
        ps.push(Participant::join(agg.addr, &format!("p{i}")).await?.0);
    }
    let mut last = None;
    for r in 1..=3 {
        last = Some(run_round(&mut ps, RoundId(r)).await?);
    }
    let before = last.unwrap();
    let frame_before = reqwest::get(agg.url("/api/rounds/3/global"))
        .await?
        .bytes()
        .await?;
    let rounds_before = agg.json("/api/rounds").await?;

    agg.kill9();
    assert!(!agg.is_running());
    drop(ps);

    let agg = Aggregator::start_in(dir.path())?;
    let status = agg.json("/api/status").await?;
    assert_eq!(status["round"], 4, "{status}");
    assert_eq!(status["last_committed_round"], 3);
    let frame_after = reqwest::get(agg.url("/api/rounds/3/global"))
        .await?
        .bytes()
        .await?;
    assert_eq!(
        frame_before, frame_after,
        "stored round 3 must be bit-identical"
    );
    assert_eq!(agg.json("/api/rounds").await?, rounds_before);

    let mut ps = Vec::new();
    for i in 0..3 {
        let (mut p, _) = Participant::join(agg.addr, &format!("q{i}")).await?;
        // A new participant gets the round-3 state, bit for bit.
        let g = p.wait_global(RoundId(3)).await?;
        assert_eq!(bits(&g), bits(&before));
        ps.push(p);
    }
    run_round(&mut ps, RoundId(4)).await?;
    assert_eq!(agg.json("/api/status").await?["last_committed_round"], 4);
    Ok(())
}

#[tokio::test]
async fn a_state_directory_of_another_task_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("task.toml"), test_config(2, 1, 1, 60, ""))?;
    {
        let agg = Aggregator::start_in(dir.path())?;
        agg.json("/api/status").await?;
    }
    // Same task id, different rank: resuming would mix incompatible states.
    std::fs::write(
        dir.path().join("task.toml"),
        test_config(2, 1, 1, 60, "").replace("rank = 4", "rank = 5"),
    )?;
    let out = Command::new(fedsb_bin())
        .arg("serve")
        .arg("--config")
        .arg(dir.path().join("task.toml"))
        .args(["--port", "0", "--state-dir"])
        .arg(dir.path().join("state"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("different configuration"), "{err}");
    Ok(())
}

const KEY_A: &str = "participant-a-0123456789abcdef";
const KEY_B: &str = "participant-b-0123456789abcdef";

fn welcome_id(m: &ServerMessage) -> ParticipantId {
    match m {
        ServerMessage::Welcome { participant, .. } => *participant,
        other => panic!("expected Welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn an_accepted_update_survives_kill_nine_and_counts_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("task.toml"), test_config(3, 2, 2, 60, ""))?;
    let mut agg = Aggregator::start_in(dir.path())?;

    let (mut a, welcome) = Participant::join_as(agg.addr, "a", Some(KEY_A)).await?;
    let id_a = welcome_id(&welcome);
    let (mut b, welcome) = Participant::join_as(agg.addr, "b", Some(KEY_B)).await?;
    let id_b = welcome_id(&welcome);
    assert_ne!(id_a, id_b);

    // The same key on a second connection while the first is open: refused
    // and closed, and the first connection is not disturbed.
    let mut twin = Participant::connect_raw(agg.addr).await?;
    twin.send(&ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client: "a again".into(),
        participant_key: Some(KEY_A.into()),
    })
    .await?;
    let msg = twin.expect_error(ErrorCode::AlreadyConnected).await?;
    assert!(msg.contains("connected already"), "{msg}");
    assert!(twin.closed_within(Duration::from_secs(10)).await);

    assert_eq!(a.wait_round_open().await?, RoundId(1));
    assert_eq!(b.wait_round_open().await?, RoundId(1));
    let state_a = known_state(&TEST_SHAPE, 11);
    assert_eq!(
        a.submit(update(RoundId(1), 5, state_a.clone())).await?,
        ServerMessage::UpdateAccepted { round: RoundId(1) }
    );
    let status = agg.json("/api/status").await?;
    assert_eq!(status["updates_in_round"], 1, "{status}");

    // The aggregator dies after accepting a's update, before round 1 commits.
    agg.kill9();
    drop((a, b));
    let agg = Aggregator::start_in(dir.path())?;
    let status = agg.json("/api/status").await?;
    assert_eq!(status["round"], 1, "{status}");
    assert_eq!(
        status["updates_in_round"], 1,
        "the accepted update must be back in round 1: {status}"
    );

    // a joins again with its key: same id, and it is told its update is in
    // before the round is announced, so it does not train the round again.
    let (mut a, welcome) = Participant::join_as(agg.addr, "a", Some(KEY_A)).await?;
    assert_eq!(welcome_id(&welcome), id_a);
    assert!(matches!(
        a.recv().await?,
        ServerMessage::GlobalModel {
            round: RoundId(0),
            ..
        }
    ));
    assert_eq!(
        a.recv().await?,
        ServerMessage::UpdateAccepted { round: RoundId(1) }
    );
    assert!(matches!(
        a.recv().await?,
        ServerMessage::RoundOpen {
            round: RoundId(1),
            ..
        }
    ));
    // A second update of a's for round 1 does not count.
    let answer = a
        .submit(update(RoundId(1), 50, known_state(&TEST_SHAPE, 99)))
        .await?;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                code: ErrorCode::DuplicateUpdate,
                ..
            }
        ),
        "{answer:?}"
    );

    // b has sent nothing: no UpdateAccepted, it trains round 1.
    let (mut b, welcome) = Participant::join_as(agg.addr, "b", Some(KEY_B)).await?;
    assert_eq!(welcome_id(&welcome), id_b);
    assert!(matches!(b.recv().await?, ServerMessage::GlobalModel { .. }));
    assert!(matches!(
        b.recv().await?,
        ServerMessage::RoundOpen {
            round: RoundId(1),
            ..
        }
    ));
    let state_b = known_state(&TEST_SHAPE, 22);
    assert_eq!(
        b.submit(update(RoundId(1), 7, state_b.clone())).await?,
        ServerMessage::UpdateAccepted { round: RoundId(1) }
    );

    // Round 1 is the weighted mean of a's update from before the crash and
    // b's, each once.
    let want = weighted_mean(&[(5.0, &state_a), (7.0, &state_b)]);
    let global = b.wait_global(RoundId(1)).await?;
    assert!(max_rel_error(&global, &want) <= 1e-6);
    assert_eq!(bits(&a.wait_global(RoundId(1)).await?), bits(&global));
    let rounds = agg.json("/api/rounds").await?;
    let r1 = &rounds.as_array().unwrap()[1];
    assert_eq!(r1["round"], 1);
    assert_eq!(r1["participants"], 2, "{r1}");
    assert_eq!(r1["total_samples"], 12, "{r1}");
    Ok(())
}

/// With `server_learning_rate = 0.5` and `server_momentum = 0.5` every
/// round's global model is x_{t−1} + 0.5 (mean − x_{t−1}) + 0.5 (x_{t−1} −
/// x_{t−2}), worked here in f64 from the scripted updates and the stored
/// models, and `kill -9` between rounds 2 and 3 changes nothing: the
/// restarted aggregator reads x_1 and x_2 back and takes the same step.
#[tokio::test]
async fn the_server_step_with_momentum_resumes_after_kill_nine() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let extra = "server_learning_rate = 0.5\nserver_momentum = 0.5";
    std::fs::write(
        dir.path().join("task.toml"),
        test_config(4, 2, 2, 60, extra),
    )?;
    let mut agg = Aggregator::start_in(dir.path())?;
    let flat = |s: &AdapterState| -> Vec<f64> {
        s.named_tensors()
            .flat_map(|(_, t)| t.data.iter().map(|&x| f64::from(x)))
            .collect()
    };
    // Round n: two scripted updates, the global model checked against the
    // formula with the models of rounds n − 1 and n − 2 from the database.
    async fn round(
        agg: &Aggregator,
        ps: &mut [Participant],
        n: u64,
        flat: &dyn Fn(&AdapterState) -> Vec<f64>,
    ) -> anyhow::Result<()> {
        let mut sent = Vec::new();
        for (i, p) in ps.iter_mut().enumerate() {
            assert_eq!(p.wait_round_open().await?, RoundId(n));
            let s = known_state(&TEST_SHAPE, n * 100 + i as u64);
            let samples = 5 + i as u64;
            assert_eq!(
                p.submit(update(RoundId(n), samples, s.clone())).await?,
                ServerMessage::UpdateAccepted { round: RoundId(n) }
            );
            sent.push((samples as f64, s));
        }
        let refs: Vec<_> = sent.iter().map(|(w, s)| (*w, s)).collect();
        let mean = weighted_mean(&refs);
        let prev = flat(&agg.global_state(n - 1).await?);
        let before = if n >= 2 {
            flat(&agg.global_state(n - 2).await?)
        } else {
            prev.clone()
        };
        let want: Vec<f64> = (0..mean.len())
            .map(|i| prev[i] + 0.5 * (mean[i] - prev[i]) + 0.5 * (prev[i] - before[i]))
            .collect();
        let mut received = Vec::new();
        for p in ps.iter_mut() {
            let g = p.wait_global(RoundId(n)).await?;
            let err = max_rel_error(&g, &want);
            assert!(err <= 1e-6, "round {n}: {err:e} from the server step");
            // Not the plain mean.
            assert!(max_rel_error(&g, &mean) > 1e-3, "round {n} is the mean");
            received.push(g);
        }
        // Committed before it was sent: the stored model is the one sent.
        let stored = agg.global_state(n).await?;
        for g in &received {
            assert_eq!(bits(g), bits(&stored), "round {n}: stored and sent");
        }
        Ok(())
    }
    let mut ps = Vec::new();
    for i in 0..2 {
        ps.push(Participant::join(agg.addr, &format!("p{i}")).await?.0);
    }
    for n in 1..=2 {
        round(&agg, &mut ps, n, &flat).await?;
    }
    agg.kill9();
    drop(ps);
    let agg = Aggregator::start_in(dir.path())?;
    assert_eq!(agg.json("/api/status").await?["round"], 3);
    let mut ps = Vec::new();
    for i in 0..2 {
        ps.push(Participant::join(agg.addr, &format!("q{i}")).await?.0);
    }
    for n in 3..=4 {
        round(&agg, &mut ps, n, &flat).await?;
    }
    Ok(())
}

/// Runs `fedsb serve` on `dir/task.toml` with its state in `dir/state` and
/// `extra` flags, expecting it to fail; returns its stderr.
fn serve_fails(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<String> {
    let mut child = Command::new(fedsb_bin())
        .arg("serve")
        .arg("--config")
        .arg(dir.join("task.toml"))
        .args(["--bind", "127.0.0.1", "--state-dir"])
        .arg(dir.join("state"))
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // A server that started after all is stopped, and the test fails.
    let started = std::time::Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > Duration::from_secs(30) {
            child.kill()?;
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "fedsb serve {extra:?} started:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    assert!(!out.status.success());
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A model directory the server hashes and serves (it reads only
/// config.json), with `weights` as its model.safetensors.
fn write_model_dir(dir: &std::path::Path, weights: &[u8]) -> anyhow::Result<()> {
    let model = dir.join("model");
    std::fs::create_dir_all(&model)?;
    std::fs::write(
        model.join("config.json"),
        r#"{"hidden_size": 8, "num_hidden_layers": 2}"#,
    )?;
    std::fs::write(model.join("model.safetensors"), weights)?;
    std::fs::write(model.join("tokenizer.json"), "{}")?;
    Ok(())
}

/// A restart (and `fedsb export`) with another model.safetensors than the
/// task started with, [model] sha256 not set, is refused with a message
/// naming the file and both hashes: the stored rounds were trained on the
/// first. Restored, the task resumes. A database of a task that ran before
/// pins existed gets its files pinned at its next start.
#[tokio::test]
async fn another_model_file_is_refused_at_restart_and_by_export() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    write_model_dir(d, &[7u8; 1000])?;
    let config = test_config(3, 1, 1, 60, "")
        .replace("hidden_size = 8\nnum_layers = 2\n", "dir = \"model\"\n");
    std::fs::write(d.join("task.toml"), config)?;
    let model = d.join("model/model.safetensors");
    let pinned = sha256sum(&model)?;
    {
        let agg = Aggregator::start_in(d)?;
        let (mut p, _) = Participant::join(agg.addr, "p").await?;
        run_round(std::slice::from_mut(&mut p), RoundId(1)).await?;
    }

    // Same size, other bytes.
    std::fs::write(&model, [8u8; 1000])?;
    let found = sha256sum(&model)?;
    let err = serve_fails(d, &["--port", "0"])?;
    for part in [
        format!("model.safetensors {} has SHA-256 {found}", model.display()),
        format!("this task's database pins {pinned}"),
        "Restore it, or start a new task".to_owned(),
    ] {
        assert!(err.contains(&part), "{part:?} not in:\n{err}");
    }
    let out = Command::new(fedsb_bin())
        .args(["export", "--config"])
        .arg(d.join("task.toml"))
        .arg("--state-dir")
        .arg(d.join("state"))
        .arg("--out")
        .arg(d.join("out.safetensors"))
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "has SHA-256 {found}, but this task's database pins {pinned}"
        )),
        "{err}"
    );
    assert!(!d.join("out.safetensors").exists());

    std::fs::write(&model, [7u8; 1000])?;
    let agg = Aggregator::start_in(d)?;
    let status = agg.json("/api/status").await?;
    assert_eq!(status["last_committed_round"], 1, "{status}");
    drop(agg);

    // A database from before pins (schema version 3, no pinned_files, nor
    // the later tables and columns): it starts with whatever files it finds
    // and pins them.
    let db = d.join("state/e2e.sqlite3");
    let sql = "DROP TABLE pinned_files; DROP TABLE demo_shards; \
               ALTER TABLE round_participants DROP COLUMN epsilon_accounted; \
               PRAGMA user_version = 3;";
    let out = Command::new("sqlite3").arg(&db).arg(sql).output();
    if !matches!(&out, Ok(o) if o.status.success()) {
        eprintln!("sqlite3 is not installed: skipping the database from before pins");
        return Ok(());
    }
    std::fs::write(&model, [9u8; 1000])?;
    drop(Aggregator::start_in(d)?);
    std::fs::write(&model, [7u8; 1000])?;
    let err = serve_fails(d, &["--port", "0"])?;
    assert!(err.contains("this task's database pins"), "{err}");
    Ok(())
}

/// The module names of [`test_config`], as the server lists them.
async fn test_module_names() -> anyhow::Result<Vec<String>> {
    let agg = Aggregator::start(&test_config(1, 1, 1, 60, ""))?;
    let task = agg.json("/api/task").await?;
    Ok(task["module_names"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no module_names in {task}"))?
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect())
}

/// An adapter file with every module's R₀ = `value`·I (no A and B: the
/// server reads R₀ and the head only).
fn write_adapter(path: &std::path::Path, names: &[String], value: f32) -> anyhow::Result<()> {
    let rank = TEST_SHAPE.rank as usize;
    let r: Vec<u8> = (0..rank * rank)
        .map(|i| if i % (rank + 1) == 0 { value } else { 0.0 })
        .flat_map(f32::to_le_bytes)
        .collect();
    let tensors = names
        .iter()
        .map(|n| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                vec![rank, rank],
                &r,
            )?;
            Ok((format!("{n}.lora_R"), view))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::write(path, safetensors::serialize(tensors, None)?)?;
    Ok(())
}

/// A restart with another adapter file (other A, B and R₀ under the same
/// name) is refused: round 1's stored R would be paired with the new A and B.
#[tokio::test]
async fn another_adapter_file_is_refused_at_restart() -> anyhow::Result<()> {
    let names = test_module_names().await?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let adapter = d.join("adapter.safetensors");
    write_adapter(&adapter, &names, 0.5)?;
    let config = test_config(3, 1, 1, 60, "")
        .replace("rank = 4\n", "rank = 4\nfile = \"adapter.safetensors\"\n");
    std::fs::write(d.join("task.toml"), config)?;
    let pinned = sha256sum(&adapter)?;
    {
        let agg = Aggregator::start_in(d)?;
        let round0 = agg.global_state(0).await?;
        assert_eq!(round0.r[0].data[0], 0.5);
    }
    write_adapter(&adapter, &names, 0.25)?;
    let found = sha256sum(&adapter)?;
    let err = serve_fails(d, &["--port", "0"])?;
    assert!(
        err.contains(&format!(
            "adapter.safetensors {} has SHA-256 {found}, but this task's database pins {pinned}",
            adapter.display()
        )),
        "{err}"
    );
    write_adapter(&adapter, &names, 0.5)?;
    let agg = Aggregator::start_in(d)?;
    assert_eq!(agg.json("/api/status").await?["round"], 1);
    Ok(())
}

/// A second `fedsb serve` on the state of a running one is refused, naming
/// the running one's pid; the running one goes on.
#[tokio::test]
async fn a_second_server_on_the_same_state_is_refused() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("task.toml"), test_config(3, 1, 1, 60, ""))?;
    let mut agg = Aggregator::start_in(dir.path())?;
    let err = serve_fails(dir.path(), &["--port", "0"])?;
    let want = format!(
        "another fedsb serve (pid {}) is using {}",
        agg.child.id(),
        dir.path().join("state/e2e.sqlite3").display()
    );
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
    assert!(agg.is_running());
    assert_eq!(agg.json("/api/status").await?["round"], 1);
    // Once it is gone, the state is free.
    agg.kill9();
    let agg = Aggregator::start_in(dir.path())?;
    assert_eq!(agg.json("/api/status").await?["round"], 1);
    Ok(())
}

/// A start that fails on its port or its eval file leaves no database
/// behind: the next start begins afresh.
#[tokio::test]
async fn a_failed_start_leaves_no_database() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(d.join("task.toml"), test_config(3, 1, 1, 60, ""))?;
    let db = d.join("state/e2e.sqlite3");

    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let err = serve_fails(d, &["--port", &port])?;
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!db.exists(), "{} was left", db.display());
    drop(taken);

    write_model_dir(d, b"weights")?;
    let config = format!(
        "{}[eval]\nfile = \"missing-eval.tsv\"\n",
        test_config(3, 1, 1, 60, "")
            .replace("hidden_size = 8\nnum_layers = 2\n", "dir = \"model\"\n")
    );
    std::fs::write(d.join("task.toml"), config)?;
    let err = serve_fails(d, &["--port", "0"])?;
    assert!(err.contains("missing-eval.tsv"), "{err}");
    for suffix in ["", "-wal", "-shm"] {
        let f = d.join(format!("state/e2e.sqlite3{suffix}"));
        assert!(!f.exists(), "{} was left", f.display());
    }
    Ok(())
}

/// Runs `fedsb serve --check` on `dir/task.toml` with its state in
/// `dir/state` and `extra` flags: whether it succeeded, its stdout and its
/// stderr.
fn serve_check(dir: &std::path::Path, extra: &[&str]) -> anyhow::Result<(bool, String, String)> {
    let mut c = Command::new(fedsb_bin());
    c.args(["serve", "--check", "--config"])
        .arg(dir.join("task.toml"))
        .args(["--bind", "127.0.0.1"]);
    if !extra.contains(&"--state-dir") {
        c.arg("--state-dir").arg(dir.join("state"));
    }
    let out = c.args(extra).output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// `fedsb serve --check` passes what a start takes and refuses what a start
/// refuses, with the start's own message, and writes nothing: before the
/// first start (no state directory is made; one that cannot be made is
/// refused), beside a running server (which goes on; its own port is not
/// tried, another one is), and after the model file changed under the task
/// (the pin), the task's identity changed, or another program took the
/// port.
#[tokio::test]
async fn serve_check_refuses_what_a_start_refuses_and_writes_nothing() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    write_model_dir(d, &[7u8; 1000])?;
    let config = test_config(3, 1, 1, 60, "")
        .replace("hidden_size = 8\nnum_layers = 2\n", "dir = \"model\"\n");
    std::fs::write(d.join("task.toml"), &config)?;
    let model = d.join("model/model.safetensors");
    let pinned = sha256sum(&model)?;
    let state = d.join("state");
    let db = state.join("e2e.sqlite3");

    // Before the first start.
    let (ok, out, err) = serve_check(d, &["--port", "0"])?;
    assert!(ok, "{out}{err}");
    for part in [
        format!(
            "file model.safetensors: {} (1000 bytes, SHA-256 {pinned})",
            model.display()
        ),
        "initial model: R and head at zero".to_owned(),
        format!("state: {} does not exist yet", db.display()),
        "listen: 127.0.0.1, on a free port picked at the start".to_owned(),
        format!("configuration OK: {}", d.join("task.toml").display()),
    ] {
        assert!(out.contains(&part), "{part:?} not in:\n{out}");
    }
    assert!(!state.exists(), "--check made {}", state.display());
    // A state directory a start could not create is refused as the start
    // refuses it: under a file, under /proc.
    for bad in [
        d.join("task.toml/state"),
        PathBuf::from("/proc/fedsb-check"),
    ] {
        let (ok, out, err) =
            serve_check(d, &["--port", "0", "--state-dir", bad.to_str().unwrap()])?;
        assert!(!ok, "{out}");
        assert!(
            err.contains(&format!("cannot create state directory {}", bad.display())),
            "{err}"
        );
        assert!(!bad.exists());
    }
    assert_eq!(
        std::fs::read_dir(d)?.count(),
        2,
        "the probe was left behind"
    );

    // Beside a running server, after a committed round.
    let mut agg = Aggregator::start_in(d)?;
    let (mut p, _) = Participant::join(agg.addr, "p").await?;
    run_round(std::slice::from_mut(&mut p), RoundId(1)).await?;
    let port = agg.addr.port().to_string();
    let (ok, out, err) = serve_check(d, &["--port", &port])?;
    assert!(ok, "{out}{err}");
    for part in [
        format!(
            "state: {} (the same task; round 1 of 3 committed)",
            db.display()
        ),
        "pinned files, all as pinned: model.safetensors\n".to_owned(),
        format!(
            "server: process {} holds this state now and listens on {}",
            agg.child.id(),
            agg.addr
        ),
    ] {
        assert!(out.contains(&part), "{part:?} not in:\n{out}");
    }
    // Another port beside it is tried: the restart would need it.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let other = taken.local_addr()?.port().to_string();
    let (ok, out, err) = serve_check(d, &["--port", &other])?;
    assert!(!ok, "{out}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{other}")),
        "{out}{err}"
    );
    drop(taken);
    let (ok, out, err) = serve_check(d, &["--port", &other])?;
    assert!(ok, "{out}{err}");
    for part in [
        format!(
            "server: process {} holds this state now, listening on {}",
            agg.child.id(),
            agg.addr
        ),
        format!("listen: 127.0.0.1:{other} is free"),
    ] {
        assert!(out.contains(&part), "{part:?} not in:\n{out}");
    }
    assert!(agg.is_running());
    assert_eq!(agg.json("/api/status").await?["round"], 2);
    drop(p);
    agg.kill9();

    // Another model file than the task started with: the check says what
    // a start says.
    std::fs::write(&model, [8u8; 1000])?;
    let found = sha256sum(&model)?;
    let want = format!("has SHA-256 {found}, but this task's database pins {pinned}");
    assert!(serve_fails(d, &["--port", "0"])?.contains(&want));
    // The database, its write-ahead log and the lock file (by SHA-256), as
    // that refused start left them; not SQLite's shared-memory index, where
    // readers note what they read, nor an empty log, which a reader of a
    // database without one may create and which holds nothing.
    let durable = || -> anyhow::Result<BTreeMap<PathBuf, String>> {
        let mut files = BTreeMap::new();
        for (path, bytes) in files_under(&state)? {
            if !path.to_string_lossy().ends_with("-shm") && !bytes.is_empty() {
                files.insert(path, sha256_hex(&bytes)?);
            }
        }
        Ok(files)
    };
    let before = durable()?;
    let (ok, out, err) = serve_check(d, &["--port", "0"])?;
    assert!(!ok, "{out}");
    assert!(!out.contains("configuration OK"), "{out}");
    assert!(err.contains(&want), "{want:?} not in:\n{err}");
    std::fs::write(&model, [7u8; 1000])?;

    // Another task identity on the same state.
    std::fs::write(d.join("task.toml"), config.replace("rank = 4", "rank = 5"))?;
    let (ok, _, err) = serve_check(d, &["--port", "0"])?;
    assert!(!ok);
    assert!(err.contains("different configuration"), "{err}");
    std::fs::write(d.join("task.toml"), &config)?;

    // A port another program listens on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = taken.local_addr()?.port().to_string();
    let (ok, _, err) = serve_check(d, &["--port", &port])?;
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{err}"
    );
    drop(taken);

    let (ok, out, err) = serve_check(d, &["--port", &port])?;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains(&format!("listen: 127.0.0.1:{port} is free")),
        "{out}"
    );
    assert!(
        out.contains("pinned files, all as pinned: model.safetensors\n"),
        "{out}"
    );
    // None of the checks wrote to the state.
    assert_eq!(durable()?, before);
    let agg = Aggregator::start_in(d)?;
    assert_eq!(agg.json("/api/status").await?["last_committed_round"], 1);
    Ok(())
}

/// Every file under `dir` (recursively) with its bytes, by path relative to
/// `dir`.
fn files_under(dir: &std::path::Path) -> anyhow::Result<BTreeMap<PathBuf, Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                out.insert(path.strip_prefix(dir)?.to_owned(), std::fs::read(&path)?);
            }
        }
    }
    Ok(out)
}

/// A bad eval file (a label that is not one of the task's, a missing
/// column) is refused before the state is opened, with a message naming the
/// file and what is wrong: a new task gets no state directory at all, and
/// the state of a task that ran before stays byte for byte as it was, its
/// lock file (with the pid of the server that ran) included.
#[tokio::test]
async fn a_bad_eval_file_is_refused_before_the_state_is_opened() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    write_model_dir(d, b"weights")?;
    let task = test_config(3, 1, 1, 60, "")
        .replace("hidden_size = 8\nnum_layers = 2\n", "dir = \"model\"\n");
    std::fs::write(
        d.join("bad-label.tsv"),
        "sentence\tlabel\ngood\tpositive\nso so\tneutral\n",
    )?;
    std::fs::write(d.join("no-label.tsv"), "sentence\tstars\ngood\t5\n")?;
    let bad = [
        (
            "bad-label.tsv",
            "label \"neutral\" is not one of the classes [negative, positive]",
        ),
        ("no-label.tsv", "no column `label`"),
    ];
    let serve_with_bad_eval = |file: &str, why: &str| -> anyhow::Result<()> {
        std::fs::write(
            d.join("task.toml"),
            format!("{task}[eval]\nfile = \"{file}\"\nlabel_column = \"label\"\n"),
        )?;
        let err = serve_fails(d, &["--port", "0"])?;
        let named = format!("eval.file {}", d.join(file).display());
        assert!(err.contains(&named), "{named:?} not in:\n{err}");
        assert!(err.contains(why), "{why:?} not in:\n{err}");
        Ok(())
    };

    let state = d.join("state");
    for (file, why) in bad {
        serve_with_bad_eval(file, why)?;
        assert!(
            !state.exists(),
            "the refused start made {}",
            state.display()
        );
    }

    std::fs::write(d.join("task.toml"), &task)?;
    let mut agg = Aggregator::start_in(d)?;
    assert_eq!(agg.json("/api/status").await?["round"], 1);
    agg.kill9();
    let before = files_under(&state)?;
    assert!(before.contains_key(std::path::Path::new("e2e.sqlite3")));
    for (file, why) in bad {
        serve_with_bad_eval(file, why)?;
        let after = files_under(&state)?;
        assert!(
            after == before,
            "the refused start changed the state: {:?} before, {:?} after",
            before.keys().collect::<Vec<_>>(),
            after.keys().collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// The Content-Disposition and the rows of the next demo shard, which a GET
/// takes and a HEAD only names (its rows are empty).
async fn next_demo_shard(agg: &Aggregator, method: Method) -> anyhow::Result<(String, String)> {
    let r = reqwest::Client::new()
        .request(method, agg.url("/api/demo-shard"))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "/api/demo-shard: {}", r.status());
    let disposition = r.headers()[reqwest::header::CONTENT_DISPOSITION]
        .to_str()?
        .to_owned();
    Ok((disposition, r.text().await?))
}

/// The demo data's shards go on where they stopped after a restart (after
/// `kill -9` too): volunteers after it get other rows than those before.
#[tokio::test]
async fn demo_shards_go_on_after_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    std::fs::write(
        d.join("demo.tsv"),
        "sentence\tlabel\nr0\t0\nr1\t1\nr2\t0\nr3\t1\nr4\t0\n",
    )?;
    let config = format!(
        "{}[demo]\ndata = \"demo.tsv\"\nshard_rows = 2\n",
        test_config(3, 1, 1, 60, "")
    );
    std::fs::write(d.join("task.toml"), config)?;
    let file = |k: u64| format!("attachment; filename=\"demo-shard-{k}.tsv\"");

    let mut agg = Aggregator::start_in(d)?;
    assert_eq!(
        next_demo_shard(&agg, Method::GET).await?,
        (file(0), "sentence\tlabel\nr0\t0\nr1\t1\n".to_owned())
    );
    assert_eq!(
        next_demo_shard(&agg, Method::GET).await?,
        (file(1), "sentence\tlabel\nr2\t0\nr3\t1\n".to_owned())
    );
    agg.kill9();

    let agg = Aggregator::start_in(d)?;
    // HEAD names the next shard without handing it out.
    assert_eq!(next_demo_shard(&agg, Method::HEAD).await?.0, file(2));
    assert_eq!(
        next_demo_shard(&agg, Method::GET).await?,
        (file(2), "sentence\tlabel\nr4\t0\nr0\t0\n".to_owned())
    );
    assert_eq!(next_demo_shard(&agg, Method::HEAD).await?.0, file(3));
    Ok(())
}

/// Sends `signal` (`-TERM`, `-INT`) to a process.
fn send_signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill {signal} {pid}: {status}");
    Ok(())
}

/// Waits up to `limit` for the aggregator to exit; its exit status.
async fn exit_within(
    agg: &mut Aggregator,
    limit: Duration,
) -> anyhow::Result<Option<std::process::ExitStatus>> {
    let started = std::time::Instant::now();
    loop {
        if let Some(status) = agg.child.try_wait()? {
            return Ok(Some(status));
        }
        if started.elapsed() > limit {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM stops the server at once although a page holds `/api/events`
/// open (the page always does) and a participant is connected, whose
/// WebSocket is closed with 1001 (going away), not dropped.
#[tokio::test]
async fn sigterm_stops_the_server_while_a_page_listens_to_its_events() -> anyhow::Result<()> {
    let mut agg = Aggregator::start(&test_config(3, 2, 2, 60, ""))?;
    let (mut p, _) = Participant::join(agg.addr, "p").await?;
    let mut events = reqwest::get(agg.url("/api/events")).await?;
    assert_eq!(events.status(), 200);
    let first = events.chunk().await?.unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&first).contains("event: status"),
        "{first:?}"
    );
    send_signal(agg.child.id(), "-TERM")?;
    let status = exit_within(&mut agg, Duration::from_secs(5)).await?;
    assert!(
        status.is_some_and(|s| s.success()),
        "fedsb serve did not exit within 5 s of SIGTERM: {status:?}"
    );
    // The page's stream ended with the server.
    let rest = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = events.chunk().await {}
    })
    .await;
    assert!(rest.is_ok(), "the event stream did not end");
    assert_eq!(
        p.close_code_within(Duration::from_secs(5)).await,
        Some(1001)
    );
    Ok(())
}

/// A graceful stop waits for a response in progress, here a 24 MB demo
/// shard that its client reads slowly or not at all, for at most its grace
/// time (10 s),
/// and a second signal exits at once. A connection that has sent only
/// part of a request head is owed nothing: it does not hold the stop (it
/// held it for the whole grace time before).
#[tokio::test]
async fn a_second_signal_exits_at_once_and_the_grace_time_is_bounded() -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let data = tempfile::tempdir()?;
    let rows = data.path().join("public.tsv");
    let mut text = String::from("sentence\tlabel\n");
    for i in 0..200_000 {
        text.push_str(&format!("{i:0>100}\tpositive\n"));
    }
    std::fs::write(&rows, text)?;
    let config = test_config(3, 1, 1, 60, "")
        + &format!(
            "[demo]\ndata = {:?}\nshard_rows = 200000\n",
            rows.display().to_string()
        );
    let half_head = |agg: &Aggregator| {
        let addr = agg.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /api/status HTTP/1.1\r\nHost: x\r\n")
                .await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            anyhow::Ok(s)
        }
    };
    // The demo shard asked for and its first bytes read; then `slowly`
    // reads 64 KB every 100 ms (about 40 s for the shard), or nothing.
    let download = |agg: &Aggregator, slowly: bool| {
        let addr = agg.addr;
        async move {
            let mut s = tokio::net::TcpStream::connect(addr).await?;
            s.write_all(b"GET /api/demo-shard HTTP/1.1\r\nHost: x\r\n\r\n")
                .await?;
            let mut head = [0u8; 64];
            let n = s.read(&mut head).await?;
            anyhow::ensure!(
                head[..n].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&head[..n])
            );
            let reader = tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if slowly && !matches!(s.read(&mut buf).await, Ok(n) if n > 0) {
                        break;
                    }
                }
            });
            tokio::time::sleep(Duration::from_millis(300)).await;
            anyhow::Ok(reader)
        }
    };

    let mut agg = Aggregator::start(&config)?;
    let _half = half_head(&agg).await?;
    send_signal(agg.child.id(), "-TERM")?;
    let status = exit_within(&mut agg, Duration::from_secs(4)).await?;
    assert!(
        status.is_some_and(|s| s.success()),
        "a half-sent request head held the stop: {status:?}"
    );

    let mut agg = Aggregator::start(&config)?;
    let stalled = download(&agg, false).await?;
    send_signal(agg.child.id(), "-TERM")?;
    assert_eq!(exit_within(&mut agg, Duration::from_secs(3)).await?, None);
    send_signal(agg.child.id(), "-INT")?;
    let status = exit_within(&mut agg, Duration::from_secs(3)).await?;
    stalled.abort();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(130),
        "a second signal (SIGINT) must exit at once: {status:?}"
    );

    let mut agg = Aggregator::start(&config)?;
    let reading = download(&agg, true).await?;
    let _half = half_head(&agg).await?;
    let started = std::time::Instant::now();
    send_signal(agg.child.id(), "-TERM")?;
    let status = exit_within(&mut agg, Duration::from_secs(20)).await?;
    reading.abort();
    assert!(
        status.is_some_and(|s| s.success()),
        "no exit within 20 s: {status:?}"
    );
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(9), "exited after {waited:?}");
    Ok(())
}
