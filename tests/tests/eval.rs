//! The aggregator's per-round evaluation (`[eval]`): every committed global
//! model, round 0 included, is evaluated on the eval file with the native
//! engine (GPU: lavapipe here), stored, listed by `/api/rounds`, announced on
//! `/api/events`, and not redone after a restart. The numbers are checked
//! against the engine's CPU reference run here on the same global states.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fedsb_e2e::process::fedsb_init;
use fedsb_e2e::tiny_model::{labelled_tsv, write_tiny_model, LABELS};
use fedsb_e2e::*;
use fedsb_engine::data::{read_dataset_file, ColumnSpec};
use fedsb_engine::model::{AdaptedLinear, BertTokenizer, BertWeights};
use fedsb_engine::reference::{
    ClassifierHead, LoraSbAdapters, LoraSbModule, Matrix, ReferenceEncoder,
};
use fedsb_engine::train::encode_examples;
use fedsb_protocol::{AdapterShape, AdapterState, RoundId, ServerMessage};
use safetensors::SafeTensors;

const RANK: usize = 4;
const EVAL_ROWS: usize = 30;
/// The task's sequence length: shorter than most eval sentences (7 to 10
/// tokens), so that evaluating at another length gives another loss.
const MAX_SEQ: usize = 8;

fn write_task(dir: &Path) -> anyhow::Result<()> {
    write_tiny_model(&dir.join("model"), 5)?;
    std::fs::write(dir.join("seed.tsv"), labelled_tsv(32, 1, 0.5))?;
    // More rows than the limit: only the first EVAL_ROWS count.
    std::fs::write(dir.join("eval.tsv"), labelled_tsv(EVAL_ROWS + 7, 9, 0.4))?;
    fedsb_init(
        dir,
        RANK as u32,
        &["--init-samples", "16", "--batch", "8", "--lr", "0.01"],
    )?;
    let config = format!(
        r#"[task]
id = "eval"
rounds = 2
min_participants = 1
max_participants = 1
round_deadline_secs = 600
labels = ["{}", "{}"]
max_seq_len = {MAX_SEQ}
[model]
id = "tiny-random-bert"
dir = "model"
[adapter]
rank = {RANK}
file = "adapter.safetensors"
[eval]
file = "eval.tsv"
limit = {EVAL_ROWS}
batch_size = 7
[server]
ping_interval_secs = 1
idle_timeout_secs = 60
"#,
        LABELS[0], LABELS[1]
    );
    std::fs::write(dir.join("task.toml"), config)?;
    Ok(())
}

