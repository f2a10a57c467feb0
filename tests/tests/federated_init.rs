//! Federated LoRA-SB initialization (`[adapter] init = "federated"`) end to
//! end on a tiny random BERT: `fedsb join` participants send their summed
//! gradients before round 1, the aggregator makes the adapter file (A, B, R₀,
//! head), serves it by hash, and the rounds run as with `fedsb init`'s file.
//! A missing GPU adapter (lavapipe here) fails these tests.

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use fedsb_e2e::process::{spawn_join, wait_child};
use fedsb_e2e::tiny_model::{labelled_tsv, write_tiny_model, LABELS};
use fedsb_e2e::*;
use fedsb_protocol::{ClientMessage, ErrorCode, ServerMessage, Tensor};

const RANK: u32 = 4;
const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

fn setup() -> anyhow::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_tiny_model(&dir.join("model"), 11)?;
    std::fs::write(dir.join("seed.tsv"), labelled_tsv(48, 1, 0.5))?;
    std::fs::write(dir.join("a.tsv"), labelled_tsv(40, 2, 0.3))?;
    std::fs::write(dir.join("b.tsv"), labelled_tsv(56, 3, 0.7))?;
    Ok(tmp)
}

/// task.toml of a federated-init task.
fn write_config(
    dir: &Path,
    rounds: u64,
    participants: u32,
    init_samples: u64,
) -> anyhow::Result<()> {
    write_config_with(dir, rounds, participants, init_samples, "")
}

/// task.toml of a federated-init task with `extra` sections appended.
fn write_config_with(
    dir: &Path,
    rounds: u64,
    participants: u32,
    init_samples: u64,
    extra: &str,
) -> anyhow::Result<()> {
    let config = format!(
        r#"[task]
id = "federated-init"
rounds = {rounds}
min_participants = {participants}
max_participants = {participants}
round_deadline_secs = 600
labels = ["{}", "{}"]
local_steps = 2
batch_size = 8
learning_rate = 0.01
max_seq_len = 16
[model]
id = "tiny-random-bert"
dir = "model"
[adapter]
rank = {RANK}
init = "federated"
init_samples = {init_samples}
init_seed = 3
[server]
ping_interval_secs = 1
idle_timeout_secs = 60
{extra}"#,
        LABELS[0], LABELS[1]
    );
    std::fs::write(dir.join("task.toml"), config)?;
    Ok(())
}

