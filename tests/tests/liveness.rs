//! Participants that disconnect or stall never hold a round past its
//! deadline, and the quorum policies behave as documented.

use std::time::{Duration, Instant};

use fedsb_e2e::*;
use fedsb_protocol::*;

fn s(seed: u64) -> AdapterState {
    known_state(&TEST_SHAPE, seed)
}

#[tokio::test]
async fn a_disconnected_participant_is_not_waited_for() -> anyhow::Result<()> {
    // A long deadline: only the disconnect can let this round commit early.
    let agg = Aggregator::start(&test_config(1, 1, 10, 600, ""))?;
    let (mut a, _) = Participant::join(agg.addr, "a").await?;
    let (b, _) = Participant::join(agg.addr, "b").await?;
    let round = a.wait_round_open().await?;
    assert_eq!(
        a.submit(update(round, 3, s(1))).await?,
        ServerMessage::UpdateAccepted { round }
    );
    let started = Instant::now();
    drop(b);
    let g = a.wait_global(round).await?;
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(max_rel_error(&g, &weighted_mean(&[(3.0, &s(1))])) <= 1e-6);
    Ok(())
}

#[tokio::test]
async fn a_stalled_participant_blocks_only_until_the_deadline() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(1, 1, 10, 3, ""))?;
    let (mut a, _) = Participant::join(agg.addr, "a").await?;
    // b completes the handshake and then never reads or sends again.
    let (_b, _) = Participant::join(agg.addr, "stalled").await?;
    let round = a.wait_round_open().await?;
    let opened = Instant::now();
    assert_eq!(
        a.submit(update(round, 3, s(1))).await?,
        ServerMessage::UpdateAccepted { round }
    );
    a.wait_global(round).await?;
    let waited = opened.elapsed();
    assert!(
        waited >= Duration::from_secs(1),
        "committed before the deadline: {waited:?}"
    );
    assert!(waited < Duration::from_secs(15), "waited {waited:?}");
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[1]["participants"], 1);
    Ok(())
}

#[tokio::test]
async fn a_missed_quorum_extends_the_round_and_keeps_accepted_updates() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(1, 2, 10, 1, ""))?;
    let (mut a, _) = Participant::join(agg.addr, "a").await?;
    let round = a.wait_round_open().await?;
    assert_eq!(
        a.submit(update(round, 2, s(1))).await?,
        ServerMessage::UpdateAccepted { round }
    );
    // The deadline passes without a quorum: the same round is announced again.
    let again = a.wait_round_open().await?;
    assert_eq!(again, round);
    assert_eq!(agg.json("/api/status").await?["updates_in_round"], 1);
    let (mut b, _) = Participant::join(agg.addr, "b").await?;
    assert_eq!(
        b.submit(update(round, 6, s(2))).await?,
        ServerMessage::UpdateAccepted { round }
    );
    let g = a.wait_global(round).await?;
    assert!(max_rel_error(&g, &weighted_mean(&[(2.0, &s(1)), (6.0, &s(2))])) <= 1e-6);
    Ok(())
}

#[tokio::test]
async fn aggregate_available_commits_below_quorum_at_the_deadline() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(
        1,
        5,
        10,
        1,
        "on_quorum_missed = \"aggregate_available\"\nweighting = \"uniform\"",
    ))?;
    let (mut a, _) = Participant::join(agg.addr, "a").await?;
    let (mut b, _) = Participant::join(agg.addr, "b").await?;
    let round = a.wait_round_open().await?;
    b.wait_round_open().await?;
    a.submit(update(round, 1, s(1))).await?;
    b.submit(update(round, 99, s(2))).await?;
    let g = a.wait_global(round).await?;
    // Uniform weighting: sample counts do not matter.
    assert!(max_rel_error(&g, &weighted_mean(&[(1.0, &s(1)), (1.0, &s(2))])) <= 1e-6);
    assert_eq!(agg.json("/api/rounds").await?[1]["participants"], 2);
    Ok(())
}

#[tokio::test]
async fn http_endpoints_answer() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(1, 1, 1, 60, ""))?;
    let task = agg.json("/api/task").await?;
    assert_eq!(task["shape"]["modules"], 12);
    assert_eq!(
        task["module_names"][0],
        "encoder.layer.0.attention.self.query"
    );
    let metrics = agg.metrics().await?;
    for name in [
        "fedsb_participants_connected",
        "fedsb_rounds_committed_total",
        "fedsb_updates_accepted_total",
        "fedsb_bytes_received_total",
        "fedsb_bytes_sent_total",
        "fedsb_round_duration_seconds",
        "fedsb_eval_round -1\n",
        "fedsb_eval_accuracy NaN\n",
        "fedsb_eval_failures_total 0\n",
        "fedsb_file_errors_total 0\n",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    let r = reqwest::get(agg.url("/api/rounds/77/global")).await?;
    assert_eq!(r.status(), 404);
    let r = reqwest::get(agg.url("/files/0000")).await?;
    assert_eq!(r.status(), 404);
    Ok(())
}