/// Accuracy and mean cross-entropy of a global state on the eval rows,
/// computed with the engine's CPU reference (f64).
fn reference_eval(dir: &Path, state: &AdapterState) -> anyhow::Result<(f64, f64)> {
    let weights = BertWeights::from_dir(dir.join("model"))?.map(f64::from);
    let config = weights.config.clone();
    let tokenizer =
        BertTokenizer::from_file(dir.join("model/tokenizer.json"))?.with_max_length(MAX_SEQ)?;
    let bytes = std::fs::read(dir.join("adapter.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let matrix = |name: &str, rows: usize, cols: usize| -> anyhow::Result<Matrix<f64>> {
        let t = st.tensor(name).with_context(|| format!("{name} missing"))?;
        let data: Vec<f64> = t
            .data()
            .chunks_exact(4)
            .map(|c| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        anyhow::ensure!(data.len() == rows * cols, "{name}: wrong size");
        Ok(Matrix::from_vec(rows, cols, data))
    };
    // R's travel layer by layer, the six linears in the task's order.
    let mut adapters = LoraSbAdapters::<f64> {
        layers: (0..config.num_hidden_layers)
            .map(|_| Default::default())
            .collect(),
    };
    let mut r_iter = state.r.iter();
    for layer in 0..config.num_hidden_layers {
        for which in AdaptedLinear::ALL {
            let name = format!("encoder.layer.{layer}.{}", which.checkpoint_name());
            let (out, inp) = which.shape(&config);
            let r = r_iter.next().context("too few R's in the state")?;
            adapters.layers[layer][which.index()] = Some(LoraSbModule {
                a: matrix(&format!("{name}.lora_A"), RANK, inp)?,
                b: matrix(&format!("{name}.lora_B"), out, RANK)?,
                r: Matrix::from_vec(RANK, RANK, r.data.iter().map(|&x| f64::from(x)).collect()),
            });
        }
    }
    let head = ClassifierHead::<f64> {
        weight: Matrix::from_vec(
            LABELS.len(),
            config.hidden_size,
            state
                .head_weight
                .data
                .iter()
                .map(|&x| f64::from(x))
                .collect(),
        ),
        bias: state.head_bias.data.iter().map(|&x| f64::from(x)).collect(),
    };
    let spec = ColumnSpec {
        text: None,
        text_pair: None,
        label: None,
        label_names: Some(LABELS.iter().map(|s| s.to_string()).collect()),
        skip_rows_without_label: true,
    };
    let mut examples = read_dataset_file(dir.join("eval.tsv"), &spec)?.examples;
    examples.truncate(EVAL_ROWS);
    let encoder = ReferenceEncoder::new(&weights, Some(&adapters));
    let (mut correct, mut loss) = (0usize, 0f64);
    for e in &examples {
        let (batch, labels) = encode_examples(&tokenizer, &[e])?;
        let logits = encoder.logits(&head, &batch);
        let row = &logits.data[..LABELS.len()];
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
        let label = labels[0] as usize;
        loss += lse - row[label];
        let argmax = (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
        correct += usize::from(argmax == label);
    }
    Ok((
        correct as f64 / examples.len() as f64,
        loss / examples.len() as f64,
    ))
}

/// Polls `/api/rounds` until every round has an evaluation.
async fn wait_evaluated(agg: &Aggregator, rounds: usize) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    loop {
        let list = agg.json("/api/rounds").await?;
        let arr = list.as_array().context("/api/rounds is not an array")?;
        if arr.len() == rounds && arr.iter().all(|r| !r["eval"].is_null()) {
            return Ok(list);
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("rounds not all evaluated after 300 s: {list}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Rounds 1 and 2 from a scripted participant: each time round 0's state
/// moved by half of [`known_state`] of the round number, 10 samples.
async fn two_scripted_rounds(agg: &Aggregator) -> anyhow::Result<()> {
    let (mut p, _) = Participant::join(agg.addr, "scripted").await?;
    let global0 = p.wait_global(RoundId(0)).await?;
    for n in 1..=2u64 {
        let round = p.wait_round_open().await?;
        let mut mine = global0.clone();
        let shape = AdapterShape {
            rank: RANK as u32,
            modules: mine.r.len() as u32,
            head_classes: 2,
            head_hidden: mine.head_weight.shape[1],
        };
        let noise = known_state(&shape, n);
        for (t, (_, d)) in mine.tensors_mut().zip(noise.named_tensors()) {
            for (x, y) in t.data.iter_mut().zip(&d.data) {
                *x += 0.5 * y;
            }
        }
        let answer = p.submit(update(round, 10, mine)).await?;
        anyhow::ensure!(
            matches!(answer, ServerMessage::UpdateAccepted { .. }),
            "{answer:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_committed_round_is_evaluated_like_the_reference() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    let mut agg = Aggregator::start_in(dir)?;

    let info = agg.json("/api/eval").await?;
    assert_eq!(info["enabled"], true, "{info}");
    assert_eq!(info["samples"], EVAL_ROWS, "{info}");

    // The event stream starts with the status.
    let mut events = reqwest::get(agg.url("/api/events")).await?;
    assert_eq!(
        events.headers()["content-type"],
        "text/event-stream",
        "{:?}",
        events.headers()
    );
    let first = events.chunk().await?.context("event stream ended")?;
    let first = String::from_utf8_lossy(&first);
    assert!(first.starts_with("event: status\n"), "{first}");

    // Two rounds from a scripted participant with known states.
    two_scripted_rounds(&agg).await?;

    let list = wait_evaluated(&agg, 3).await?;
    let mut accuracies = Vec::new();
    for (n, r) in list.as_array().unwrap().iter().enumerate() {
        let e = &r["eval"];
        assert_eq!(e["round"], n as u64, "{r}");
        assert_eq!(e["samples"], EVAL_ROWS as u64, "{r}");
        let (acc, loss) = reference_eval(dir, &agg.global_state(n as u64).await?)?;
        let got_acc = e["accuracy"].as_f64().context("accuracy")?;
        let got_loss = e["loss"].as_f64().context("loss")?;
        // f32 on the GPU against f64 on the CPU: the loss to 1e-3 relative;
        // the accuracy may differ by at most one near-tie.
        assert!(
            (got_loss - loss).abs() <= 1e-3 * loss.abs().max(1e-3),
            "round {n}: loss {got_loss} vs reference {loss}"
        );
        assert!(
            (got_acc - acc).abs() <= 1.0 / EVAL_ROWS as f64 + 1e-12,
            "round {n}: accuracy {got_acc} vs reference {acc}"
        );
        accuracies.push(e.clone());
    }
    // The perturbations change the model, so the losses differ by round.
    assert_ne!(accuracies[0]["loss"], accuracies[2]["loss"]);
    // /metrics follows the newest evaluation.
    let newest = |agg: &Aggregator| {
        let url = agg.url("/metrics");
        async move {
            let text = reqwest::get(url).await?.text().await?;
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .with_context(|| format!("no {name} in {text}"))
            };
            anyhow::Ok([
                value("fedsb_eval_round")?,
                value("fedsb_eval_accuracy")?,
                value("fedsb_eval_loss")?,
                value("fedsb_eval_failures_total")?,
            ])
        }
    };
    // (The exposition's decimal digits round-trip to within an ulp.)
    let close = |got: [f64; 4], want: [f64; 4]| {
        let near = got
            .iter()
            .zip(&want)
            .all(|(g, w)| (g - w).abs() <= 1e-12 * w.abs().max(1.0));
        assert!(near, "/metrics {got:?}, /api/rounds {want:?}");
    };
    let want = [
        2.0,
        accuracies[2]["accuracy"].as_f64().context("accuracy")?,
        accuracies[2]["loss"].as_f64().context("loss")?,
        0.0,
    ];
    close(newest(&agg).await?, want);

    // An `eval` event was announced on the stream.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen = String::new();
    while !seen.contains("event: eval\n") {
        anyhow::ensure!(Instant::now() < deadline, "no eval event: {seen}");
        if let Ok(Some(chunk)) =
            tokio::time::timeout(Duration::from_secs(5), events.chunk()).await?
        {
            seen.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    // After a crash and restart nothing is evaluated again.
    agg.kill9();
    let agg = Aggregator::start_in(dir)?;
    let again = wait_evaluated(&agg, 3).await?;
    for (before, after) in accuracies.iter().zip(again.as_array().unwrap()) {
        assert_eq!(before, &after["eval"]);
    }
    // The gauges start from the stored evaluations.
    close(newest(&agg).await?, want);
    Ok(())
}

#[test]
fn a_bad_eval_file_stops_the_server_with_its_name() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    std::fs::write(dir.join("eval.tsv"), "sentence\tlabel\nfine .\tmaybe\n")?;
    let out = Command::new(fedsb_bin())
        .arg("serve")
        .arg("--config")
        .arg(dir.join("task.toml"))
        .args(["--port", "0", "--state-dir"])
        .arg(dir.join("state"))
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("eval.tsv"), "{stderr}");
    assert!(stderr.contains("maybe"), "{stderr}");
    Ok(())
}

/// The last JSON line a successful `fedsb` printed on stdout.
fn json_of(what: &str, out: &std::process::Output) -> anyhow::Result<serde_json::Value> {
    fedsb_e2e::process::check_success(what, out)?;
    fedsb_e2e::process::last_json_line(out)
}

/// `fedsb export` writes a committed round's global model (the task's A and
/// B, the round's R's and head) as an adapter file, read-only beside the
/// running aggregator, which serves the same bytes at
/// `/api/rounds/{n}/adapter`; `fedsb eval` of that file on the task's eval rows
/// gives the accuracy and loss the aggregator's evaluator stored for the
/// round, at the task's max_seq_len, which the file records (`fedsb eval`
/// reports the length it used, and `--max-seq-len` overrides it). Round 0 exports the task's adapter file's values, and a round that
/// is not committed, a missing state directory, a changed configuration and
/// labels that do not fit the head are refused with messages naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exported_round_evaluates_as_the_aggregator_evaluated_it() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    let agg = Aggregator::start_in(dir)?;
    two_scripted_rounds(&agg).await?;
    let list = wait_evaluated(&agg, 3).await?;

    let export = |round: Option<&str>, out: &Path| -> anyhow::Result<std::process::Output> {
        let mut cmd = Command::new(fedsb_bin());
        cmd.args(["export", "--config"])
            .arg(dir.join("task.toml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--out")
            .arg(out);
        if let Some(r) = round {
            cmd.args(["--round", r]);
        }
        Ok(cmd.output()?)
    };
    let eval = |file: &Path, extra: &[&str]| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(fedsb_bin())
            .args(["eval", "--model"])
            .arg(dir.join("model"))
            .arg("--adapter-file")
            .arg(file)
            .arg("--eval")
            .arg(dir.join("eval.tsv"))
            .args(["--limit", &EVAL_ROWS.to_string(), "--batch", "7"])
            .args(extra)
            .output()?)
    };

    // The last round (the default), evaluated as the aggregator did: at
    // the task's max_seq_len, which the file records.
    let last = dir.join("last.safetensors");
    let report = json_of("fedsb export", &export(None, &last)?)?;
    assert_eq!(report["round"], 2, "{report}");
    assert_eq!(report["participants"], 1, "{report}");
    let exported = tensors_of(&last)?;
    let global2 = agg.global_state(2).await?;
    let names: Vec<String> = exported
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_R").map(str::to_owned))
        .collect();
    assert_eq!(names.len(), global2.r.len());
    let initial = tensors_of(&dir.join("adapter.safetensors"))?;
    for (layer, r) in global2.r.iter().enumerate() {
        // The state's R's are layer by layer in the engine's linear order,
        // as the exported names sort by layer and then by linear.
        let (l, which) = (layer / 6, AdaptedLinear::ALL[layer % 6]);
        let name = format!("encoder.layer.{l}.{}", which.checkpoint_name());
        assert_eq!(exported[&format!("{name}.lora_R")], r.data, "{name}");
        for frozen in ["lora_A", "lora_B"] {
            let key = format!("{name}.{frozen}");
            assert_eq!(exported[&key], initial[&key], "{key}");
        }
    }
    assert_eq!(exported["classifier.weight"], global2.head_weight.data);
    assert_eq!(exported["classifier.bias"], global2.head_bias.data);
    let max_seq = MAX_SEQ.to_string();
    assert_eq!(
        metadata_of(&last)?.get("max_seq_len"),
        Some(&max_seq),
        "the exported file's max_seq_len"
    );
    let measured = json_of("fedsb eval", &eval(&last, &[])?)?;
    let stored = &list[2]["eval"];
    assert_eq!(measured["samples"], EVAL_ROWS, "{measured}");
    assert_eq!(measured["round"], 2, "{measured}");
    assert_eq!(measured["max_seq_len"], MAX_SEQ, "{measured}");
    assert_eq!(
        measured["accuracy"], stored["accuracy"],
        "{measured} vs {stored}"
    );
    // The same confusion matrix (label × predicted), which counts every
    // evaluated row once.
    assert_eq!(
        measured["confusion"], stored["confusion"],
        "{measured} vs {stored}"
    );
    let confusion: Vec<Vec<u64>> = serde_json::from_value(stored["confusion"].clone())?;
    assert_eq!(
        confusion.iter().flatten().sum::<u64>(),
        EVAL_ROWS as u64,
        "{stored}"
    );
    let (got, want) = (
        measured["loss"].as_f64().context("loss")?,
        stored["loss"].as_f64().context("loss")?,
    );
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "fedsb eval: loss {got}, the aggregator: {want}"
    );
    // --max-seq-len wins over the file's, and the length matters here.
    let measured = json_of(
        "fedsb eval --max-seq-len 32",
        &eval(&last, &["--max-seq-len", "32"])?,
    )?;
    assert_eq!(measured["max_seq_len"], 32, "{measured}");
    let longer = measured["loss"].as_f64().context("loss")?;
    assert!(
        (longer - want).abs() > 1e-4 * want.abs(),
        "at 32 tokens the loss {longer} is the task's {want}: the sequence length does not matter"
    );

    // The page's download of the round is the same file, byte for byte.
    let r = reqwest::get(agg.url("/api/rounds/2/adapter")).await?;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-disposition"],
        "attachment; filename=\"eval-round-2.safetensors\""
    );
    // Revalidated by the bytes' hash, never kept as immutable: a new task
    // of the same id serves other bytes at this URL.
    let etag = r.headers()["etag"].to_str()?.to_owned();
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let bytes = r.bytes().await?;
    assert!(bytes == std::fs::read(&last)?);
    assert_eq!(etag, format!("\"{}\"", sha256_hex(&bytes)?));
    let client = reqwest::Client::new();
    for (path, tag, status) in [
        ("/api/rounds/2/adapter", etag.as_str(), 304),
        ("/api/rounds/2/adapter", "\"0000\"", 200),
    ] {
        let r = client
            .get(agg.url(path))
            .header("if-none-match", tag)
            .send()
            .await?;
        assert_eq!(r.status(), status, "{path} {tag}");
        assert_eq!(r.headers()["etag"], etag.as_str());
    }
    let r = reqwest::get(agg.url("/api/rounds/2/global")).await?;
    assert_eq!(r.headers()["cache-control"], "no-cache");
    let tag = r.headers()["etag"].to_str()?.to_owned();
    assert_eq!(tag, format!("\"{}\"", sha256_hex(&r.bytes().await?)?));
    let r = reqwest::get(agg.url("/api/rounds/9/adapter")).await?;
    assert_eq!(r.status(), 404);
    let body = r.text().await?;
    assert!(
        body.contains("round 9 of task eval is not committed"),
        "{body}"
    );

    // Round 0 is the task's adapter file's model.
    let first = dir.join("round0.safetensors");
    json_of("fedsb export --round 0", &export(Some("0"), &first)?)?;
    let round0 = tensors_of(&first)?;
    for (name, values) in &initial {
        assert_eq!(&round0[name], values, "{name}");
    }
    let measured0 = json_of("fedsb eval round 0", &eval(&first, &[])?)?;
    assert_eq!(measured0["accuracy"], list[0]["eval"]["accuracy"]);
    let (got, want) = (
        measured0["loss"].as_f64().context("loss")?,
        list[0]["eval"]["loss"].as_f64().context("loss")?,
    );
    assert!(
        (got - want).abs() <= 1e-6 * want.abs(),
        "round 0: fedsb eval's loss {got}, the aggregator's {want}"
    );
    assert_eq!(measured0["max_seq_len"], MAX_SEQ, "{measured0}");

    // The mean of rounds 1 and 2: every R and the head averaged, A and B
    // the task's, and the metadata naming the rounds.
    let second = dir.join("round1.safetensors");
    json_of("fedsb export --round 1", &export(Some("1"), &second)?)?;
    let round1 = tensors_of(&second)?;
    let mean = dir.join("mean.safetensors");
    let averaged = |extra: &[&str], out: &Path| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(fedsb_bin())
            .args(["export", "--config"])
            .arg(dir.join("task.toml"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--out")
            .arg(out)
            .args(extra)
            .output()?)
    };
    let report = json_of(
        "fedsb export --average 2",
        &averaged(&["--average", "2"], &mean)?,
    )?;
    assert_eq!(report["round"], 2, "{report}");
    assert_eq!(
        report["averaged_rounds"],
        serde_json::json!([1, 2]),
        "{report}"
    );
    assert!(report["global_sha256"].is_null(), "{report}");
    let means = tensors_of(&mean)?;
    assert_eq!(means.len(), exported.len());
    let mut moved = 0;
    for (name, values) in &means {
        let (a, b) = (&round1[name], &exported[name]);
        if name.ends_with(".lora_A") || name.ends_with(".lora_B") {
            assert_eq!(values, &initial[name], "{name}");
            continue;
        }
        for ((&m, &x), &y) in values.iter().zip(a).zip(b) {
            let want = (f64::from(x) + f64::from(y)) / 2.0;
            assert!(
                (f64::from(m) - want).abs() <= 1e-7 * want.abs().max(1.0),
                "{name}: {m} is not the mean of {x} and {y}"
            );
            moved += usize::from(x != y);
        }
    }
    assert!(moved > 0, "rounds 1 and 2 are the same model");
    let bytes = std::fs::read(&mean)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let meta = header.metadata().clone().unwrap_or_default();
    assert_eq!(meta.get("averaged_rounds").map(String::as_str), Some("1-2"));
    assert_eq!(meta.get("round").map(String::as_str), Some("2"));
    assert_eq!(meta.get("max_seq_len"), Some(&max_seq), "{meta:?}");
    assert!(!meta.contains_key("global_sha256"), "{meta:?}");
    // The task's base model, as its database pins it.
    assert_eq!(
        meta.get("base_model_sha256"),
        Some(&sha256sum(&dir.join("model/model.safetensors"))?),
        "{meta:?}"
    );
    // `--average 1` is the round itself, byte for byte.
    let one = dir.join("one.safetensors");
    json_of(
        "fedsb export --average 1",
        &averaged(&["--average", "1"], &one)?,
    )?;
    assert!(std::fs::read(&one)? == std::fs::read(&last)?);
    for (extra, wanted) in [
        (
            &["--average", "4"][..],
            "averaging 4 rounds ending at round 2 needs 4 committed rounds, but there are \
             only 3 up to it (rounds 0-2)",
        ),
        (
            &["--average", "2", "--round", "0"][..],
            "but there are only 1 up to it (rounds 0-0)",
        ),
        (
            &["--average", "0"][..],
            "averaging needs at least one round, not 0",
        ),
    ] {
        let out = averaged(extra, &dir.join("no.safetensors"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(wanted), "{extra:?}: {stderr}");
        assert!(!dir.join("no.safetensors").exists());
    }

    // Refusals.
    let out = export(Some("9"), &dir.join("no.safetensors"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("round 9 of task eval is not committed: the last committed round is 2"),
        "{stderr}"
    );
    assert!(!dir.join("no.safetensors").exists());
    let out = Command::new(fedsb_bin())
        .args(["export", "--config"])
        .arg(dir.join("task.toml"))
        .arg("--state-dir")
        .arg(dir.join("elsewhere"))
        .arg("--out")
        .arg(dir.join("no.safetensors"))
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no state database"), "{stderr}");
    assert!(stderr.contains("elsewhere"), "{stderr}");
    let out = Command::new(fedsb_bin())
        .args(["export", "--config"])
        .arg(dir.join("task.toml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--out")
        .arg(dir.join("no.safetensors"))
        .env("FEDSB_TASK__ROUNDS", "5")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("different configuration"), "{stderr}");
    let out = eval(&last, &["--labels", "a,b,c"])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("the head has 2 classes but the labels are [\"a\", \"b\", \"c\"]"),
        "{stderr}"
    );
    // The file's own classes in another order would score each head row as
    // the other class: refused, not only warned about.
    let reversed = format!("{},{}", LABELS[1], LABELS[0]);
    let out = eval(&last, &["--labels", &reversed])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "--labels [\"{}\", \"{}\"] name the classes of {} ([\"{}\", \"{}\"]) in another order",
            LABELS[1],
            LABELS[0],
            last.display(),
            LABELS[0],
            LABELS[1]
        )),
        "{stderr}"
    );
    // The aggregator, read beside, is untouched.
    assert_eq!(agg.json("/api/rounds").await?, list);
    Ok(())
}

/// `fedsb merge` makes an adapter file and its base model one plain model
/// directory: every adapted weight is `W + B·R·A`, every other tensor is
/// the base model's, and the configuration and tokenizer are copied. The
/// merged model with an adapter whose R's are zero (so it adds nothing)
/// evaluates like the base model with the adapter file; merging into a
/// directory that holds anything is refused.
#[test]
fn a_merged_model_evaluates_like_the_base_model_with_its_adapter() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    let adapter = dir.join("adapter.safetensors");
    let merged = dir.join("merged");
    let merge = || {
        Command::new(fedsb_bin())
            .args(["merge", "--model"])
            .arg(dir.join("model"))
            .arg("--adapter-file")
            .arg(&adapter)
            .arg("--out")
            .arg(&merged)
            .output()
    };
    let report = json_of("fedsb merge", &merge()?)?;
    let base = tensors_of(&dir.join("model/model.safetensors"))?;
    let out = tensors_of(&merged.join("model.safetensors"))?;
    let file = tensors_of(&adapter)?;
    assert_eq!(
        base.keys().collect::<Vec<_>>(),
        out.keys().collect::<Vec<_>>()
    );
    let mut adapted = 0;
    for (name, values) in &base {
        let module = name.strip_suffix(".weight").unwrap_or(name);
        let Some(r) = file.get(&format!("{module}.lora_R")) else {
            assert_eq!(&out[name], values, "{name} changed");
            continue;
        };
        adapted += 1;
        let (a, b) = (
            &file[&format!("{module}.lora_A")],
            &file[&format!("{module}.lora_B")],
        );
        let (outs, ins) = (b.len() / RANK, a.len() / RANK);
        for o in 0..outs {
            for i in 0..ins {
                let delta = b_r_a(a, b, r, o, i);
                let want = f64::from(values[o * ins + i]) + delta;
                let got = f64::from(out[name][o * ins + i]);
                assert!(
                    (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                    "{name}[{o},{i}]: {got} vs {want}"
                );
            }
        }
    }
    assert_eq!(report["modules_merged"], adapted, "{report}");
    assert!(adapted > 0);
    assert_eq!(report["head"], "fedsb-head.safetensors", "{report}");
    for f in ["config.json", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(merged.join(f))?,
            std::fs::read(dir.join("model").join(f))?,
            "{f}"
        );
    }
    let head = tensors_of(&merged.join("fedsb-head.safetensors"))?;
    assert_eq!(head["classifier.weight"], file["classifier.weight"]);
    // The model card says what the directory is and how to run its head.
    let card = std::fs::read_to_string(merged.join("README.md"))?;
    for says in [
        "merged into it by `fedsb merge`",
        &format!("({adapted} modules, rank {RANK})"),
        "`fedsb-head.safetensors` (2 classes",
        "AutoModel.from_pretrained(DIR)",
    ] {
        assert!(card.contains(says), "{says:?} not in the card:\n{card}");
    }

    // The merged model evaluates as the base model with the adapter: with
    // the same file, its R's zeroed, it adds nothing to the merged weights.
    let bytes = std::fs::read(&adapter)?;
    let st = SafeTensors::deserialize(&bytes)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)?;
    let zeroed: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = if name.ends_with(".lora_R") {
                vec![0u8; v.data().len()]
            } else {
                v.data().to_vec()
            };
            (name, v.shape().to_vec(), data)
        })
        .collect();
    let views = zeroed.iter().map(|(n, s, d)| {
        (
            n.as_str(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), d).unwrap(),
        )
    });
    // The merged model is another base model: the hand-made file claims
    // none, so that it is accepted with both.
    let mut metadata = header.metadata().clone().unwrap_or_default();
    metadata.remove("base_model_sha256");
    let zero_r = dir.join("zero-r.safetensors");
    std::fs::write(
        &zero_r,
        safetensors::tensor::serialize(views, Some(metadata))?,
    )?;
    let eval = |model: &Path, file: &Path| -> anyhow::Result<serde_json::Value> {
        let out = Command::new(fedsb_bin())
            .args(["eval", "--model"])
            .arg(model)
            .arg("--adapter-file")
            .arg(file)
            .arg("--eval")
            .arg(dir.join("eval.tsv"))
            .args(["--max-seq-len", &MAX_SEQ.to_string()])
            .output()?;
        json_of("fedsb eval", &out)
    };
    let with_adapter = eval(&dir.join("model"), &adapter)?;
    let with_merged = eval(&merged, &zero_r)?;
    let base_only = eval(&dir.join("model"), &zero_r)?;
    let loss = |v: &serde_json::Value| v["loss"].as_f64().unwrap();
    assert!(
        (loss(&with_adapter) - loss(&with_merged)).abs() <= 1e-4 * loss(&with_adapter),
        "{with_adapter} vs {with_merged}"
    );
    assert_eq!(with_adapter["accuracy"], with_merged["accuracy"]);
    // The adapter matters, so the comparison above can fail.
    assert!(
        (loss(&with_adapter) - loss(&base_only)).abs() > 1e-3,
        "{with_adapter} vs {base_only}"
    );

    let again = merge()?;
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("is not empty"), "{stderr}");
    Ok(())
}