fn check_success(what: &str, out: &Output) -> anyhow::Result<serde_json::Value> {
    eprintln!(
        "--- {what} stderr\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n--- stdout\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .context("no output on stdout")?;
    Ok(serde_json::from_str(line)?)
}

/// The `[out, in]` shape of module `module` of the tiny model (hidden 16,
/// intermediate 32): query, key, value and attention output 16×16, then
/// intermediate 32×16 and output 16×32, in each of its two layers.
fn module_shape(module: u32) -> [u32; 2] {
    match module % 6 {
        4 => [32, 16],
        5 => [16, 32],
        _ => [16, 16],
    }
}

/// A well-formed update of round 1 (8 examples) for the tiny model's task,
/// for the phases before round 1 opens.
fn round_one_update() -> fedsb_protocol::ClientUpdate {
    let shape = fedsb_protocol::AdapterShape {
        rank: RANK,
        modules: 12,
        head_classes: 2,
        head_hidden: 16,
    };
    update(fedsb_protocol::RoundId(1), 8, known_state(&shape, 1))
}

/// The adapter file the aggregator serves: its entry in `/api/task` and its
/// bytes from `/files/{sha256}`, checked against the hash.
async fn served_adapter(agg: &Aggregator) -> anyhow::Result<Vec<u8>> {
    let task = agg.json("/api/task").await?;
    let file = task["files"]
        .as_array()
        .context("files")?
        .iter()
        .find(|f| f["name"] == "adapter.safetensors")
        .with_context(|| format!("no adapter file in /api/task: {task}"))?
        .clone();
    let sha = file["sha256"].as_str().context("sha256")?;
    let r = reqwest::get(agg.url(&format!("/files/{sha}"))).await?;
    assert!(r.status().is_success(), "GET /files/{sha}: {}", r.status());
    let bytes = r.bytes().await?.to_vec();
    let got = {
        use std::fmt::Write as _;
        let digest = sha256(&bytes);
        digest.iter().fold(String::new(), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    };
    assert_eq!(got, sha, "the served adapter file matches its hash");
    assert_eq!(file["size"], bytes.len());
    Ok(bytes)
}

/// SHA-256 without another dependency: via `sha256sum`.
fn sha256(bytes: &[u8]) -> Vec<u8> {
    let tmp = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(tmp.path(), bytes).expect("write");
    let out = Command::new("sha256sum")
        .arg(tmp.path())
        .output()
        .expect("sha256sum");
    let hex = String::from_utf8_lossy(&out.stdout);
    let hex = hex.split_whitespace().next().unwrap_or_default().to_owned();
    (0..hex.len() / 2)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_participants_initialize_federatedly_then_train_two_rounds() -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    // With [eval]: the evaluator reads A and B from the adapter file once
    // the initialization has made it.
    write_config_with(dir, 2, 2, 24, "[eval]\nfile = \"seed.tsv\"\n")?;
    let agg = Aggregator::start_in(dir)?;
    assert_eq!(agg.json("/api/status").await?["state"], "initializing");
    // Nothing to serve yet: no adapter file, no round 0.
    let task = agg.json("/api/task").await?;
    assert!(
        !task["files"].to_string().contains("adapter.safetensors"),
        "{task}"
    );

    let a = spawn_join(dir, &agg, "a.tsv", "a", &[])?;
    let b = spawn_join(dir, &agg, "b.tsv", "b", &[])?;
    let (a, b) = tokio::join!(wait_child(a, JOIN_TIMEOUT), wait_child(b, JOIN_TIMEOUT));
    for (name, out) in [("a", a?), ("b", b?)] {
        let report = check_success(&format!("fedsb join ({name})"), &out)?;
        assert_eq!(report["finished"], true, "{name}: {report}");
        assert_eq!(report["rounds_participated"], 2, "{name}: {report}");
    }
    let rounds = agg.json("/api/rounds").await?;
    let rounds = rounds.as_array().context("rounds")?;
    assert_eq!(rounds.len(), 3, "round 0 plus 2: {rounds:?}");
    // Round 0 is the initialization: both participants, 24 examples each.
    assert_eq!(rounds[0]["participants"], 2, "{:?}", rounds[0]);
    assert_eq!(rounds[0]["total_samples"], 48, "{:?}", rounds[0]);
    for r in &rounds[1..] {
        assert_eq!(r["participants"], 2, "{r}");
    }
    // The adapter file is served by hash and holds A, B, R₀ = diag(S) for
    // all 12 modules and the head; round 0's R is its R₀.
    let bytes = served_adapter(&agg).await?;
    let t = shaped_tensors(&bytes)?;
    assert_eq!(t.len(), 12 * 3 + 2);
    // Its metadata names the model it was made for and the length the
    // participants' gradients ran at, so `fedsb eval` of it needs no flags.
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let metadata = header.metadata().clone().unwrap_or_default();
    assert_eq!(metadata.get("max_seq_len").map(String::as_str), Some("16"));
    let task = agg.json("/api/task").await?;
    let model_file = task["files"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "model.safetensors"))
        .with_context(|| format!("no model file in /api/task: {task}"))?;
    assert_eq!(
        metadata.get("base_model_sha256").map(String::as_str),
        model_file["sha256"].as_str(),
    );
    let r = RANK as usize;
    for (name, (shape, data)) in &t {
        assert!(data.iter().all(|x| x.is_finite()), "{name}");
        if name.ends_with("lora_R") {
            assert_eq!(shape, &vec![r, r]);
            for i in 0..r {
                for j in 0..r {
                    let x = data[i * r + j];
                    if i == j {
                        assert!(x >= 0.0, "{name}: negative singular value");
                    } else {
                        assert_eq!(x, 0.0, "{name} is not diagonal");
                    }
                }
            }
            assert!(data[0] > 0.0, "{name} is zero");
        }
    }
    let frame = reqwest::get(agg.url("/api/rounds/0/global"))
        .await?
        .bytes()
        .await?;
    let ServerMessage::GlobalModel { adapter, .. } = ServerMessage::decode(&frame)? else {
        bail!("round 0 is not a GlobalModel frame");
    };
    assert_eq!(
        adapter.r[0].data,
        t["encoder.layer.0.attention.self.query.lora_R"].1
    );
    assert_eq!(adapter.head_weight.data, t["classifier.weight"].1);
    assert_eq!(agg.json("/api/status").await?["state"], "finished");
    // Every committed round, round 0 included, gets evaluated.
    let started = Instant::now();
    loop {
        let list = agg.json("/api/rounds").await?;
        let arr = list.as_array().context("rounds")?;
        if arr.iter().all(|r| !r["eval"].is_null()) {
            for r in arr {
                let loss = r["eval"]["loss"].as_f64().context("eval.loss")?;
                assert!(loss.is_finite() && loss > 0.0, "{r}");
            }
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("rounds not all evaluated: {list}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_init_with_all_data_in_one_participant_equals_fedsb_init() -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    // Centralized: `fedsb init` on the seed data, with the task's head seed,
    // learning rate, batch size and sequence length.
    let out = Command::new(fedsb_bin())
        .arg("init")
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--train")
        .arg(dir.join("seed.tsv"))
        .args(["--labels", &LABELS.join(",")])
        .args(["--rank", &RANK.to_string()])
        .args(["--init-samples", "40", "--batch", "8", "--lr", "0.01"])
        .args(["--max-seq-len", "16", "--seed", "3"])
        .arg("--out")
        .arg(dir.join("central.safetensors"))
        .output()
        .context("running fedsb init")?;
    check_success("fedsb init", &out)?;
    let central = shaped_tensors(&std::fs::read(dir.join("central.safetensors"))?)?;

    // Federated: one participant holding all of the seed data.
    write_config(dir, 1, 1, 40)?;
    let agg = Aggregator::start_in(dir)?;
    let join = spawn_join(dir, &agg, "seed.tsv", "all", &["--seed", "3"])?;
    let out = wait_child(join, JOIN_TIMEOUT).await?;
    check_success("fedsb join", &out)?;
    let federated = shaped_tensors(&served_adapter(&agg).await?)?;

    // Same tensors; A, B and R₀ compared through B·R₀·A, which does not
    // depend on the SVD's sign conventions. The two pipelines are the same
    // code on the same batches (the f64 sum of one participant's f32
    // gradients is exact), so they agree to rounding; the tolerance only
    // allows for a GPU reduction order that differs between runs.
    let mut names: Vec<&String> = central.keys().collect();
    names.sort();
    let fed_names: Vec<&String> = {
        let mut n: Vec<&String> = federated.keys().collect();
        n.sort();
        n
    };
    assert_eq!(names, fed_names);
    assert_eq!(central["classifier.weight"], federated["classifier.weight"]);
    assert_eq!(central["classifier.bias"], federated["classifier.bias"]);
    let mut bitwise = true;
    for name in names.iter().filter(|n| n.ends_with(".lora_R")) {
        let module = name.trim_end_matches(".lora_R");
        for s in ["lora_A", "lora_B", "lora_R"] {
            let k = format!("{module}.{s}");
            assert_eq!(central[&k].0, federated[&k].0, "{k}: shape");
            bitwise &= central[&k].1 == federated[&k].1;
        }
        let err = product_difference(&central, &federated, module)?;
        assert!(
            err <= 1e-5,
            "{module}: B·R₀·A differs by {err:e} (relative)"
        );
        // The singular values R₀ = diag(S) agree too.
        let (rc, rf) = (
            &central[&format!("{module}.lora_R")].1,
            &federated[&format!("{module}.lora_R")].1,
        );
        for (a, b) in rc.iter().zip(rf) {
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1e-12),
                "{module}: R₀ {a} vs {b}"
            );
        }
    }
    eprintln!("federated and centralized adapter files bitwise equal: {bitwise}");
    Ok(())
}

/// `[adapter] centre_head = true` with two participants that hold the same
/// data: their gradients add up to twice one's (the same signs, so the same
/// A, B and R₀), and their logit sums to twice one's over twice the
/// examples, so round 0 equals `fedsb init --centre-head` on that data:
/// the file's head weight, and the bias centred. A participant counted once
/// in the sums, or samples counted once, would move the bias.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_centred_head_from_two_participants_equals_fedsb_init_centre_head() -> anyhow::Result<()>
{
    let tmp = setup()?;
    let dir = tmp.path();
    let init = |out: &str, extra: &[&str]| -> anyhow::Result<ShapedTensors> {
        let out_path = dir.join(out);
        let out = Command::new(fedsb_bin())
            .arg("init")
            .arg("--model")
            .arg(dir.join("model"))
            .arg("--train")
            .arg(dir.join("seed.tsv"))
            .args(["--labels", &LABELS.join(",")])
            .args(["--rank", &RANK.to_string()])
            .args(["--init-samples", "40", "--batch", "8", "--lr", "0.01"])
            .args(["--max-seq-len", "16", "--seed", "3"])
            .args(extra)
            .arg("--out")
            .arg(&out_path)
            .output()
            .context("running fedsb init")?;
        let report = check_success("fedsb init", &out)?;
        assert_eq!(report["centre_head"], !extra.is_empty(), "{report}");
        shaped_tensors(&std::fs::read(out_path)?)
    };
    let plain = init("plain.safetensors", &[])?;
    let centred = init("centred.safetensors", &["--centre-head"])?;
    // `fedsb init --centre-head` moves the bias and nothing else.
    assert_eq!(plain["classifier.weight"], centred["classifier.weight"]);
    assert_ne!(plain["classifier.bias"], centred["classifier.bias"]);
    let (b0, b1) = (&plain["classifier.bias"].1, &centred["classifier.bias"].1);
    assert!(
        ((b0[0] + b0[1]) - (b1[0] + b1[1])).abs() <= 1e-6,
        "the bias's sum moved: {b0:?} → {b1:?}"
    );

    write_config_with(dir, 1, 2, 40, "")?;
    let config = std::fs::read_to_string(dir.join("task.toml"))?
        .replace("init_seed = 3", "init_seed = 3\ncentre_head = true");
    std::fs::write(dir.join("task.toml"), config)?;
    let agg = Aggregator::start_in(dir)?;
    let a = spawn_join(dir, &agg, "seed.tsv", "a", &["--seed", "3"])?;
    let b = spawn_join(dir, &agg, "seed.tsv", "b", &["--seed", "3"])?;
    let (a, b) = tokio::join!(wait_child(a, JOIN_TIMEOUT), wait_child(b, JOIN_TIMEOUT));
    for (name, out) in [("a", a?), ("b", b?)] {
        let report = check_success(&format!("fedsb join ({name})"), &out)?;
        assert_eq!(report["finished"], true, "{name}: {report}");
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(log.contains("sending the logit sums"), "{name}: {log}");
    }
    // The served file holds the head the gradients were taken with.
    let served = shaped_tensors(&served_adapter(&agg).await?)?;
    assert_eq!(served["classifier.bias"], plain["classifier.bias"]);
    let frame = reqwest::get(agg.url("/api/rounds/0/global"))
        .await?
        .bytes()
        .await?;
    let ServerMessage::GlobalModel {
        adapter,
        participants,
        total_samples,
        ..
    } = ServerMessage::decode(&frame)?
    else {
        bail!("round 0 is not a GlobalModel frame");
    };
    assert_eq!((participants, total_samples), (0, 0), "round 0's frame");
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[0]["participants"], 2, "{}", rounds[0]);
    assert_eq!(rounds[0]["total_samples"], 80, "{}", rounds[0]);
    assert_eq!(adapter.head_weight.data, centred["classifier.weight"].1);
    let gap = adapter
        .head_bias
        .data
        .iter()
        .zip(&centred["classifier.bias"].1)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!(
        "round 0's bias {:?}, fedsb init --centre-head's {:?}: within {gap:e}",
        adapter.head_bias.data, centred["classifier.bias"].1
    );
    assert!(gap <= 1e-5, "round 0's bias differs by {gap:e}");
    Ok(())
}

/// Centring over the wire with scripted participants: after the
/// initialization the task waits (status `centring`, no round 0 yet) for
/// the logit sums; bad ones get typed errors and count for nothing, a
/// participant joining meanwhile is asked too, and round 0's bias is the
/// file's (zero) shifted by the sums' means: (−8 + 0)/32 and (4 + 4)/32,
/// less their average 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn centring_takes_only_valid_logit_sums_and_asks_late_joiners_too() -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    write_config(dir, 1, 1, 16)?;
    let config = std::fs::read_to_string(dir.join("task.toml"))?
        .replace("max_participants = 1", "max_participants = 2")
        .replace("init_seed = 3", "init_seed = 3\ncentre_head = true");
    std::fs::write(dir.join("task.toml"), config)?;
    let agg = Aggregator::start_in(dir)?;

    let (mut s, _) = Participant::join(agg.addr, "scripted").await?;
    let ServerMessage::InitRequest { .. } = s.recv().await? else {
        bail!("expected InitRequest after Welcome");
    };
    for module in 0..12u32 {
        let mut g = Tensor::zeros(&module_shape(module));
        for (i, x) in g.data.iter_mut().enumerate() {
            *x = ((i * 7919 + module as usize) % 13) as f32 - 6.0;
        }
        s.send(&ClientMessage::InitGradient {
            module,
            gradient: g,
        })
        .await?;
    }
    s.send(&ClientMessage::InitDone { num_samples: 16 }).await?;
    let ServerMessage::InitAccepted { num_samples: 16 } = s.recv().await? else {
        bail!("expected InitAccepted");
    };
    // The only participant is in: the file is served, round 0 waits.
    let ServerMessage::AdapterReady { .. } = s.recv().await? else {
        bail!("expected AdapterReady");
    };
    let ServerMessage::CentreRequest {
        init_samples,
        batch_size,
        adapter: initial,
    } = s.recv().await?
    else {
        bail!("expected CentreRequest after AdapterReady");
    };
    assert_eq!((init_samples, batch_size), (16, 8));
    assert_eq!(initial.head_bias.data, [0.0, 0.0], "fedsb init's head bias");
    assert_eq!(agg.json("/api/status").await?["state"], "centring");
    assert_eq!(agg.json("/api/rounds").await?, serde_json::json!([]));
    let sums = |a: f32, b: f32| Tensor::new(vec![2], vec![a, b]).unwrap();
    for (logit_sums, num_samples, code) in [
        (
            Tensor::new(vec![3], vec![0.0; 3]).unwrap(),
            16,
            ErrorCode::ShapeMismatch,
        ),
        (sums(f32::NAN, 0.0), 16, ErrorCode::NonFinite),
        (sums(1e30, -1e30), 0, ErrorCode::InvalidSampleCount),
        (sums(1e30, -1e30), 17, ErrorCode::InvalidSampleCount),
    ] {
        s.send(&ClientMessage::CentreLogits {
            logit_sums,
            num_samples,
        })
        .await?;
        s.expect_error(code).await?;
    }
    // No round is open yet.
    let answer = s.submit(round_one_update()).await?;
    assert!(
        matches!(
            &answer,
            ServerMessage::Error {
                code: ErrorCode::FutureRound,
                message,
            } if message.contains("centring")
        ),
        "{answer:?}"
    );
    // A late participant is asked as well; until it answers, round 0 waits.
    let (mut late, welcome) = Participant::join(agg.addr, "late").await?;
    let ServerMessage::Welcome { task, .. } = welcome else {
        bail!("expected Welcome");
    };
    assert!(
        task.files.iter().any(|f| f.name == "adapter.safetensors"),
        "{task:?}"
    );
    let ServerMessage::CentreRequest { adapter, .. } = late.recv().await? else {
        bail!("expected CentreRequest after Welcome");
    };
    assert_eq!(adapter, initial);
    s.send(&ClientMessage::CentreLogits {
        logit_sums: sums(-8.0, 4.0),
        num_samples: 16,
    })
    .await?;
    let ServerMessage::CentreAccepted { num_samples: 16 } = s.recv().await? else {
        bail!("expected CentreAccepted");
    };
    s.send(&ClientMessage::CentreLogits {
        logit_sums: sums(-8.0, 4.0),
        num_samples: 16,
    })
    .await?;
    s.expect_error(ErrorCode::DuplicateUpdate).await?;
    assert_eq!(agg.json("/api/status").await?["state"], "centring");
    late.send(&ClientMessage::CentreLogits {
        logit_sums: sums(0.0, 4.0),
        num_samples: 16,
    })
    .await?;
    let ServerMessage::CentreAccepted { .. } = late.recv().await? else {
        bail!("expected CentreAccepted");
    };
    for p in [&mut s, &mut late] {
        let ServerMessage::GlobalModel { round, adapter, .. } = p.recv().await? else {
            bail!("expected round 0's GlobalModel");
        };
        assert_eq!(round.0, 0);
        assert_eq!(adapter.r, initial.r);
        assert_eq!(adapter.head_weight, initial.head_weight);
        assert_eq!(adapter.head_bias.data, [0.25, -0.25]);
        let ServerMessage::RoundOpen { round, .. } = p.recv().await? else {
            bail!("expected RoundOpen of round 1");
        };
        assert_eq!(round.0, 1);
    }
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[0]["participants"], 1, "{rounds}");
    assert_eq!(rounds[0]["total_samples"], 16, "{rounds}");
    // After round 0, logit sums are refused with a typed error.
    late.send(&ClientMessage::CentreLogits {
        logit_sums: sums(0.0, 4.0),
        num_samples: 16,
    })
    .await?;
    late.expect_error(ErrorCode::NotInitializing).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_init_gradient_is_rejected_and_the_honest_participant_initializes(
) -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    write_config(dir, 1, 1, 16)?;
    let agg = Aggregator::start_in(dir)?;

    let (mut bad, _) = Participant::join(agg.addr, "malformed").await?;
    let ServerMessage::InitRequest {
        init_samples,
        batch_size,
        head_weight,
        head_bias,
    } = bad.recv().await?
    else {
        bail!("expected InitRequest after Welcome");
    };
    assert_eq!((init_samples, batch_size), (16, 8));
    assert_eq!(head_weight.shape, vec![2, 16]);
    assert_eq!(head_bias.shape, vec![2]);
    // An update before round 1 is refused: no round is open yet.
    let answer = bad.submit(round_one_update()).await?;
    assert!(
        matches!(
            answer,
            ServerMessage::Error {
                code: ErrorCode::FutureRound,
                ..
            }
        ),
        "{answer:?}"
    );
    // Module 0 (query, 16×16) with the wrong shape.
    bad.send(&ClientMessage::InitGradient {
        module: 0,
        gradient: Tensor::zeros(&[16, 15]),
    })
    .await?;
    let m = bad.expect_error(ErrorCode::ShapeMismatch).await?;
    assert!(m.contains("[16, 15]"), "{m}");
    // A module the task does not have.
    bad.send(&ClientMessage::InitGradient {
        module: 12,
        gradient: Tensor::zeros(&[16, 16]),
    })
    .await?;
    bad.expect_error(ErrorCode::ShapeMismatch).await?;
    // A non-finite value.
    let mut nan = Tensor::zeros(&[16, 16]);
    nan.data[5] = f32::INFINITY;
    bad.send(&ClientMessage::InitGradient {
        module: 0,
        gradient: nan,
    })
    .await?;
    bad.expect_error(ErrorCode::NonFinite).await?;
    // One huge valid module, then InitDone without the others: refused, and
    // nothing of it counts.
    let mut huge = Tensor::zeros(&[16, 16]);
    huge.data.fill(1e30);
    bad.send(&ClientMessage::InitGradient {
        module: 0,
        gradient: huge,
    })
    .await?;
    bad.send(&ClientMessage::InitDone { num_samples: 5 })
        .await?;
    bad.expect_error(ErrorCode::NotInitializing).await?;
    // Every module (query, key, value, attention output 16×16, intermediate
    // 32×16, output 16×32, in both layers), but more examples than the
    // task's init_samples (16): refused, and nothing of it counts.
    for module in 0..12u32 {
        let mut g = Tensor::zeros(&module_shape(module));
        g.data.fill(1e30);
        bad.send(&ClientMessage::InitGradient {
            module,
            gradient: g,
        })
        .await?;
    }
    bad.send(&ClientMessage::InitDone { num_samples: 17 })
        .await?;
    let m = bad.expect_error(ErrorCode::InvalidSampleCount).await?;
    assert!(m.contains("init_samples (16)"), "{m}");
    assert_eq!(agg.json("/api/status").await?["state"], "initializing");
    drop(bad);

    let join = spawn_join(dir, &agg, "a.tsv", "honest", &[])?;
    let out = wait_child(join, JOIN_TIMEOUT).await?;
    let report = check_success("fedsb join", &out)?;
    assert_eq!(report["finished"], true, "{report}");
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[0]["participants"], 1, "{rounds}");
    assert_eq!(rounds[0]["total_samples"], 16, "{rounds}");
    served_adapter(&agg).await?;

    // After the initialization, init messages are refused with a typed error.
    let (mut late, _) = Participant::join(agg.addr, "late").await?;
    late.send(&ClientMessage::InitDone { num_samples: 1 })
        .await?;
    late.expect_error(ErrorCode::NotInitializing).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_repeats_an_unfinished_initialization_and_resumes_a_finished_one(
) -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    write_config(dir, 2, 1, 16)?;
    let mut agg = Aggregator::start_in(dir)?;

    // A participant sends part of its gradients; the aggregator dies.
    let (mut p, _) = Participant::join(agg.addr, "partial").await?;
    let ServerMessage::InitRequest { .. } = p.recv().await? else {
        bail!("expected InitRequest");
    };
    p.send(&ClientMessage::InitGradient {
        module: 0,
        gradient: Tensor::zeros(&[16, 16]),
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    agg.kill9();
    drop(p);

    // Restarted: still initializing, nothing committed or served.
    let mut agg = Aggregator::start_in(dir)?;
    assert_eq!(agg.json("/api/status").await?["state"], "initializing");
    assert_eq!(agg.json("/api/rounds").await?, serde_json::json!([]));
    let task = agg.json("/api/task").await?;
    assert!(
        !task["files"].to_string().contains("adapter.safetensors"),
        "{task}"
    );

    // One participant initializes and trains round 1, then leaves.
    let join = spawn_join(dir, &agg, "a.tsv", "first", &["--max-rounds", "1"])?;
    let out = wait_child(join, JOIN_TIMEOUT).await?;
    check_success("fedsb join (first)", &out)?;
    let before = served_adapter(&agg).await?;
    let round0 = reqwest::get(agg.url("/api/rounds/0/global"))
        .await?
        .bytes()
        .await?;
    // Wait for round 1 to be committed.
    let started = Instant::now();
    while agg.json("/api/status").await?["last_committed_round"] != 1 {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("round 1 was not committed");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    agg.kill9();

    // Restarted after the initialization: the same file is served, round 0
    // is unchanged, and a participant joining now gets the file in Welcome
    // and finishes round 2.
    let agg = Aggregator::start_in(dir)?;
    let status = agg.json("/api/status").await?;
    assert_eq!(status["state"], "collecting", "{status}");
    assert_eq!(status["round"], 2, "{status}");
    assert_eq!(served_adapter(&agg).await?, before);
    let round0_again = reqwest::get(agg.url("/api/rounds/0/global"))
        .await?
        .bytes()
        .await?;
    assert_eq!(round0, round0_again);
    let join = spawn_join(dir, &agg, "b.tsv", "second", &[])?;
    let out = wait_child(join, JOIN_TIMEOUT).await?;
    let report = check_success("fedsb join (second)", &out)?;
    assert_eq!(report["finished"], true, "{report}");
    assert_eq!(report["rounds"], serde_json::json!([2]), "{report}");
    Ok(())
}

/// A `fedsb join` whose initialization gradients are in stops (killed) and
/// starts again on the same data and cache: its participant key gets
/// `InitAccepted` instead of `InitRequest`, so it computes and sends nothing
/// again and waits for the adapter file; the initialization counts it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_joins_again_during_the_initialization_is_counted_once(
) -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    write_config(dir, 1, 2, 16)?;
    let agg = Aggregator::start_in(dir)?;
    let mut first = spawn_join(dir, &agg, "a.tsv", "a", &[])?;
    agg.wait_init_contributions(1).await?;
    first.kill()?;
    first.wait()?;

    let again = spawn_join(dir, &agg, "a.tsv", "a", &[])?;
    let b = spawn_join(dir, &agg, "b.tsv", "b", &[])?;
    let (again, b) = tokio::join!(wait_child(again, JOIN_TIMEOUT), wait_child(b, JOIN_TIMEOUT));
    let again = again?;
    let report = check_success("fedsb join (a, again)", &again)?;
    assert_eq!(report["finished"], true, "{report}");
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(
        !log.contains("initialization gradients computed"),
        "the second run computed its gradients again:\n{log}"
    );
    check_success("fedsb join (b)", &b?)?;
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[0]["participants"], 2, "{rounds}");
    assert_eq!(rounds[0]["total_samples"], 32, "{rounds}");
    assert_eq!(rounds[1]["participants"], 2, "{rounds}");
    Ok(())
}

