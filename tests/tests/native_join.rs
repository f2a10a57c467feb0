//! Native participants end to end: `fedsb init` makes the adapter file from
//! seed data on a tiny random BERT, `fedsb serve` serves it, and `fedsb join`
//! processes download the files, train on the GPU (lavapipe here) and send
//! their R's for every round. A missing GPU adapter fails these tests.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context};
use fedsb_e2e::process::{check_success, fedsb_init, last_json_line, spawn_join, wait_child};
use fedsb_e2e::tiny_model::{labelled_tsv, write_tiny_model, LABELS};
use fedsb_e2e::*;
use fedsb_protocol::{AdapterState, RoundId, ServerMessage};

const ROUNDS: u64 = 3;
const RANK: u32 = 4;
/// Whole-process limit for one `fedsb join` run.
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// A task directory: tiny model, seed data, two participants' data, adapter
/// file made by `fedsb init`.
struct TaskDir {
    tmp: tempfile::TempDir,
}

impl TaskDir {
    fn path(&self) -> &Path {
        self.tmp.path()
    }

    fn new(with_adapter: bool) -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        write_tiny_model(&dir.join("model"), 11)?;
        std::fs::write(dir.join("seed.tsv"), labelled_tsv(48, 1, 0.5))?;
        // Different data, and different class balance, per participant.
        std::fs::write(dir.join("a.tsv"), labelled_tsv(40, 2, 0.3))?;
        std::fs::write(dir.join("b.tsv"), labelled_tsv(56, 3, 0.7))?;
        let me = Self { tmp };
        if with_adapter {
            me.run_init()?;
        }
        Ok(me)
    }

    fn run_init(&self) -> anyhow::Result<()> {
        let dir = self.path();
        let report = fedsb_init(
            dir,
            RANK,
            &["--init-samples", "32", "--batch", "8", "--lr", "0.01"],
        )?;
        assert_eq!(report["rank"], RANK);
        assert_eq!(report["modules"], 12, "2 layers × 6 modules");
        assert_eq!(report["labels"], serde_json::json!(LABELS));
        assert_eq!(report["init_samples"], 32);
        Ok(())
    }

    /// Writes task.toml: 2 participants per round, `ROUNDS` rounds.
    fn write_config(&self, with_adapter: bool) -> anyhow::Result<()> {
        self.write_config_with(with_adapter, "")
    }

    /// Writes task.toml with a quorum of 1: a participant trains rounds alone.
    fn write_config_alone(&self) -> anyhow::Result<()> {
        self.write_config(true)?;
        let path = self.path().join("task.toml");
        let text =
            std::fs::read_to_string(&path)?.replace("min_participants = 2", "min_participants = 1");
        std::fs::write(&path, text)?;
        Ok(())
    }

    /// Writes task.toml with `extra` (whole sections) appended.
    fn write_config_with(&self, with_adapter: bool, extra: &str) -> anyhow::Result<()> {
        let adapter = if with_adapter {
            "file = \"adapter.safetensors\"\n"
        } else {
            ""
        };
        let config = format!(
            r#"[task]
id = "native-join"
rounds = {ROUNDS}
min_participants = 2
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
{adapter}[server]
ping_interval_secs = 1
idle_timeout_secs = 60
{extra}"#,
            LABELS[0], LABELS[1]
        );
        std::fs::write(self.path().join("task.toml"), config)?;
        Ok(())
    }
}

/// The committed global state of `round`, decoded from the stored frame.
async fn global_of(agg: &Aggregator, round: u64) -> anyhow::Result<(u32, AdapterState)> {
    let r = reqwest::get(agg.url(&format!("/api/rounds/{round}/global"))).await?;
    if !r.status().is_success() {
        bail!("GET /api/rounds/{round}/global: {}", r.status());
    }
    match ServerMessage::decode(&r.bytes().await?)? {
        ServerMessage::GlobalModel {
            round: got,
            participants,
            adapter,
            ..
        } => {
            assert_eq!(got, RoundId(round));
            Ok((participants, adapter))
        }
        other => bail!("round {round}: expected a GlobalModel frame, got {other:?}"),
    }
}

fn flat(s: &AdapterState) -> Vec<f32> {
    s.named_tensors()
        .flat_map(|(_, t)| t.data.iter().copied())
        .collect()
}