/// `fedsb merge --peft` writes the adapter as a Hugging Face PEFT LoRA
/// adapter: `lora_B·lora_A` (at PEFT's scale `lora_alpha / r` = 1) is
/// `B·R·A` of every adapted module, under the keys PEFT saves for a
/// `BertModel`, with exactly those modules as `target_modules`, and the
/// head beside it. (`scripts/check_merged_model.py --peft` loads such a
/// directory with PEFT itself; README, "The trained model".)
#[test]
fn a_peft_adapter_holds_b_r_a_as_lora_b_times_lora_a() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    let adapter = dir.join("adapter.safetensors");
    let peft = dir.join("peft");
    let out = Command::new(fedsb_bin())
        .args(["merge", "--peft", "--model"])
        .arg(dir.join("model"))
        .arg("--adapter-file")
        .arg(&adapter)
        .arg("--out")
        .arg(&peft)
        .output()?;
    let report = json_of("fedsb merge --peft", &out)?;
    let file = tensors_of(&adapter)?;
    let modules: Vec<&str> = file
        .keys()
        .filter_map(|k| k.strip_suffix(".lora_R"))
        .collect();
    assert!(!modules.is_empty());
    assert_eq!(report["modules"], modules.len(), "{report}");

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(peft.join("adapter_config.json"))?)?;
    assert_eq!(config["peft_type"], "LORA", "{config}");
    assert_eq!(config["r"], RANK, "{config}");
    assert_eq!(config["lora_alpha"], RANK, "{config}");
    assert_eq!(config["use_rslora"], false, "{config}");
    assert_eq!(
        config["base_model_name_or_path"],
        dir.join("model").canonicalize()?.display().to_string()
    );
    let mut targets: Vec<String> = serde_json::from_value(config["target_modules"].clone())?;
    targets.sort();
    assert_eq!(targets, modules, "target_modules");

    let lora = tensors_of(&peft.join("adapter_model.safetensors"))?;
    assert_eq!(lora.len(), 2 * modules.len(), "{:?}", lora.keys());
    for module in &modules {
        let key = |m: &str| format!("base_model.model.{module}.lora_{m}.weight");
        let (lora_a, lora_b) = (&lora[&key("A")], &lora[&key("B")]);
        let (a, b, r) = (
            &file[&format!("{module}.lora_A")],
            &file[&format!("{module}.lora_B")],
            &file[&format!("{module}.lora_R")],
        );
        assert_eq!(lora_b, b, "{module}: lora_B is B");
        let (outs, ins) = (b.len() / RANK, a.len() / RANK);
        assert_eq!(lora_a.len(), RANK * ins, "{module}");
        for o in 0..outs {
            for i in 0..ins {
                let want = b_r_a(a, b, r, o, i);
                let got: f64 = (0..RANK)
                    .map(|j| f64::from(lora_b[o * RANK + j]) * f64::from(lora_a[j * ins + i]))
                    .sum();
                assert!(
                    (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                    "{module}[{o},{i}]: {got} vs {want}"
                );
            }
        }
    }
    let head = tensors_of(&peft.join("fedsb-head.safetensors"))?;
    assert_eq!(head["classifier.weight"], file["classifier.weight"]);
    assert_eq!(head["classifier.bias"], file["classifier.bias"]);
    let card = std::fs::read_to_string(peft.join("README.md"))?;
    assert!(card.contains("PeftModel.from_pretrained"), "{card}");
    // No copy of the base model: PEFT loads it from where it is.
    assert!(!peft.join("model.safetensors").exists());
    Ok(())
}