/// The aggregator is killed after it accepted one participant's
/// initialization gradients, and restarted on the same port: it starts the
/// initialization again, and the `fedsb join`, reconnecting by itself, sends
/// the same gradients again without computing them again; with a second
/// participant the task initializes and trains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_reconnects_when_the_aggregator_restarts_during_the_initialization(
) -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    write_config(dir, 1, 2, 16)?;
    let mut agg = Aggregator::start_in(dir)?;
    let port = agg.addr.port();
    let a = spawn_join(dir, &agg, "a.tsv", "a", &["--reconnect-for", "120"])?;
    agg.wait_init_contributions(1).await?;
    agg.kill9();
    let agg = Aggregator::start_in_on(dir, port)?;
    assert_eq!(agg.json("/api/status").await?["state"], "initializing");
    // a's gradients come again, from the reconnected participant.
    agg.wait_init_contributions(1).await?;
    let b = spawn_join(dir, &agg, "b.tsv", "b", &[])?;
    let (a, b) = tokio::join!(wait_child(a, JOIN_TIMEOUT), wait_child(b, JOIN_TIMEOUT));
    let (a, b) = (a?, b?);
    let report = check_success("fedsb join (a)", &a)?;
    assert_eq!(report["finished"], true, "{report}");
    assert_eq!(report["reconnects"], 1, "{report}");
    let log = String::from_utf8_lossy(&a.stderr);
    assert_eq!(
        log.matches("initialization gradients computed").count(),
        1,
        "the gradients were computed more than once:\n{log}"
    );
    assert!(log.contains("sending the same ones"), "{log}");
    check_success("fedsb join (b)", &b)?;
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[0]["participants"], 2, "{rounds}");
    assert_eq!(rounds[0]["total_samples"], 32, "{rounds}");
    Ok(())
}