/// Round 0 is `fedsb init`'s state: every R₀ = diag(S) (diagonal,
/// non-negative, not all zero) and a non-zero head.
fn assert_is_lora_sb_init(state: &AdapterState) {
    let r = RANK as usize;
    for (m, t) in state.r.iter().enumerate() {
        assert_eq!(t.shape, vec![RANK, RANK]);
        for i in 0..r {
            for j in 0..r {
                let x = t.data[i * r + j];
                if i == j {
                    assert!(x >= 0.0, "R₀ of module {m}: negative singular value {x}");
                } else {
                    assert_eq!(x, 0.0, "R₀ of module {m} is not diagonal at ({i}, {j})");
                }
            }
        }
        assert!(t.data[0] > 0.0, "R₀ of module {m} is zero");
    }
    assert!(state.head_weight.data.iter().any(|&x| x != 0.0));
}

/// Checks the committed rounds: `ROUNDS` rounds of 2 participants, each
/// global state finite and different from round 0 (and from the round before).
async fn assert_rounds(agg: &Aggregator) -> anyhow::Result<()> {
    let rounds = agg.json("/api/rounds").await?;
    let rounds = rounds.as_array().context("/api/rounds is not an array")?;
    assert_eq!(
        rounds.len(),
        ROUNDS as usize + 1,
        "round 0 plus {ROUNDS}: {rounds:?}"
    );
    for r in &rounds[1..] {
        assert_eq!(r["participants"], 2, "{r}");
    }
    let (_, round0) = global_of(agg, 0).await?;
    assert_is_lora_sb_init(&round0);
    let mut previous = flat(&round0);
    for n in 1..=ROUNDS {
        let (participants, state) = global_of(agg, n).await?;
        assert_eq!(participants, 2, "round {n}");
        let values = flat(&state);
        assert!(
            values.iter().all(|x| x.is_finite()),
            "round {n}: non-finite values"
        );
        assert_ne!(values, flat(&round0), "round {n} equals round 0");
        assert_ne!(values, previous, "round {n} equals round {}", n - 1);
        let moved = state
            .r
            .iter()
            .zip(&round0.r)
            .filter(|(a, b)| a.data != b.data)
            .count();
        assert!(moved > 0, "round {n}: no R changed");
        previous = values;
    }
    assert_eq!(agg.json("/api/status").await?["state"], "finished");
    Ok(())
}