/// Entry `[o, i]` of `B·R·A` (in f64) for a module's `A` (`RANK × in`),
/// `B` (`out × RANK`) and `R` (`RANK × RANK`), row-major.
fn b_r_a(a: &[f32], b: &[f32], r: &[f32], o: usize, i: usize) -> f64 {
    let ins = a.len() / RANK;
    (0..RANK)
        .flat_map(|j| (0..RANK).map(move |k| (j, k)))
        .map(|(j, k)| {
            f64::from(b[o * RANK + j]) * f64::from(r[j * RANK + k]) * f64::from(a[k * ins + i])
        })
        .sum()
}

/// An adapter file's header metadata.
fn metadata_of(path: &Path) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let bytes = std::fs::read(path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)?;
    Ok(header.metadata().clone().unwrap_or_default())
}

/// An adapter file records the base model it was made for
/// (`base_model_sha256`, the SHA-256 of its model.safetensors). With
/// another checkpoint of the same architecture (a tiny random BERT of
/// identical shapes, other weights), which used to give garbage silently,
/// `fedsb eval`, `fedsb merge` and `fedsb serve` refuse it, naming the
/// adapter file, the model file and both hashes; with its own model it
/// evaluates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_file_is_refused_with_another_base_model() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    // M1 in model/, fedsb init's adapter.safetensors made on it.
    write_task(dir)?;
    // M2: the same configuration (every shape), other random weights.
    write_tiny_model(&dir.join("model2"), 6)?;
    assert_eq!(
        std::fs::read(dir.join("model/config.json"))?,
        std::fs::read(dir.join("model2/config.json"))?
    );
    let (m1, m2) = (
        sha256sum(&dir.join("model/model.safetensors"))?,
        sha256sum(&dir.join("model2/model.safetensors"))?,
    );
    assert_ne!(m1, m2);

    // Trained on M1: two steps from the initialization.
    let trained = dir.join("trained.safetensors");
    let out = Command::new(fedsb_bin())
        .args(["train", "--model"])
        .arg(dir.join("model"))
        .arg("--train")
        .arg(dir.join("seed.tsv"))
        .arg("--eval")
        .arg(dir.join("eval.tsv"))
        .arg("--init")
        .arg(dir.join("adapter.safetensors"))
        .args(["--steps", "2", "--batch", "8", "--lr", "0.01"])
        .args(["--max-seq-len", &MAX_SEQ.to_string()])
        .arg("--output")
        .arg(&trained)
        .env("RUST_LOG", "warn")
        .output()?;
    json_of("fedsb train --init", &out)?;
    assert_eq!(metadata_of(&trained)?.get("base_model_sha256"), Some(&m1));

    let eval = |model: &str| -> anyhow::Result<std::process::Output> {
        Ok(Command::new(fedsb_bin())
            .args(["eval", "--model"])
            .arg(dir.join(model))
            .arg("--adapter-file")
            .arg(&trained)
            .arg("--eval")
            .arg(dir.join("eval.tsv"))
            .args(["--max-seq-len", &MAX_SEQ.to_string()])
            .env("RUST_LOG", "warn")
            .output()?)
    };
    let measured = json_of("fedsb eval with M1", &eval("model")?)?;
    assert_eq!(measured["samples"], EVAL_ROWS + 7, "{measured}");
    let says_other_model = |stderr: &str, adapter: &Path, model: &str| {
        for part in [
            format!(
                "{} was made for a base model whose model.safetensors has SHA-256 {}",
                adapter.display(),
                &m1[..12]
            ),
            format!(
                "but {} has {}",
                dir.join(model).join("model.safetensors").display(),
                &m2[..12]
            ),
            "use the model it was trained on".to_owned(),
        ] {
            assert!(stderr.contains(&part), "{part:?} not in:\n{stderr}");
        }
    };
    let out = eval("model2")?;
    assert!(!out.status.success(), "fedsb eval with M2 was accepted");
    says_other_model(&stderr_of(&out), &trained, "model2");

    let merged = dir.join("merged");
    let out = run_fedsb(&[
        "merge".as_ref(),
        "--model".as_ref(),
        dir.join("model2").as_os_str(),
        "--adapter-file".as_ref(),
        trained.as_os_str(),
        "--out".as_ref(),
        merged.as_os_str(),
    ])?;
    assert!(!out.status.success(), "fedsb merge with M2 was accepted");
    says_other_model(&stderr_of(&out), &trained, "model2");
    assert!(!merged.exists());

    // The task served with M2 and the adapter file made on M1.
    let task = std::fs::read_to_string(dir.join("task.toml"))?;
    std::fs::write(
        dir.join("task.toml"),
        task.replace("dir = \"model\"", "dir = \"model2\""),
    )?;
    let child = Command::new(fedsb_bin())
        .args(["serve", "--port", "0", "--config"])
        .arg(dir.join("task.toml"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let out = fedsb_e2e::process::wait_child(child, Duration::from_secs(60)).await?;
    assert!(!out.status.success(), "fedsb serve with M2 was accepted");
    let stderr = stderr_of(&out);
    for part in [
        "adapter.safetensors was made for a base model",
        &m1[..12],
        &m2[..12],
        "model2",
    ] {
        assert!(stderr.contains(part), "{part:?} not in:\n{stderr}");
    }
    Ok(())
}

fn run_fedsb(args: &[&std::ffi::OsStr]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new(fedsb_bin()).args(args).output()?)
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `fedsb merge` never writes over a file: a directory holding anything is
/// refused and left as it was, and a merge that fails on the adapter's head
/// leaves no directory behind (it is written beside `--out` and renamed).
#[test]
fn merge_writes_a_new_directory_whole_or_not_at_all() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    let model = dir.join("model");
    let adapter = dir.join("adapter.safetensors");

    let project = dir.join("project");
    std::fs::create_dir(&project)?;
    std::fs::write(project.join("README.md"), "my notes")?;
    let out = run_fedsb(&[
        "merge".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--adapter-file".as_ref(),
        adapter.as_os_str(),
        "--out".as_ref(),
        project.as_os_str(),
    ])?;
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("is not empty"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(
        std::fs::read_to_string(project.join("README.md"))?,
        "my notes"
    );
    assert_eq!(std::fs::read_dir(&project)?.count(), 1);

    // The same adapter with a head bias of the wrong length.
    let bytes = std::fs::read(&adapter)?;
    let st = SafeTensors::deserialize(&bytes)?;
    let bias = vec![0u8; 4 * 3];
    let mut views: Vec<(String, safetensors::tensor::TensorView<'_>)> = Vec::new();
    for (name, view) in st.tensors() {
        if name == "classifier.bias" {
            views.push((
                name,
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![3], &bias)?,
            ));
        } else {
            views.push((name, view));
        }
    }
    let bad = dir.join("bad-head.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, None)?)?;
    let merged = dir.join("merged");
    let out = run_fedsb(&[
        "merge".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--adapter-file".as_ref(),
        bad.as_os_str(),
        "--out".as_ref(),
        merged.as_os_str(),
    ])?;
    assert!(!out.status.success());
    assert!(
        stderr_of(&out).contains("classifier.bias"),
        "{}",
        stderr_of(&out)
    );
    assert!(!merged.exists(), "a failed merge left {}", merged.display());
    let leftovers: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("merg"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    Ok(())
}

/// `fedsb average` writes the same bytes for the same inputs, and refuses
/// to write the mean over one of its inputs.
#[test]
fn average_is_deterministic_and_keeps_its_inputs() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    let adapter = dir.join("adapter.safetensors");
    let before = std::fs::read(&adapter)?;
    let mean = |out: &Path| {
        run_fedsb(&[
            "average".as_ref(),
            adapter.as_os_str(),
            adapter.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ])
    };
    let (a, b) = (dir.join("a.safetensors"), dir.join("b.safetensors"));
    for out in [&a, &b] {
        let run = mean(out)?;
        assert!(run.status.success(), "{}", stderr_of(&run));
    }
    assert_eq!(std::fs::read(&a)?, std::fs::read(&b)?);
    let over = mean(&adapter)?;
    assert!(!over.status.success());
    assert!(
        stderr_of(&over).contains("is the input"),
        "{}",
        stderr_of(&over)
    );
    assert_eq!(std::fs::read(&adapter)?, before);
    Ok(())
}

/// `/api/rounds/{n}/adapter` says plainly why it has nothing to serve: a
/// round that is not a number (400), one not committed (404), and a task
/// without an adapter file, whose R's mean nothing alone (409).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_round_model_download_explains_its_refusals() -> anyhow::Result<()> {
    let agg = Aggregator::start(&test_config(2, 1, 1, 60, ""))?;
    for (path, status, says) in [
        ("/api/rounds/zero/adapter", 400, "is not a number"),
        (
            "/api/rounds/7/adapter",
            404,
            "round 7 of task e2e is not committed",
        ),
        (
            "/api/rounds/0/adapter",
            409,
            "has no adapter file with A and B",
        ),
    ] {
        let r = reqwest::get(agg.url(path)).await?;
        assert_eq!(r.status(), status, "{path}");
        let body = r.text().await?;
        assert!(body.contains(says), "{path}: {body}");
    }
    Ok(())
}

/// SIGTERM while the evaluator is in the middle of a round stops it before
/// its next batch and waits for its thread to release the GPU device before
/// the process exits (a process exiting while that thread still held or
/// dropped a lavapipe device crashed in the driver's teardown, SIGSEGV, now
/// and then). Nothing is stored for the round cut short, so the next start
/// evaluates it afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_an_evaluation_and_stores_nothing_of_it() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    // An eval set long enough that the signal lands in its first round.
    std::fs::write(dir.join("eval.tsv"), labelled_tsv(40_000, 9, 0.4))?;
    let config = std::fs::read_to_string(dir.join("task.toml"))?
        .replace(&format!("limit = {EVAL_ROWS}"), "limit = 0");
    std::fs::write(dir.join("task.toml"), config)?;

    let serve = |log: &str| -> anyhow::Result<(std::process::Child, String)> {
        let mut child = Command::new(fedsb_bin())
            .args(["serve", "--config"])
            .arg(dir.join("task.toml"))
            .args(["--port", "0"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::fs::File::create(dir.join(log))?)
            .spawn()
            .context("spawning fedsb serve")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let url = line
            .trim()
            .strip_prefix("fedsb listening on ")
            .with_context(|| format!("first line {line:?}"))?
            .to_owned();
        Ok((child, url))
    };
    let stop = |mut child: std::process::Child, log: &str| -> anyhow::Result<String> {
        std::thread::sleep(Duration::from_millis(500));
        let pid = child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status()?;
        anyhow::ensure!(killed.success(), "kill -TERM {pid}");
        let started = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if started.elapsed() > Duration::from_secs(15) {
                let _ = child.kill();
                bail!("fedsb serve did not exit within 15 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let log_text = std::fs::read_to_string(dir.join(log))?;
        anyhow::ensure!(
            status.success(),
            "fedsb serve exited with {status} after SIGTERM:\n{log_text}"
        );
        Ok(log_text)
    };

    let (child, _) = serve("first.log")?;
    let log = stop(child, "first.log")?;
    assert!(
        log.contains("evaluation stopped for the shutdown"),
        "the evaluation was not stopped:\n{log}"
    );
    assert!(!log.contains("global model evaluated"), "{log}");

    // The next start finds round 0 without an evaluation and begins again.
    let (child, url) = serve("second.log")?;
    let rounds: serde_json::Value = reqwest::get(format!("{url}api/rounds"))
        .await?
        .json()
        .await?;
    assert_eq!(rounds[0]["round"], 0, "{rounds}");
    assert!(rounds[0]["eval"].is_null(), "{rounds}");
    let log = stop(child, "second.log")?;
    assert!(log.contains("evaluation stopped for the shutdown"), "{log}");
    Ok(())
}

/// A global model whose evaluation overflows (its loss is NaN) is not
/// stored and does not stop the evaluation of the rounds after it. Here
/// the adapter file's A and B are scaled by 1e30: round 0's R₀ then sends
/// the adapted layers to ∞, while rounds 1 and 2, whose R are 0, leave the
/// base model's outputs finite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_that_evaluates_to_nan_does_not_stop_the_later_ones() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_task(dir)?;
    let path = dir.join("adapter.safetensors");
    let bytes = std::fs::read(&path)?;
    let (_, header) = SafeTensors::read_metadata(&bytes)?;
    let file = SafeTensors::deserialize(&bytes)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in file.tensors() {
        let scale = if name.ends_with("lora_A") || name.ends_with("lora_B") {
            1e30f32
        } else {
            1.0
        };
        let data = view
            .data()
            .chunks_exact(4)
            .flat_map(|b| (f32::from_le_bytes(b.try_into().unwrap()) * scale).to_le_bytes())
            .collect();
        tensors.push((name, view.shape().to_vec(), data));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, data)| {
            Ok((
                name.as_str(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)?,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::fs::write(
        &path,
        safetensors::serialize(views, header.metadata().clone())?,
    )?;

    let agg = Aggregator::start_in(dir)?;
    let (mut p, _) = Participant::join(agg.addr, "scripted").await?;
    let global0 = p.wait_global(RoundId(0)).await?;
    for _ in 1..=2 {
        let round = p.wait_round_open().await?;
        let mut mine = global0.clone();
        for r in &mut mine.r {
            r.data.fill(0.0);
        }
        let answer = p.submit(update(round, 10, mine)).await?;
        anyhow::ensure!(
            matches!(answer, ServerMessage::UpdateAccepted { .. }),
            "{answer:?}"
        );
    }
    let started = Instant::now();
    let list = loop {
        let list = agg.json("/api/rounds").await?;
        let arr = list.as_array().context("/api/rounds is not an array")?;
        if arr.len() == 3 && arr[1..].iter().all(|r| !r["eval"].is_null()) {
            break list;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "rounds 1 and 2 not evaluated after 300 s: {list}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let rounds = list.as_array().unwrap();
    assert!(rounds[0]["eval"].is_null(), "{}", rounds[0]);
    for r in &rounds[1..] {
        let loss = r["eval"]["loss"].as_f64().context("loss")?;
        assert!(loss.is_finite(), "{r}");
    }
    // Round 0's failure is counted for an alert, once.
    assert_eq!(agg.metric("fedsb_eval_failures_total").await?, 1.0);
    assert_eq!(agg.metric("fedsb_eval_round").await?, 2.0);
    Ok(())
}