/// The initialization holds the gradients of at most `max_participants`
/// participants (each 4 bytes per adapted weight): with one, whose place a
/// participant holds with its first module, another's gradients are turned
/// away (`RoundFull`), and `fedsb join` then waits for the adapter file and
/// trains in the rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradients_beyond_max_participants_wait_for_the_rounds() -> anyhow::Result<()> {
    let tmp = setup()?;
    let dir = tmp.path();
    write_config(dir, 1, 1, 16)?;
    let agg = Aggregator::start_in(dir)?;
    let gradient = |module: u32| {
        let mut g = Tensor::zeros(&module_shape(module));
        g.data
            .fill(if module.is_multiple_of(2) { 1.0 } else { -1.0 });
        ClientMessage::InitGradient {
            module,
            gradient: g,
        }
    };
    let (mut first, _) = Participant::join(agg.addr, "first").await?;
    let ServerMessage::InitRequest { .. } = first.recv().await? else {
        bail!("expected InitRequest after Welcome");
    };
    first.send(&gradient(0)).await?;
    // The first holds the place once the coordinator has taken that
    // gradient. A second copy is refused only after it (one connection's
    // messages are handled in order), so waiting for that refusal puts the
    // second participant's gradient after the first's: without it, on a
    // loaded machine the second's could arrive first, take the place and
    // leave this test waiting for a refusal that never comes.
    first.send(&gradient(0)).await?;
    first.expect_error(ErrorCode::DuplicateUpdate).await?;

    let (mut second, _) = Participant::join(agg.addr, "second").await?;
    let ServerMessage::InitRequest { .. } = second.recv().await? else {
        bail!("expected InitRequest after Welcome");
    };
    second.send(&gradient(0)).await?;
    // (The server's pings keep `recv` from timing out: bounded here.)
    let m = tokio::time::timeout(STEP_TIMEOUT, second.expect_error(ErrorCode::RoundFull))
        .await
        .context("the second participant's gradient was not turned away")??;
    assert!(m.contains("max_participants"), "{m}");
    drop(second);

    // fedsb join is turned away too (one error per module), and waits.
    let join = spawn_join(dir, &agg, "a.tsv", "waiting", &[])?;
    let started = Instant::now();
    while agg
        .metric("fedsb_messages_rejected_total{reason=\"round_full\"}")
        .await?
        < 13.0
    {
        ensure!(
            started.elapsed() < JOIN_TIMEOUT,
            "fedsb join's gradients were not turned away"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(agg.json("/api/status").await?["state"], "initializing");

    // The first participant finishes: the initialization is its alone, and
    // the waiting participant trains round 1.
    for module in 1..12u32 {
        first.send(&gradient(module)).await?;
    }
    first
        .send(&ClientMessage::InitDone { num_samples: 4 })
        .await?;
    let out = wait_child(join, JOIN_TIMEOUT).await?;
    let report = check_success("fedsb join", &out)?;
    assert_eq!(report["finished"], true, "{report}");
    let rounds = agg.json("/api/rounds").await?;
    assert_eq!(rounds[0]["participants"], 1, "{rounds}");
    assert_eq!(rounds[0]["total_samples"], 4, "{rounds}");
    assert_eq!(rounds[1]["participants"], 1, "{rounds}");
    Ok(())
}