fn assert_join_report(name: &str, out: &Output, rounds: u64) -> anyhow::Result<()> {
    check_success(&format!("fedsb join ({name})"), out)?;
    // Shown with --nocapture: the participant's progress log.
    eprintln!(
        "--- fedsb join ({name}) stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = last_json_line(out)?;
    assert_eq!(report["finished"], true, "{name}: {report}");
    assert_eq!(report["rounds_participated"], rounds, "{name}: {report}");
    assert_eq!(
        report["rounds_rejected"],
        serde_json::json!([]),
        "{name}: {report}"
    );
    // 4 local steps of 8 samples per round.
    assert_eq!(report["samples"], rounds * 4 * 8, "{name}: {report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_native_participants_train_three_rounds() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    let agg = Aggregator::start_in(task.path())?;

    let a = spawn_join(task.path(), &agg, "a.tsv", "a", &[])?;
    let b = spawn_join(task.path(), &agg, "b.tsv", "b", &[])?;
    let (a, b) = tokio::join!(wait_child(a, JOIN_TIMEOUT), wait_child(b, JOIN_TIMEOUT));
    let (a, b) = (a?, b?);
    assert_join_report("a", &a, ROUNDS)?;
    assert_join_report("b", &b, ROUNDS)?;
    assert_rounds(&agg).await?;

    // Files were downloaded once into each cache, verified by hash.
    let cached: Vec<PathBuf> = std::fs::read_dir(task.path().join("cache-a"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|p| p.is_file())
        .collect();
    assert_eq!(
        cached.len(),
        4,
        "config, weights, tokenizer, adapter: {cached:?}"
    );
    // Next to them, the participant key of this task and data file.
    let keys: Vec<PathBuf> = std::fs::read_dir(task.path().join("cache-a").join("participants"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    assert_eq!(keys.len(), 1, "{keys:?}");
    let name = keys[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with("native-join-") && name.ends_with(".key"),
        "{name}"
    );

    // A participant joining the finished task is told so before it
    // downloads anything.
    let late = spawn_join(task.path(), &agg, "a.tsv", "late", &[])?;
    let late = wait_child(late, JOIN_TIMEOUT).await?;
    check_success("fedsb join (late)", &late)?;
    let report = last_json_line(&late)?;
    assert_eq!(report["finished"], true, "{report}");
    assert_eq!(report["rounds_participated"], 0, "{report}");
    let stderr = String::from_utf8_lossy(&late.stderr);
    assert!(
        stderr.contains("the task has finished; nothing to train rounds=3"),
        "{stderr}"
    );
    let downloaded = std::fs::read_dir(task.path().join("cache-late"))?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_file()))
        .count();
    assert_eq!(downloaded, 0, "the late participant downloaded files");
    Ok(())
}

/// `fedsb join` sends its round-1 update and exits; the aggregator is killed
/// before round 1 commits. Restarted, the aggregator has the update back;
/// the participant, started again on the same data and cache, is recognized
/// by its participant key, told its update is in and does not train round 1
/// again; round 1 commits that update and a scripted participant's, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_restarted_after_an_aggregator_crash_is_not_counted_twice(
) -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    let mut agg = Aggregator::start_in(task.path())?;
    let first = spawn_join(task.path(), &agg, "a.tsv", "a", &["--max-rounds", "1"])?;
    let first = wait_child(first, JOIN_TIMEOUT).await?;
    check_success("fedsb join (first run)", &first)?;
    let report = last_json_line(&first)?;
    assert_eq!(report["rounds_participated"], 1, "{report}");
    assert_eq!(report["samples"], 4 * 8, "{report}");
    assert_eq!(agg.json("/api/status").await?["updates_in_round"], 1);

    agg.kill9();
    let agg = Aggregator::start_in(task.path())?;
    let status = agg.json("/api/status").await?;
    assert_eq!(status["round"], 1, "{status}");
    assert_eq!(status["updates_in_round"], 1, "{status}");

    let again = spawn_join(task.path(), &agg, "a.tsv", "a", &["--max-rounds", "1"])?;
    let again = wait_child(again, JOIN_TIMEOUT).await?;
    check_success("fedsb join (after the restart)", &again)?;
    let report = last_json_line(&again)?;
    assert_eq!(report["rounds_participated"], 1, "{report}");
    assert_eq!(report["rounds_rejected"], serde_json::json!([]), "{report}");
    assert_eq!(report["samples_trained"], 0, "{report}");
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        log.contains("accepted before we connected"),
        "the second run did not hear that its update was in:\n{log}"
    );

    let (mut b, _) = Participant::join(agg.addr, "scripted").await?;
    assert_eq!(b.wait_round_open().await?, RoundId(1));
    let (_, round0) = global_of(&agg, 0).await?;
    assert_eq!(
        b.submit(update(RoundId(1), 10, round0)).await?,
        ServerMessage::UpdateAccepted { round: RoundId(1) }
    );
    b.wait_global(RoundId(1)).await?;
    let rounds = agg.json("/api/rounds").await?;
    let r1 = &rounds[1];
    assert_eq!(r1["participants"], 2, "{r1}");
    assert_eq!(r1["total_samples"], 4 * 8 + 10, "{r1}");
    Ok(())
}

