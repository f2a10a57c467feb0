//! `kill -9` after round 3: the restarted aggregator resumes at round 4 from
//! a bit-identical global state, and refuses a state directory that belongs
//! to a different task configuration. `kill -9` in the middle of a round: the
//! updates it had accepted count in the reopened round, once.

use std::process::Command;
use std::time::Duration;

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
