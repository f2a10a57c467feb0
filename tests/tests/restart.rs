//! `kill -9` after round 3: the restarted aggregator resumes at round 4 from
//! a bit-identical global state, and refuses a state directory that belongs
//! to a different task configuration.

use std::process::Command;

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