/// The aggregator is killed while `fedsb join` takes part in round 2 (it is
/// training, sending or waiting, whichever the kill finds) and restarted on
/// the same port. The participant reconnects by itself with its key and
/// finishes the task without training any round twice: an update the
/// aggregator had accepted is not sent again, one it had not is sent again
/// as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_reconnects_when_the_aggregator_restarts() -> anyhow::Result<()> {
    const KEY_B: &str = "scripted-b-0123456789abcdef";
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    let mut agg = Aggregator::start_in(task.path())?;
    let port = agg.addr.port();
    let a = spawn_join(task.path(), &agg, "a.tsv", "a", &["--reconnect-for", "120"])?;
    let (mut b, _) = Participant::join_as(agg.addr, "b", Some(KEY_B)).await?;
    let (_, round0) = global_of(&agg, 0).await?;
    assert_eq!(b.wait_round_open().await?, RoundId(1));
    assert_eq!(
        b.submit(update(RoundId(1), 10, round0.clone())).await?,
        ServerMessage::UpdateAccepted { round: RoundId(1) }
    );
    // Round 1 commits when `a` has sent its update; round 2 opens and `a`
    // starts training it. Kill the aggregator then.
    b.wait_global(RoundId(1)).await?;
    agg.kill9();
    drop(b);
    let agg = Aggregator::start_in_on(task.path(), port)?;
    assert_eq!(agg.addr.port(), port);

    // b takes part in rounds 2 and 3 after the restart.
    let (mut b, _) = Participant::join_as(agg.addr, "b", Some(KEY_B)).await?;
    for r in 2..=ROUNDS {
        assert_eq!(b.wait_round_open().await?, RoundId(r));
        assert_eq!(
            b.submit(update(RoundId(r), 10, round0.clone())).await?,
            ServerMessage::UpdateAccepted { round: RoundId(r) }
        );
    }
    let out = wait_child(a, JOIN_TIMEOUT).await?;
    check_success("fedsb join", &out)?;
    let log = String::from_utf8_lossy(&out.stderr);
    let report = last_json_line(&out)?;
    assert_eq!(report["finished"], true, "{report}");
    assert_eq!(report["reconnects"], 1, "{report}");
    assert_eq!(report["rounds"], serde_json::json!([1, 2, 3]), "{report}");
    assert_eq!(report["rounds_rejected"], serde_json::json!([]), "{report}");
    // Every round trained exactly once: 4 steps of 8 samples each.
    assert_eq!(report["samples_trained"], ROUNDS * 4 * 8, "{report}\n{log}");
    assert_eq!(report["samples"], ROUNDS * 4 * 8, "{report}");
    let path = if log.contains("sending it again") {
        "its round-2 update was lost and sent again"
    } else if log.contains("before the reconnect was accepted") || log.contains("accepted before") {
        "its round-2 update had been accepted"
    } else {
        "it trained round 2 after the reconnect"
    };
    eprintln!("fedsb join reconnected; {path}");
    let rounds = agg.json("/api/rounds").await?;
    for r in 1..=ROUNDS as usize {
        assert_eq!(rounds[r]["participants"], 2, "{}", rounds[r]);
        assert_eq!(rounds[r]["total_samples"], 4 * 8 + 10, "{}", rounds[r]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_and_scripted_participants_share_a_task() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    let agg = Aggregator::start_in(task.path())?;

    let native = spawn_join(task.path(), &agg, "a.tsv", "native", &[])?;
    let (mut scripted, welcome) = Participant::join(agg.addr, "scripted").await?;
    let ServerMessage::Welcome { task: info, .. } = welcome else {
        unreachable!("join returns Welcome");
    };
    let global0 = scripted.wait_global(RoundId(0)).await?;
    let mut global = global0.clone();
    for n in 1..=ROUNDS {
        let round = scripted.wait_round_open().await?;
        assert_eq!(round, RoundId(n));
        // The scripted participant sends the global state nudged by a known amount.
        let mut mine = global.clone();
        for t in mine.tensors_mut() {
            for x in &mut t.data {
                *x += 0.01;
            }
        }
        let answer = scripted.submit(update(round, 10, mine)).await?;
        assert!(
            matches!(answer, ServerMessage::UpdateAccepted { .. }),
            "round {n}: {answer:?}"
        );
        global = scripted.wait_global(round).await?;
        global.validate(&info.shape)?;
    }
    let out = wait_child(native, JOIN_TIMEOUT).await?;
    assert_join_report("native", &out, ROUNDS)?;
    assert_rounds(&agg).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_a_task_without_an_adapter_file() -> anyhow::Result<()> {
    let task = TaskDir::new(false)?;
    task.write_config(false)?;
    let agg = Aggregator::start_in(task.path())?;
    let child = spawn_join(task.path(), &agg, "a.tsv", "a", &[])?;
    let out = wait_child(child, Duration::from_secs(60)).await?;
    assert!(
        !out.status.success(),
        "fedsb join must fail without an adapter file"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fedsb init") && stderr.contains("[adapter] file"),
        "the error must tell the operator to run fedsb init: {stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_data_whose_labels_are_not_the_tasks() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    std::fs::write(
        task.path().join("bad.tsv"),
        "sentence\tlabel\ngood movie .\tpositive\nbad movie .\tneutral\n",
    )?;
    let agg = Aggregator::start_in(task.path())?;
    let child = spawn_join(task.path(), &agg, "bad.tsv", "bad", &[])?;
    let out = wait_child(child, Duration::from_secs(60)).await?;
    assert!(
        !out.status.success(),
        "fedsb join must refuse unknown labels"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("neutral") && stderr.contains("negative"),
        "the error must name the bad label and the task's classes: {stderr}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_a_dp_task_whose_budget_it_cannot_meet() -> anyhow::Result<()> {
    // A DP task is trained with DP-SGD (tests/dp.rs); a target ε no noise
    // level reaches is refused with a clear message, never trained un-noised.
    let task = TaskDir::new(true)?;
    task.write_config_with(true, "[privacy]\nenabled = true\nepsilon = 0.0001\n")?;
    let agg = Aggregator::start_in(task.path())?;
    let child = spawn_join(task.path(), &agg, "a.tsv", "a", &[])?;
    let out = wait_child(child, Duration::from_secs(60)).await?;
    assert!(
        !out.status.success(),
        "fedsb join must refuse an unreachable DP target"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("differential privacy") && stderr.contains("calibrating the noise"),
        "{stderr}"
    );
    assert_eq!(agg.metric("fedsb_updates_accepted_total").await?, 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leaves_after_max_rounds() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config_alone()?;
    let agg = Aggregator::start_in(task.path())?;
    let child = spawn_join(task.path(), &agg, "a.tsv", "a", &["--max-rounds", "1"])?;
    let out = wait_child(child, JOIN_TIMEOUT).await?;
    check_success("fedsb join --max-rounds 1", &out)?;
    let report = last_json_line(&out)?;
    assert_eq!(report["finished"], false, "{report}");
    assert_eq!(report["rounds"], serde_json::json!([1]), "{report}");
    assert_eq!(report["samples"], 4 * 8, "{report}");
    // Round 1 committed with it alone; round 2 is open, waiting for others.
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds.as_array().map(Vec::len), Some(2), "{rounds}");
    assert_eq!(rounds[1]["participants"], 1);
    Ok(())
}

/// A TLS reverse proxy on 127.0.0.1 in front of `upstream`, with the
/// test-only self-signed certificate of `tests/fixtures/tls` (for
/// `localhost` and 127.0.0.1): what an operator puts before a public
/// aggregator. Returns its port.
async fn tls_proxy(upstream: std::net::SocketAddr) -> anyhow::Result<u16> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls");
    let certs = CertificateDer::pem_file_iter(fixtures.join("localhost.crt"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(fixtures.join("localhost.key"))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                }
            });
        }
    });
    Ok(port)
}

