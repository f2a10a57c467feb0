//! 50 native WebSocket participants run 5 rounds against the real aggregator;
//! every broadcast global state must equal the sample-weighted mean of that
//! round's updates, computed here independently.

use fedsb_e2e::*;
use fedsb_protocol::{RoundId, ServerMessage};

const CLIENTS: usize = 50;
const ROUNDS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_participants_five_rounds_exact_weighted_mean() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(
        ROUNDS,
        CLIENTS as u32,
        CLIENTS as u32,
        120,
        "",
    ))?;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let (mut p, _) = Participant::join(agg.addr, &format!("native-{i}")).await?;
        // Round 0, the initial state, comes right after Welcome.
        let initial = p.wait_global(RoundId(0)).await?;
        assert!(initial
            .named_tensors()
            .all(|(_, t)| t.data.iter().all(|&x| x == 0.0)));
        clients.push(p);
    }
    assert_eq!(
        agg.json("/api/status").await?["participants_connected"],
        CLIENTS
    );

    for round in 1..=ROUNDS {
        let round = RoundId(round);
        let mut sent = Vec::new();
        // All participants submit concurrently.
        let mut tasks = Vec::new();
        for (i, mut p) in clients.drain(..).enumerate() {
            let samples = 10 + (i as u64 * 7 + round.0 * 3) % 90;
            let state = known_state(&TEST_SHAPE, round.0 * 1000 + i as u64);
            sent.push((samples as f64, state.clone()));
            tasks.push(tokio::spawn(async move {
                let open = p.wait_round_open().await?;
                anyhow::ensure!(
                    open == round,
                    "participant {i} saw round {open}, expected {round}"
                );
                let answer = p.submit(update(round, samples, state)).await?;
                anyhow::ensure!(
                    answer == ServerMessage::UpdateAccepted { round },
                    "participant {i}: {answer:?}"
                );
                let global = p.wait_global(round).await?;
                Ok::<_, anyhow::Error>((p, global))
            }));
        }
        let refs: Vec<(f64, &fedsb_protocol::AdapterState)> =
            sent.iter().map(|(w, s)| (*w, s)).collect();
        let want = weighted_mean(&refs);
        let mut first: Option<fedsb_protocol::AdapterState> = None;
        for t in tasks {
            let (p, global) = t.await??;
            let err = max_rel_error(&global, &want);
            assert!(err <= 1e-6, "round {round}: relative error {err}");
            // Everyone receives the identical state.
            if let Some(f) = &first {
                assert_eq!(f, &global);
            } else {
                first = Some(global);
            }
            clients.push(p);
        }
    }

    for p in &mut clients {
        let m = p.recv().await?;
        assert_eq!(
            m,
            ServerMessage::TaskFinished {
                rounds_committed: ROUNDS
            }
        );
    }
    let rounds = agg.json("/api/rounds").await?;
    let rounds = rounds.as_array().unwrap();
    assert_eq!(
        rounds.len(),
        ROUNDS as usize + 1,
        "round 0 plus {ROUNDS} rounds"
    );
    for r in &rounds[1..] {
        assert_eq!(r["participants"], CLIENTS);
        assert!(r["bytes_in"].as_u64().unwrap() > 0);
    }
    assert_eq!(agg.json("/api/status").await?["state"], "finished");
    assert_eq!(
        agg.metric("fedsb_updates_accepted_total").await?,
        (CLIENTS as u64 * ROUNDS) as f64
    );
    assert_eq!(
        agg.metric("fedsb_rounds_committed_total").await?,
        ROUNDS as f64
    );
    Ok(())
}