/// An aggregator behind a TLS reverse proxy: `fedsb join --server
/// https://localhost:PORT --ca-cert <the proxy's certificate>` downloads the
/// files over https, speaks the protocol over wss and finishes its round;
/// without `--ca-cert` it refuses the self-signed certificate and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_joins_over_tls_through_a_reverse_proxy() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config_alone()?;
    let agg = Aggregator::start_in(task.path())?;
    let port = tls_proxy(agg.addr).await?;
    let server = format!("https://localhost:{port}");
    let cert = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tls/localhost.crt");
    let join = |extra: &[&str]| -> anyhow::Result<std::process::Child> {
        Ok(std::process::Command::new(fedsb_bin())
            .arg("join")
            .args(["--server", &server])
            .arg("--data")
            .arg(task.path().join("a.tsv"))
            .arg("--cache-dir")
            .arg(task.path().join("cache-tls"))
            .args(["--max-rounds", "1", "--reconnect-for", "0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?)
    };
    let refused = wait_child(join(&[])?, JOIN_TIMEOUT).await?;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("certificate") && stderr.contains("api/task"),
        "{stderr}"
    );
    let out = wait_child(
        join(&["--ca-cert", cert.to_str().context("path")?])?,
        JOIN_TIMEOUT,
    )
    .await?;
    check_success("fedsb join over https", &out)?;
    let report = last_json_line(&out)?;
    assert_eq!(report["rounds"], serde_json::json!([1]), "{report}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("wss://localhost:{port}/ws")),
        "{stderr}"
    );
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[1]["participants"], 1, "{rounds}");
    Ok(())
}

/// Waits until the aggregator has accepted an update, which `join` (a
/// `fedsb join`) sends; returns it. Without one within `within`, `join` is
/// killed and the error shows its log.
async fn first_update_from(
    agg: &Aggregator,
    mut join: std::process::Child,
    within: Duration,
) -> anyhow::Result<std::process::Child> {
    let started = std::time::Instant::now();
    while agg.metric("fedsb_updates_accepted_total").await? < 1.0 {
        if started.elapsed() > within {
            let _ = join.kill();
            let out = join.wait_with_output()?;
            bail!(
                "fedsb join sent no update: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(join)
}

/// A participant whose reconnect window runs out exits with an error that
/// says so (status 1), not a panic: it closed its lost connection twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_cannot_reconnect_says_why() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    let mut agg = Aggregator::start_in(task.path())?;
    // The round waits for a second participant, so `a` stays connected
    // after its update was accepted.
    let a = spawn_join(task.path(), &agg, "a.tsv", "a", &["--reconnect-for", "2"])?;
    let a = first_update_from(&agg, a, Duration::from_secs(60)).await?;
    agg.kill9();
    let out = wait_child(a, JOIN_TIMEOUT).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("could not reconnect") && !stderr.contains("panicked"),
        "{stderr}"
    );
    Ok(())
}

/// A server that goes silent with its connections open (here stopped with
/// SIGSTOP, as a frozen host or a half-open connection looks) is noticed:
/// the participant pings, hears nothing for 60 s, counts the connection
/// lost and tries to reconnect; with nobody answering, its window runs out
/// and it exits 1 saying so, instead of waiting forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_noticed_and_left() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    let agg = Aggregator::start_in(task.path())?;
    let a = spawn_join(task.path(), &agg, "a.tsv", "a", &["--reconnect-for", "1"])?;
    let a = first_update_from(&agg, a, JOIN_TIMEOUT).await?;
    let pid = agg.child.id().to_string();
    let signal = |s: &str| std::process::Command::new("kill").args([s, &pid]).status();
    anyhow::ensure!(signal("-STOP")?.success(), "kill -STOP {pid}");
    let out = wait_child(a, Duration::from_secs(240)).await;
    signal("-CONT")?;
    let out = out?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("no frame from the server for 60 s")
            && stderr.contains("could not reconnect"),
        "{stderr}"
    );
    Ok(())
}

/// Ctrl-C (SIGINT) or SIGTERM in the rounds: the participant waits for the
/// answers to the updates it sent, sends `Leave`, prints its summary with
/// `"stopped": true` and exits with the signal's status (130, 143). Its
/// accepted update stays in the round, which commits when another
/// participant's comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_stopped_by_a_signal_leaves_and_reports() -> anyhow::Result<()> {
    let task = TaskDir::new(true)?;
    task.write_config(true)?;
    let agg = Aggregator::start_in(task.path())?;
    let signal = |s: &str, child: &std::process::Child| {
        std::process::Command::new("kill")
            .args([s, &child.id().to_string()])
            .status()
    };
    let updates = |n: f64| {
        let agg = &agg;
        async move {
            let started = std::time::Instant::now();
            while agg.metric("fedsb_updates_accepted_total").await? < n {
                anyhow::ensure!(started.elapsed() < JOIN_TIMEOUT, "not {n} updates");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        }
    };
    // Round 1 waits for a second participant after a's update.
    let a = spawn_join(task.path(), &agg, "a.tsv", "a", &[])?;
    let a = first_update_from(&agg, a, JOIN_TIMEOUT).await?;
    anyhow::ensure!(signal("-INT", &a)?.success(), "kill -INT");
    let out = wait_child(a, Duration::from_secs(30)).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("stopping: leaving the task"), "{stderr}");
    let report = last_json_line(&out)?;
    assert_eq!(report["stopped"], true, "{report}");
    assert_eq!(report["finished"], false, "{report}");
    assert_eq!(report["rounds"], serde_json::json!([1]), "{report}");
    let status = agg.json("/api/status").await?;
    assert_eq!(status["participants_connected"], 0, "{status}");
    assert_eq!(status["updates_in_round"], 1, "{status}");

    // b completes round 1 with a's update and waits in round 2: SIGTERM.
    let b = spawn_join(task.path(), &agg, "b.tsv", "b", &[])?;
    updates(3.0).await?;
    anyhow::ensure!(signal("-TERM", &b)?.success(), "kill -TERM");
    let out = wait_child(b, Duration::from_secs(30)).await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(143), "{stderr}");
    let report = last_json_line(&out)?;
    assert_eq!(report["stopped"], true, "{report}");
    assert_eq!(report["rounds"], serde_json::json!([1, 2]), "{report}");
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[1]["participants"], 2, "{rounds}");
    Ok(())
}
