//! `fedsb sim` end to end on a tiny random BERT (GPU: lavapipe here): every
//! round reported with the real protocol frame sizes, CSV and plot written,
//! both splits, the head-only baseline, DP-SGD clients with ε per round, bad
//! input refused, the simulation equal to the same run over WebSockets
//! (`fedsb serve` + three `fedsb join` processes on the shard files the
//! simulator wrote), also with the clients' AdamW moments kept across rounds
//! and with the learning rate decayed per round, and
//! `scripts/fed_sb_lr_sweep.sh`, `scripts/fed_sb_over_websockets.sh` and
//! `scripts/fed_sb_pooled_draw.sh` at a tiny scale.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fedsb_e2e::process::{check_success, fedsb_init, spawn_join, wait_child};
use fedsb_e2e::tiny_model::{labelled_tsv, tiny_config, write_tiny_model, LABELS};
use fedsb_e2e::*;
use fedsb_protocol::{AdapterState, RoundId, ServerMessage};

const RANK: usize = 4;
const CLIENTS: usize = 3;
const LOCAL_STEPS: u64 = 3;
const BATCH: u64 = 8;
/// Training rows: 24 per client in an IID split, three full batches.
const TRAIN_ROWS: usize = 72;
/// Whole-process limit for one `fedsb` run.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

struct Task {
    tmp: tempfile::TempDir,
}

impl Task {
    fn new() -> anyhow::Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path();
        write_tiny_model(&dir.join("model"), 11)?;
        std::fs::write(dir.join("train.tsv"), labelled_tsv(TRAIN_ROWS, 4, 0.5))?;
        std::fs::write(dir.join("eval.tsv"), labelled_tsv(24, 5, 0.5))?;
        Ok(Self { tmp })
    }

    fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// `fedsb init` on the task's model and training data with the
    /// simulator's initialization settings (seed 0) and η = `lr`, writing
    /// `out` in the task's directory.
    fn init(&self, lr: f64, out: &str) -> Command {
        self.init_from("train.tsv", Some(&LABELS.join(",")), lr, out)
    }

    /// [`Task::init`] on the task's file `train`, with `--labels` `labels`
    /// (none: the classes of `train`).
    fn init_from(&self, train: &str, labels: Option<&str>, lr: f64, out: &str) -> Command {
        let dir = self.path();
        let mut c = Command::new(fedsb_bin());
        c.arg("init")
            .arg("--model")
            .arg(dir.join("model"))
            .arg("--train")
            .arg(dir.join(train));
        if let Some(labels) = labels {
            c.args(["--labels", labels]);
        }
        c.args(["--rank", &RANK.to_string()])
            .args(["--init-samples", "32", "--batch", &BATCH.to_string()])
            .args([
                "--lr",
                &lr.to_string(),
                "--max-seq-len",
                "16",
                "--seed",
                "0",
            ])
            .arg("--out")
            .arg(dir.join(out))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    /// `fedsb sim` on the task's model and data with the test's training
    /// settings, plus `extra` flags.
    fn sim(&self, rounds: u64, extra: &[&str]) -> Command {
        self.sim_with(CLIENTS, rounds, extra)
    }

    fn sim_with(&self, clients: usize, rounds: u64, extra: &[&str]) -> Command {
        self.sim_labelled(clients, rounds, Some(&LABELS.join(",")), extra)
    }

    /// [`Task::sim_with`] with `--labels` `labels` (none: no `--labels`).
    fn sim_labelled(
        &self,
        clients: usize,
        rounds: u64,
        labels: Option<&str>,
        extra: &[&str],
    ) -> Command {
        let dir = self.path();
        let mut c = Command::new(fedsb_bin());
        c.arg("sim")
            .arg("--model")
            .arg(dir.join("model"))
            .arg("--train")
            .arg(dir.join("train.tsv"))
            .arg("--eval")
            .arg(dir.join("eval.tsv"))
            .args(["--clients", &clients.to_string()])
            .args(["--rounds", &rounds.to_string()])
            .args(["--rank", &RANK.to_string()])
            .args(["--batch", &BATCH.to_string()])
            .args(["--local-steps", &LOCAL_STEPS.to_string()])
            .args(["--lr", "0.01", "--max-seq-len", "16"]);
        if let Some(labels) = labels {
            c.args(["--labels", labels]);
        }
        c.args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // The pooled initialization's examples, unless the clients
        // initialize federatedly or the run starts from a file (the flags
        // conflict).
        if !extra
            .iter()
            .any(|f| ["--federated-init", "--init"].contains(f))
        {
            c.args(["--init-samples", "32"]);
        }
        c
    }

    /// The task's training and evaluation files where the scripts' DATA
    /// wants them: `data/train.tsv` and `data/dev.tsv`.
    fn script_data(&self) -> anyhow::Result<PathBuf> {
        let dir = self.path();
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        std::fs::copy(dir.join("train.tsv"), data.join("train.tsv"))?;
        std::fs::copy(dir.join("eval.tsv"), data.join("dev.tsv"))?;
        Ok(data)
    }

    /// `bash scripts/NAME OUT` with the settings that every script takes,
    /// at the tiny scale: the binary under test, the task's model, 2 clients
    /// × 2 rounds × 2 local steps, the test's rank and batch, 16 tokens,
    /// `RUST_LOG=warn`, output piped. A later `env` overrides any of them.
    fn script(&self, name: &str, out: &Path) -> Command {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../scripts")
            .join(name);
        let mut c = Command::new("bash");
        c.arg(script)
            .arg(out)
            .env("FEDSB", fedsb_bin())
            .env("MODEL", self.path().join("model"))
            .env("CLIENTS", "2")
            .env("ROUNDS", "2")
            .env("LOCAL_STEPS", "2")
            .env("RANK", RANK.to_string())
            .env("BATCH", BATCH.to_string())
            .env("MAX_SEQ_LEN", "16")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }
}

/// The rows of a JSON-lines file that a script wrote.
fn json_file(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: {l}", path.display())))
        .collect()
}

fn run(mut c: Command) -> anyhow::Result<Output> {
    let child = c.spawn().context("spawning fedsb")?;
    wait_output(child, RUN_TIMEOUT)
}

fn wait_output(mut child: std::process::Child, limit: Duration) -> anyhow::Result<Output> {
    let started = Instant::now();
    while child.try_wait()?.is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "still running after {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child.wait_with_output()?)
}

fn json_lines(out: &Output) -> anyhow::Result<Vec<serde_json::Value>> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect()
}

/// Encoded sizes from docs/protocol.md: an `Update` has 31 bytes of fixed
/// fields (magic, kind, round, num_samples, Some(train_loss), no privacy
/// report, the list count), a `GlobalModel` 29 (magic, kind, round,
/// participants, total_samples, list count); every tensor 1 + 4·ndim bytes
/// of header and 4 bytes per value.
fn frame_sizes() -> (u64, u64) {
    let c = tiny_config();
    let (r, h, classes) = (RANK as u64, c.hidden_size as u64, LABELS.len() as u64);
    let modules = 6 * c.num_hidden_layers as u64;
    let tensors = modules * (1 + 8 + 4 * r * r) + (1 + 8 + 4 * classes * h) + (1 + 4 + 4 * classes);
    (31 + tensors, 29 + tensors)
}

fn decode_global(bytes: &[u8]) -> anyhow::Result<(RoundId, u32, u64, AdapterState)> {
    match ServerMessage::decode(bytes)? {
        ServerMessage::GlobalModel {
            round,
            participants,
            total_samples,
            adapter,
        } => Ok((round, participants, total_samples, adapter)),
        other => bail!("expected a GlobalModel frame, got {other:?}"),
    }
}

fn flat(s: &AdapterState) -> Vec<f32> {
    s.named_tensors()
        .flat_map(|(_, t)| t.data.iter().copied())
        .collect()
}

/// Checks the per-round JSON lines of a run of `rounds` rounds. With equal
/// shards of whole batches (`exact`), every client uses `LOCAL_STEPS × BATCH`
/// samples; otherwise a client's epoch may end in a short batch.
fn check_rounds(lines: &[serde_json::Value], rounds: u64, exact: bool) -> anyhow::Result<()> {
    check_rounds_after(lines, rounds, exact, false)
}

/// [`check_rounds`]; with `federated_init` round 0 is the clients'
/// federated initialization (every client took part and uploaded) instead
/// of a model nobody sent anything for.
fn check_rounds_after(
    lines: &[serde_json::Value],
    rounds: u64,
    exact: bool,
    federated_init: bool,
) -> anyhow::Result<()> {
    let (update, global) = frame_sizes();
    assert_eq!(
        lines.len() as u64,
        rounds + 1,
        "round 0 plus {rounds}: {lines:?}"
    );
    for (n, l) in lines.iter().enumerate() {
        assert_eq!(l["round"], n as u64, "{l}");
        let acc = l["eval_accuracy"].as_f64().context("eval_accuracy")?;
        assert!((0.0..=1.0).contains(&acc), "{l}");
        let loss = l["eval_loss"].as_f64().context("eval_loss")?;
        assert!(loss.is_finite() && loss > 0.0, "{l}");
        // The confusion matrix (label × predicted, two classes) counts every
        // evaluated example once and its diagonal is the accuracy.
        let confusion: Vec<Vec<u64>> = serde_json::from_value(l["eval_confusion"].clone())
            .with_context(|| format!("eval_confusion in {l}"))?;
        assert_eq!(confusion.len(), 2, "{l}");
        assert!(confusion.iter().all(|row| row.len() == 2), "{l}");
        let total: u64 = confusion.iter().flatten().sum();
        assert!(total > 0, "{l}");
        let correct = confusion[0][0] + confusion[1][1];
        assert!((correct as f64 / total as f64 - acc).abs() < 1e-12, "{l}");
        assert!(l["seconds"].as_f64().context("seconds")? >= 0.0, "{l}");
        if n == 0 {
            if federated_init {
                assert_eq!(l["participants"], CLIENTS, "{l}");
                assert!(l["bytes_up"].as_u64().context("bytes_up")? > 0, "{l}");
            } else {
                assert_eq!(l["participants"], 0, "{l}");
                assert_eq!(l["bytes_up"], 0, "{l}");
            }
            continue;
        }
        assert_eq!(l["participants"], CLIENTS, "{l}");
        let samples = l["samples"].as_u64().context("samples")?;
        let full = CLIENTS as u64 * LOCAL_STEPS * BATCH;
        if exact {
            assert_eq!(samples, full, "{l}");
        } else {
            assert!(
                samples >= CLIENTS as u64 * LOCAL_STEPS && samples <= full,
                "{l}"
            );
        }
        assert_eq!(l["bytes_up"], CLIENTS as u64 * update, "{l}");
        assert_eq!(l["bytes_down"], CLIENTS as u64 * global, "{l}");
        let train_loss = l["train_loss"].as_f64().context("train_loss")?;
        assert!(train_loss.is_finite() && train_loss > 0.0, "{l}");
    }
    Ok(())
}

#[test]
fn sim_reports_every_round_with_real_frame_sizes_iid_and_dirichlet() -> anyhow::Result<()> {
    let task = Task::new()?;
    let dir = task.path();
    for (split, rounds) in [("iid", 3), ("dirichlet:0.3", 2)] {
        let csv = dir.join(format!("{split}.csv"));
        let png = dir.join(format!("{split}.png"));
        let shards = dir.join(format!("shards-{split}"));
        let out = run(task.sim(
            rounds,
            &[
                "--split",
                split,
                "--json",
                "--seed",
                "3",
                "--csv",
                csv.to_str().context("path")?,
                "--plot",
                png.to_str().context("path")?,
                "--write-shards",
                shards.to_str().context("path")?,
            ],
        ))?;
        check_success(&format!("fedsb sim --split {split}"), &out)?;
        eprintln!(
            "--- fedsb sim --split {split}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = json_lines(&out)?;
        check_rounds(&lines, rounds, split == "iid")?;
        // The summary table goes to stderr with --json.
        assert!(String::from_utf8_lossy(&out.stderr).contains("bytes up"));

        let csv = std::fs::read_to_string(&csv)?;
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(
            rows.len() as u64,
            rounds + 2,
            "header + round 0..{rounds}: {csv}"
        );
        // The JSON lines' scalar fields (all but the confusion matrix), in
        // their order, and in every row the same values.
        let columns: Vec<&str> = rows[0].split(',').collect();
        assert_eq!(
            columns,
            [
                "round",
                "eval_accuracy",
                "eval_loss",
                "train_loss",
                "participants",
                "samples",
                "bytes_up",
                "bytes_down",
                "seconds",
                "epsilon_spent",
                "learning_rate",
            ],
            "{csv}"
        );
        let mut scalars: Vec<&str> = lines[0]
            .as_object()
            .context("a round line is not an object")?
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "eval_confusion")
            .collect();
        scalars.sort_unstable();
        let mut sorted = columns.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, scalars, "the CSV's columns and the JSON's fields");
        for (n, row) in rows[1..].iter().enumerate() {
            let cells: Vec<&str> = row.split(',').collect();
            assert_eq!(cells.len(), columns.len(), "{row}");
            for (column, cell) in columns.iter().zip(cells) {
                let json = &lines[n][*column];
                if json.is_null() {
                    assert_eq!(cell, "", "{column} in {row}");
                } else {
                    let value: f64 = cell.parse().with_context(|| format!("{column}: {cell}"))?;
                    assert_eq!(Some(value), json.as_f64(), "{column} in {row}");
                }
            }
        }
        assert!(lines[1]["learning_rate"].as_f64().is_some());
        // The finished run's curve reaches the right end of its x axis.
        let (width, pixels) = png_rgb(&png)?;
        let blue_right = pixels
            .chunks_exact(3)
            .enumerate()
            .filter(|(_, p)| p == &[0, 0, 255])
            .map(|(i, _)| i % width)
            .max();
        assert!(
            blue_right > Some(width * 3 / 4),
            "{blue_right:?} of {width}"
        );

        // The shards partition the training data; every client has some.
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(shards.join("shards.json"))?)?;
        let clients = manifest["clients"].as_array().context("clients")?;
        assert_eq!(clients.len(), CLIENTS);
        let mut total = 0;
        for c in clients {
            let n = c["examples"].as_u64().context("examples")?;
            assert!(n >= 1, "{c}");
            let file = shards.join(c["file"].as_str().context("file")?);
            assert_eq!(std::fs::read_to_string(file)?.lines().count() as u64, n);
            total += n;
        }
        assert_eq!(total, TRAIN_ROWS as u64);
    }
    Ok(())
}

#[test]
fn head_only_keeps_every_r_and_trains_the_head() -> anyhow::Result<()> {
    let task = Task::new()?;
    let globals = task.path().join("globals");
    let out = run(task.sim(
        2,
        &[
            "--head-only",
            "--json",
            "--write-globals",
            globals.to_str().context("path")?,
        ],
    ))?;
    check_success("fedsb sim --head-only", &out)?;
    check_rounds(&json_lines(&out)?, 2, true)?;
    let (_, _, _, r0) = decode_global(&std::fs::read(globals.join("round-0.bin"))?)?;
    let (round, participants, samples, r2) =
        decode_global(&std::fs::read(globals.join("round-2.bin"))?)?;
    assert_eq!((round, participants), (RoundId(2), CLIENTS as u32));
    assert_eq!(samples, CLIENTS as u64 * LOCAL_STEPS * BATCH);
    assert_eq!(r0.r, r2.r, "--head-only must leave every R as it was");
    assert_ne!(r0.head_weight, r2.head_weight, "the head must train");
    Ok(())
}

/// `--centre-head` changes the initial global model's head bias and
/// nothing else: round 0's R and head weights are those of the same run
/// without it.
#[test]
fn centre_head_moves_only_the_initial_head_bias() -> anyhow::Result<()> {
    let task = Task::new()?;
    let mut round0 = Vec::new();
    for centre in [false, true] {
        let globals = task.path().join(format!("globals-{centre}"));
        let mut flags = vec![
            "--json",
            "--write-globals",
            globals.to_str().context("path")?,
        ];
        if centre {
            flags.push("--centre-head");
        }
        let out = run(task.sim(1, &flags))?;
        check_success(&format!("fedsb sim {flags:?}"), &out)?;
        check_rounds(&json_lines(&out)?, 1, true)?;
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).contains("head centred"),
            centre,
            "{flags:?}"
        );
        let (_, _, _, state) = decode_global(&std::fs::read(globals.join("round-0.bin"))?)?;
        round0.push(state);
    }
    assert_eq!(round0[0].r, round0[1].r);
    assert_eq!(round0[0].head_weight, round0[1].head_weight);
    assert_ne!(
        round0[0].head_bias, round0[1].head_bias,
        "the bias must move"
    );
    Ok(())
}

/// `--output` writes the final global model as an adapter file; `fedsb
/// eval` of it on the eval file gives the last round's accuracy and loss.
#[test]
fn the_final_global_model_is_written_and_evaluates_as_the_last_round() -> anyhow::Result<()> {
    let task = Task::new()?;
    let file = task.path().join("final.safetensors");
    let out = run(task.sim(2, &["--json", "--output", file.to_str().context("path")?]))?;
    check_success("fedsb sim --output", &out)?;
    let lines = json_lines(&out)?;
    let last = lines.last().context("no round line")?;
    assert_eq!(last["round"], 2, "{last}");
    let measured = task.eval(&file)?;
    assert_eq!(measured["round"], 2, "{measured}");
    assert_evaluated_alike(&measured, last);
    Ok(())
}

impl Task {
    /// `fedsb eval` of the adapter file `file` on the task's eval file, at
    /// the simulator's batch and sequence length: its JSON report.
    fn eval(&self, file: &Path) -> anyhow::Result<serde_json::Value> {
        let out = Command::new(fedsb_bin())
            .args(["eval", "--model"])
            .arg(self.path().join("model"))
            .arg("--adapter-file")
            .arg(file)
            .arg("--eval")
            .arg(self.path().join("eval.tsv"))
            .args(["--batch", &BATCH.to_string(), "--max-seq-len", "16"])
            .env("RUST_LOG", "warn")
            .output()?;
        check_success(&format!("fedsb eval of {}", file.display()), &out)?;
        json_lines(&out)?.pop().context("no eval line")
    }
}

/// `fedsb eval`'s report `measured` has the accuracy, confusion matrix and
/// loss of the simulator's round line `round`.
fn assert_evaluated_alike(measured: &serde_json::Value, round: &serde_json::Value) {
    assert_eq!(
        measured["accuracy"], round["eval_accuracy"],
        "{measured} vs {round}"
    );
    assert_eq!(
        measured["confusion"], round["eval_confusion"],
        "{measured} vs {round}"
    );
    let (got, want) = (
        measured["loss"].as_f64().unwrap_or(f64::NAN),
        round["eval_loss"].as_f64().unwrap_or(f64::NAN),
    );
    assert!(
        (got - want).abs() <= 1e-6 * want,
        "fedsb eval {got}, sim {want}"
    );
}

/// `--init FILE` starts from the file's head with the classes its `labels`
/// metadata names, in that order, as `fedsb train --init` does: from a
/// file whose classes are not in sorted order, on data labelled by name,
/// round 0 evaluates as `fedsb eval` of the file and `--output` keeps the
/// file's order. `--labels` in another order, and a file whose classes are
/// ids ("0", "1") that the data's names are not, are refused, naming the
/// classes.
#[test]
fn an_init_files_labels_fix_the_heads_classes() -> anyhow::Result<()> {
    let task = Task::new()?;
    let dir = task.path();
    let s = |p: &Path| p.to_str().context("path").map(str::to_owned);
    let reversed = [LABELS[1], LABELS[0]];
    let out = run(task.init_from(
        "train.tsv",
        Some(&reversed.join(",")),
        0.01,
        "reversed.safetensors",
    ))?;
    check_success("fedsb init --labels positive,negative", &out)?;
    let init = dir.join("reversed.safetensors");
    let output = dir.join("final.safetensors");
    let out = run(task.sim_labelled(
        CLIENTS,
        1,
        None,
        &["--init", &s(&init)?, "--json", "--output", &s(&output)?],
    ))?;
    check_success("fedsb sim --init reversed.safetensors", &out)?;
    let lines = json_lines(&out)?;
    check_rounds(&lines, 1, true)?;
    assert_evaluated_alike(&task.eval(&init)?, &lines[0]);
    let metadata = |file: &Path, key: &str| -> anyhow::Result<String> {
        let bytes = std::fs::read(file)?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
        header
            .metadata()
            .as_ref()
            .and_then(|m| m.get(key).cloned())
            .with_context(|| format!("{} has no {key} metadata", file.display()))
    };
    let labels = |file: &Path| -> anyhow::Result<Vec<String>> {
        Ok(serde_json::from_str(&metadata(file, "labels")?)?)
    };
    assert_eq!(labels(&output)?, reversed, "the output's classes");
    assert_eq!(metadata(&output, "max_seq_len")?, "16");
    assert_evaluated_alike(&task.eval(&output)?, &lines[1]);

    let refused = |labels: Option<&str>, file: &Path, wanted: &[&str]| -> anyhow::Result<()> {
        let out = run(task.sim_labelled(CLIENTS, 1, labels, &["--init", &s(file)?]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{labels:?} with {file:?} was accepted"
        );
        for part in wanted {
            assert!(stderr.contains(part), "{part:?} not in {stderr}");
        }
        Ok(())
    };
    refused(
        Some(&LABELS.join(",")),
        &init,
        &[
            "--labels [\"negative\", \"positive\"]",
            "[\"positive\", \"negative\"]",
            "reversed.safetensors",
        ],
    )?;
    // Classes by id: what a run on data labelled 0 and 1 records.
    let ids = std::fs::read_to_string(dir.join("train.tsv"))?
        .replace(&format!("\t{}", LABELS[0]), "\t0")
        .replace(&format!("\t{}", LABELS[1]), "\t1");
    std::fs::write(dir.join("ids.tsv"), ids)?;
    let out = run(task.init_from("ids.tsv", None, 0.01, "ids.safetensors"))?;
    check_success("fedsb init on labels 0 and 1", &out)?;
    assert_eq!(labels(&dir.join("ids.safetensors"))?, ["0", "1"]);
    refused(
        None,
        &dir.join("ids.safetensors"),
        &[
            "label \"positive\" is not one of the classes [0, 1]",
            "ids.safetensors",
        ],
    )?;

    // The rank is the file's: without --rank the run takes it (the default
    // 32 would not fit this file of rank 4), and another --rank is refused.
    // So is the sequence length: without --max-seq-len the run trains at
    // the file's 16 (the model would allow more), and its output says so.
    let from_file = dir.join("from-file.safetensors");
    let with_rank = |rank: Option<usize>| -> anyhow::Result<Output> {
        let mut c = Command::new(fedsb_bin());
        c.arg("sim")
            .arg("--model")
            .arg(dir.join("model"))
            .arg("--train")
            .arg(dir.join("train.tsv"))
            .arg("--eval")
            .arg(dir.join("eval.tsv"))
            .args(["--clients", "2", "--rounds", "1", "--local-steps", "1"])
            .args(["--batch", &BATCH.to_string()])
            .arg("--init")
            .arg(&init)
            .arg("--output")
            .arg(&from_file)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(rank) = rank {
            c.args(["--rank", &rank.to_string()]);
        }
        run(c)
    };
    check_success("fedsb sim --init without --rank", &with_rank(None)?)?;
    assert_eq!(metadata(&from_file, "max_seq_len")?, "16");
    let out = with_rank(Some(RANK + 1))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "--rank {} was accepted", RANK + 1);
    assert!(
        stderr.contains(&format!(
            "--rank {} does not match the rank {RANK}",
            RANK + 1
        )),
        "{stderr}"
    );
    Ok(())
}

/// `--dp-epsilon`: every client trains with DP-SGD (σ calibrated for its
/// rounds × local steps), its update carries a privacy report that the
/// aggregator's policy check accepts, and each round reports the ε spent,
/// rising to at most the target.
/// A `--init` file's modules are the run's: without `--modules` the run
/// adapts the file's (a file of the query linears alone trains), and
/// `--modules` naming others are refused instead of reading part of the
/// file and starting from another model than it holds.
#[test]
fn an_init_files_modules_are_the_runs_modules() -> anyhow::Result<()> {
    let task = Task::new()?;
    let dir = task.path();
    let s = |p: &Path| p.to_str().context("path").map(str::to_owned);
    let mut init = task.init(0.01, "query.safetensors");
    init.args(["--modules", "attention.self.query"]);
    check_success("fedsb init --modules attention.self.query", &run(init)?)?;
    let query = dir.join("query.safetensors");
    let out = run(task.sim(1, &["--init", &s(&query)?, "--json"]))?;
    check_success("fedsb sim --init query.safetensors", &out)?;
    let lines = json_lines(&out)?;
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[1]["participants"], CLIENTS);
    // Updates of the 2 query modules, not of all 12 (`frame_sizes`).
    let (update, _) = frame_sizes();
    let r = RANK as u64;
    let query_only = update - 10 * (1 + 8 + 4 * r * r);
    assert_eq!(lines[1]["bytes_up"], CLIENTS as u64 * query_only);
    assert_evaluated_alike(&task.eval(&query)?, &lines[0]);

    check_success("fedsb init", &run(task.init(0.01, "all.safetensors"))?)?;
    let all = dir.join("all.safetensors");
    for (file, modules) in [
        (&all, "attention.self.query"),
        (&query, "attention.self.query,attention.self.key"),
    ] {
        let out = run(task.sim(1, &["--init", &s(file)?, "--modules", modules]))?;
        assert!(!out.status.success(), "--modules {modules} with {file:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!(
            "--modules {modules} are not the modules of {} (--init)",
            file.display()
        );
        assert!(stderr.contains(&want), "{want:?} not in {stderr}");
    }
    // The file's own modules, named in another order, are its modules.
    let out = run(task.sim(
        1,
        &[
            "--init",
            &s(&all)?,
            "--modules",
            "output.dense,intermediate.dense,attention.output.dense,attention.self.value,\
             attention.self.key,attention.self.query",
        ],
    ))?;
    check_success(
        "fedsb sim --init all.safetensors --modules (reordered)",
        &out,
    )?;
    Ok(())
}

/// The `--csv` file holds every round so far while the run goes on (each
/// round's row is written before the round is reported), so a run stopped
/// early keeps its rounds; it is replaced whole, never left half written.
#[test]
fn the_csv_and_plot_hold_the_rounds_so_far_while_the_run_goes_on() -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let task = Task::new()?;
    let csv = task.path().join("rounds.csv");
    let plot = task.path().join("rounds.png");
    let rounds = 40;
    let mut c = task.sim(
        rounds,
        &[
            "--json",
            "--csv",
            csv.to_str().context("path")?,
            "--plot",
            plot.to_str().context("path")?,
        ],
    );
    let mut child = c.stderr(Stdio::null()).spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let reported = loop {
        let line = lines.next().context("the run ended before round 1")??;
        let v: serde_json::Value = serde_json::from_str(&line)?;
        if v["round"] == 1 {
            break v;
        }
    };
    child.kill()?;
    child.wait()?;
    let text = std::fs::read_to_string(&csv).context("no --csv file after round 1")?;
    let mut rows = text.lines();
    let header: Vec<&str> = rows.next().context("no header")?.split(',').collect();
    let rows: Vec<Vec<&str>> = rows.map(|r| r.split(',').collect()).collect();
    assert!(
        rows.len() >= 2 && rows.len() < rounds as usize + 1,
        "{} rows after round 1 of {rounds} (a run that finished before it was stopped shows \
         nothing):\n{text}",
        rows.len()
    );
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.len(), header.len(), "row {i}: {row:?}");
        assert_eq!(row[0], i.to_string(), "{text}");
    }
    let column = |name: &str| header.iter().position(|h| *h == name).context("column");
    let accuracy: f64 = rows[1][column("eval_accuracy")?].parse()?;
    assert_eq!(serde_json::json!(accuracy), reported["eval_accuracy"]);

    // The plot: a whole PNG whose x axis spans the run's 40 rounds, so the
    // few rounds done so far sit at its left edge (blue: the curve and dots).
    let (width, pixels) = png_rgb(&plot).context("no complete --plot file after round 1")?;
    let blue_x = pixels
        .chunks_exact(3)
        .enumerate()
        .filter(|(_, p)| p == &[0, 0, 255])
        .map(|(i, _)| i % width)
        .collect::<Vec<_>>();
    let (first, last) = (blue_x.iter().min(), blue_x.iter().max());
    assert!(
        first.is_some() && last < Some(&(width / 8)),
        "blue pixels at x = {first:?}..{last:?} of {width} after {} of {rounds} rounds",
        rows.len() - 1
    );
    Ok(())
}

/// A PNG's width and its pixels as RGB bytes.
fn png_rgb(path: &std::path::Path) -> anyhow::Result<(usize, Vec<u8>)> {
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path)?));
    let mut reader = decoder.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf)?;
    anyhow::ensure!(
        info.color_type == png::ColorType::Rgb && info.bit_depth == png::BitDepth::Eight,
        "{:?} {:?}",
        info.color_type,
        info.bit_depth
    );
    buf.truncate(info.buffer_size());
    Ok((info.width as usize, buf))
}

#[test]
fn dp_clients_train_with_dp_sgd_and_epsilon_rises_to_the_target() -> anyhow::Result<()> {
    const ROUNDS: u64 = 3;
    const EPSILON: f64 = 8.0;
    let task = Task::new()?;
    let dir = task.path();
    // Public seed data for the initialization, which DP-SGD does not cover.
    std::fs::write(dir.join("seed.tsv"), labelled_tsv(16, 9, 0.5))?;
    fedsb_init(
        dir,
        RANK as u32,
        &["--init-samples", "16", "--batch", "8", "--lr", "0.01"],
    )?;
    let adapter = dir.join("adapter.safetensors");
    let globals = dir.join("globals");
    let csv = dir.join("dp.csv");
    let out = run(task.sim(
        ROUNDS,
        &[
            "--init",
            adapter.to_str().context("path")?,
            "--dp-epsilon",
            &EPSILON.to_string(),
            "--clip",
            "1.0",
            "--json",
            "--write-globals",
            globals.to_str().context("path")?,
            "--csv",
            csv.to_str().context("path")?,
        ],
    ))?;
    check_success("fedsb sim --dp-epsilon", &out)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("differential privacy: ε = 8, δ = 0.00001, C = 1")
            && stderr.contains(&format!("over {} steps per client", ROUNDS * LOCAL_STEPS)),
        "{stderr}"
    );
    let lines = json_lines(&out)?;
    assert_eq!(
        lines.len() as u64,
        ROUNDS + 1,
        "rounds 0..{ROUNDS}: {lines:?}"
    );
    let (update, global) = frame_sizes();
    let mut spent = Vec::new();
    for (n, l) in lines.iter().enumerate() {
        assert_eq!(l["round"].as_u64(), Some(n as u64), "{l}");
        spent.push(l["epsilon_spent"].as_f64().context("epsilon_spent")?);
        if n == 0 {
            continue;
        }
        assert_eq!(l["participants"].as_u64(), Some(CLIENTS as u64), "{l}");
        // DP updates weigh their expected samples: q·N = the batch per step.
        assert_eq!(
            l["samples"].as_u64(),
            Some(CLIENTS as u64 * LOCAL_STEPS * BATCH),
            "{l}"
        );
        // Each update carries a privacy report: six 8-byte fields.
        assert_eq!(
            l["bytes_up"].as_u64(),
            Some(CLIENTS as u64 * (update + 48)),
            "{l}"
        );
        assert_eq!(
            l["bytes_down"].as_u64(),
            Some(CLIENTS as u64 * global),
            "{l}"
        );
    }
    assert_eq!(spent[0], 0.0, "{spent:?}");
    assert!(
        spent.windows(2).all(|w| w[1] > w[0]),
        "ε must rise every round: {spent:?}"
    );
    let last = *spent.last().expect("rounds");
    assert!(
        last <= EPSILON && last > 0.5 * EPSILON,
        "σ is calibrated so that all the steps spend at most (and about) ε = {EPSILON}: {spent:?}"
    );
    // The CSV's epsilon_spent column has the ε of every round.
    let csv = std::fs::read_to_string(&csv)?;
    let mut rows = csv.lines().map(|l| l.split(',').collect::<Vec<_>>());
    let header = rows.next().context("an empty CSV")?;
    let column = header
        .iter()
        .position(|c| *c == "epsilon_spent")
        .with_context(|| format!("no epsilon_spent column: {csv}"))?;
    let in_csv = rows
        .map(|cells| Ok(cells.get(column).context("a short row")?.parse()?))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    assert_eq!(in_csv, spent, "{csv}");
    let (_, _, _, r0) = decode_global(&std::fs::read(globals.join("round-0.bin"))?)?;
    let (round, participants, _, last_state) =
        decode_global(&std::fs::read(globals.join(format!("round-{ROUNDS}.bin")))?)?;
    assert_eq!((round, participants), (RoundId(ROUNDS), CLIENTS as u32));
    assert_ne!(r0.r, last_state.r, "DP-SGD must train R");
    Ok(())
}

#[test]
fn without_json_rounds_go_to_stderr_and_the_table_to_stdout() -> anyhow::Result<()> {
    let task = Task::new()?;
    let out = run(task.sim(1, &[]))?;
    check_success("fedsb sim", &out)?;
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        stderr.contains("round 0: eval accuracy") && stderr.contains("round 1: eval accuracy"),
        "{stderr}"
    );
    let table: Vec<&str> = stdout.lines().collect();
    assert!(
        table[0].contains("accuracy") && table[0].contains("bytes up"),
        "{stdout}"
    );
    assert_eq!(table.len(), 4, "header, rounds 0 and 1, totals: {stdout}");
    assert!(table[3].starts_with("total:"), "{stdout}");
    Ok(())
}

#[test]
fn sim_refuses_bad_input_clearly() -> anyhow::Result<()> {
    let task = Task::new()?;
    let cases: [(usize, &[&str], &str); 28] = [
        (CLIENTS, &["--split", "shards"], "unknown --split"),
        (CLIENTS, &["--split", "dirichlet:0"], "positive"),
        (CLIENTS, &["--split", "dirichlet:-2"], "positive"),
        (0, &[], "--clients must be at least 1"),
        (TRAIN_ROWS + 1, &[], "more than the 72 training examples"),
        (
            CLIENTS,
            &["--dp-epsilon", "3"],
            "differential privacy needs --clip",
        ),
        (CLIENTS, &["--clip", "1"], "--clip needs --dp-epsilon"),
        (
            CLIENTS,
            &["--dp-epsilon", "0", "--clip", "1"],
            "--dp-epsilon must be a finite number > 0, got 0",
        ),
        (
            CLIENTS,
            &["--dp-epsilon", "3", "--clip=-1"],
            "--clip must be a finite number > 0, got -1",
        ),
        (
            CLIENTS,
            &["--dp-epsilon", "3", "--clip", "1", "--dp-delta", "1"],
            "--dp-delta must be in (0, 1), got 1",
        ),
        (
            CLIENTS,
            &["--dp-epsilon", "3", "--clip", "1"],
            "must not read the private training data",
        ),
        (
            CLIENTS,
            &["--dp-epsilon", "3", "--clip", "1", "--head-only"],
            "--head-only trains without DP-SGD",
        ),
        (CLIENTS, &["--init-lr", "0"], "--init-lr 0 must be positive"),
        (CLIENTS, &["--head-lr", "0"], "--head-lr 0 must be positive"),
        (
            CLIENTS,
            &["--init-lr", "0.01", "--init", "adapter.safetensors"],
            "--init-lr sets η of the initialization, which --init skips",
        ),
        (
            CLIENTS,
            &["--lr-decay", "0"],
            "--lr-decay 0 must be in (0, 1]",
        ),
        (
            CLIENTS,
            &["--lr-decay", "1.5"],
            "--lr-decay 1.5 must be in (0, 1]",
        ),
        (
            CLIENTS,
            &["--lr-warmup-rounds", "1"],
            "--lr-warmup-rounds 1 must be below --rounds 1",
        ),
        (
            CLIENTS,
            &["--server-lr", "0"],
            "--server-lr: the server learning rate 0 must be in (0, 2]",
        ),
        (
            CLIENTS,
            &["--server-momentum", "1"],
            "--server-momentum: the server momentum 1 must be in [0, 1)",
        ),
        (
            CLIENTS,
            &["--server-lr", "3", "--server-momentum", "0.5"],
            "--server-lr: the server learning rate 3 must be in (0, 2]",
        ),
        (
            CLIENTS,
            &["--centre-head", "--init", "adapter.safetensors"],
            "'--centre-head' cannot be used with '--init <INIT>'",
        ),
        (
            CLIENTS,
            &["--federated-init", "0"],
            "--federated-init must be at least 1 (examples per client)",
        ),
        (
            CLIENTS,
            &["--federated-init", "4", "--init", "adapter.safetensors"],
            "'--federated-init <N>' cannot be used with '--init <INIT>'",
        ),
        (
            CLIENTS,
            &["--federated-init", "4", "--init-samples", "8"],
            "'--federated-init <N>' cannot be used with '--init-samples <INIT_SAMPLES>'",
        ),
        (
            CLIENTS,
            &["--federated-init", "4", "--dp-epsilon", "3", "--clip", "1"],
            "must not read the private training data",
        ),
        (
            CLIENTS,
            &["--init", "adapter.safetensors", "--init-samples", "8"],
            "'--init <INIT>' cannot be used with '--init-samples <INIT_SAMPLES>'",
        ),
        // An output the run could not write is found before the run: /proc
        // takes no new file.
        (
            CLIENTS,
            &["--csv", "/proc/fedsb-sim.csv"],
            "--csv /proc/fedsb-sim.csv: cannot write a file in /proc",
        ),
    ];
    for (clients, flags, message) in cases {
        let out = run(task.sim_with(clients, 1, flags))?;
        assert!(
            !out.status.success(),
            "{clients} clients, {flags:?} must fail"
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(message),
            "{clients} clients, {flags:?}: expected {message:?} in {stderr}"
        );
    }
    Ok(())
}

/// `--init-lr η` initializes as `fedsb init --lr η` does while the clients
/// train at `--lr`: the same round 0 and round 1 as a run given that file
/// with `--init`. η scales R₀ alone (ΔW = −η·sign(G), so its SVD scales), and
/// without `--init-lr` η is `--lr`.
#[test]
fn init_lr_sets_the_initialization_apart_from_the_clients_learning_rate() -> anyhow::Result<()> {
    let task = Task::new()?;
    let dir = task.path().to_owned();
    check_success(
        "fedsb init",
        &run(task.init(0.003, "init-3e-3.safetensors"))?,
    )?;

    // Every run's clients train at --lr 0.01 (Task::sim).
    let globals = |name: &str| dir.join(name);
    let runs: [(&str, &[&str]); 3] = [
        ("init-lr", &["--init-lr", "0.003"]),
        ("file", &["--init", "init-3e-3.safetensors"]),
        ("lr", &[]),
    ];
    for (name, flags) in runs {
        let out_dir = globals(name);
        let mut c = task.sim(1, flags);
        c.arg("--write-globals").arg(&out_dir).current_dir(&dir);
        check_success(&format!("fedsb sim ({name})"), &run(c)?)?;
    }
    let state = |name: &str, round: u64| -> anyhow::Result<AdapterState> {
        let bytes = std::fs::read(globals(name).join(format!("round-{round}.bin")))?;
        Ok(decode_global(&bytes)?.3)
    };
    for round in [0, 1] {
        let (rel, _) = compare(&state("init-lr", round)?, &state("file", round)?);
        assert!(
            rel <= 1e-6,
            "round {round}: --init-lr 0.003 and --init (fedsb init --lr 0.003) differ by {rel:e}"
        );
    }
    // Round 0 with η = --lr = 0.01: R₀ is 0.01 / 0.003 times larger, the
    // head (not from the SVD) is the same.
    let (small, large) = (state("init-lr", 0)?, state("lr", 0)?);
    let ratio = 0.01 / 0.003;
    let mut worst = 0.0f64;
    for (s, l) in small.r.iter().zip(&large.r) {
        for (&a, &b) in s.data.iter().zip(&l.data) {
            let want = f64::from(a) * ratio;
            worst = worst.max((f64::from(b) - want).abs() / want.abs().max(1e-6));
        }
    }
    assert!(
        worst <= 1e-3,
        "R₀ at η = --lr 0.01 is not 0.01/0.003 × R₀ at --init-lr 0.003: worst relative {worst:e}"
    );
    assert!(small.r.iter().flat_map(|t| &t.data).any(|&v| v != 0.0));
    assert_eq!(small.head_weight.data, large.head_weight.data);
    Ok(())
}

/// `scripts/fed_sb_lr_sweep.sh` (the GPU sweep behind BENCHMARKS' Fed-SB
/// learning-rate rows) runs end to end at a tiny scale: one initialization,
/// each rate's simulations with the moments reset and kept, at a constant
/// and a decaying rate, with the plain mean and a server step with
/// momentum, and the centralized run, each writing its per-round JSON lines.
#[test]
fn the_learning_rate_sweep_script_runs_on_a_tiny_model() -> anyhow::Result<()> {
    let task = Task::new()?;
    let data = task.script_data()?;
    let out_dir = task.path().join("sweep");
    let mut c = task.script("fed_sb_lr_sweep.sh", &out_dir);
    c.env("DATA", &data)
        .env("LRS", "1e-2 3e-2")
        .env("INIT_LR", "1e-2")
        .env("INIT_SAMPLES", "16")
        .env("MOMENTS", "reset keep")
        .env("DECAYS", "1 0.5")
        .env("SERVERS", "1:0 0.5:0.5");
    let out = run(c)?;
    check_success("scripts/fed_sb_lr_sweep.sh", &out)?;
    let lines = |name: &str| json_file(&out_dir.join(name));
    assert!(out_dir.join("init.safetensors").is_file());
    for lr in ["1e-2", "3e-2"] {
        let reset = lines(&format!("sim-iid-lr{lr}.jsonl"))?;
        let kept = lines(&format!("sim-iid-lr{lr}-keep.jsonl"))?;
        let decayed = lines(&format!("sim-iid-lr{lr}-decay0.5.jsonl"))?;
        let decayed_kept = lines(&format!("sim-iid-lr{lr}-decay0.5-keep.jsonl"))?;
        let server = lines(&format!("sim-iid-lr{lr}-server0.5m0.5.jsonl"))?;
        let server_kept = lines(&format!("sim-iid-lr{lr}-server0.5m0.5-keep.jsonl"))?;
        let server_decayed = lines(&format!("sim-iid-lr{lr}-decay0.5-server0.5m0.5.jsonl"))?;
        for rows in [
            &reset,
            &kept,
            &decayed,
            &decayed_kept,
            &server,
            &server_kept,
            &server_decayed,
        ] {
            let rounds: Vec<u64> = rows.iter().filter_map(|r| r["round"].as_u64()).collect();
            assert_eq!(rounds, [0, 1, 2], "lr {lr}");
        }
        // The server's step moves round 1 half way to the clients' mean.
        assert_eq!(reset[0]["eval_loss"], server[0]["eval_loss"], "lr {lr}");
        assert_ne!(reset[1]["eval_loss"], server[1]["eval_loss"], "lr {lr}");
        // Nothing is carried into round 1, and the decay starts in round 2.
        assert_eq!(reset[1]["eval_loss"], kept[1]["eval_loss"], "lr {lr}");
        assert_eq!(reset[1]["eval_loss"], decayed[1]["eval_loss"], "lr {lr}");
        let base: f64 = lr.parse()?;
        for rows in [&decayed, &decayed_kept] {
            let rate = |n: usize| rows[n]["learning_rate"].as_f64().context("learning_rate");
            assert!((rate(1)? - base).abs() < 1e-9 * base, "lr {lr}");
            assert!((rate(2)? - base / 2.0).abs() < 1e-9 * base, "lr {lr}");
        }
        assert!(
            (reset[2]["learning_rate"]
                .as_f64()
                .context("learning_rate")?
                - base)
                .abs()
                < 1e-9 * base
        );
        // The centralized run: 2 clients × 2 rounds × 2 steps, evaluated
        // after every 4 steps, then its final line.
        let train = lines(&format!("train-lr{lr}.jsonl"))?;
        let last = train.last().context("no centralized result")?;
        assert_eq!(last["steps"], 8, "lr {lr}: {last}");
        assert!(last["eval_accuracy"].is_f64(), "lr {lr}: {last}");
    }
    Ok(())
}

/// `scripts/fed_sb_over_websockets.sh` on a tiny model: with the
/// simulator's centred initial model (INIT=file) every round's evaluation
/// by the aggregator equals the simulation's (the script checks it with
/// COMPARE=1); with a federated initialization that centres its head over
/// the protocol (INIT=federated) both clients' examples make round 0, every
/// round commits, and every evaluation (and round 0's upload) equals the
/// simulation's with `--federated-init`.
#[test]
fn the_websocket_script_runs_the_recipe_on_a_tiny_model() -> anyhow::Result<()> {
    let task = Task::new()?;
    let dir = task.path();
    let run_script = |out: &str, init: &str, compare: &str| -> anyhow::Result<Output> {
        let mut c = task.script("fed_sb_over_websockets.sh", &dir.join(out));
        c.env("TRAIN", dir.join("train.tsv"))
            .env("EVAL", dir.join("eval.tsv"))
            .env("LR", "0.01")
            .env("INIT_LR", "0.01")
            .env("INIT_SAMPLES", "32")
            .env("FED_INIT_SAMPLES", "8")
            .env("LABELS", LABELS.join(","))
            .env("INIT", init)
            .env("COMPARE", compare)
            .env("RUST_LOG", "info");
        let out = run(c)?;
        check_success(
            &format!("scripts/fed_sb_over_websockets.sh, INIT={init}"),
            &out,
        )?;
        Ok(out)
    };
    let out = run_script("file", "file", "1")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("every round's evaluation equals the simulator's (3 rounds)"),
        "{stdout}"
    );
    let out = run_script("federated", "federated", "1")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("initial head centred"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("every round's evaluation equals the simulator's (3 rounds)"),
        "{stdout}"
    );
    let rounds: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("federated/rounds.json"))?)?;
    let rounds = rounds.as_array().context("rounds.json")?;
    assert_eq!(rounds.len(), 3, "{rounds:?}");
    assert_eq!(rounds[0]["participants"], 2, "{:?}", rounds[0]);
    assert_eq!(rounds[0]["total_samples"], 16, "{:?}", rounds[0]);
    for r in &rounds[1..] {
        assert_eq!(r["participants"], 2, "{r}");
    }
    Ok(())
}

/// `scripts/fed_sb_pooled_draw.sh` (BENCHMARKS' pooled draws) on a tiny
/// model, two seeds: each ORDER reorders the training file's rows (all of
/// them, the header first), so a seed's initialization keeps its head
/// weights but draws other sentences (another R₀); the simulation and the
/// centralized run take the same number of steps; the summary's gap is
/// centralized less Fed-SB; a second run with everything done runs nothing
/// again; an unknown ORDER and a missing model are refused, naming them.
#[test]
fn the_pooled_draw_script_runs_on_a_tiny_model() -> anyhow::Result<()> {
    let task = Task::new()?;
    let dir = task.path();
    let data = task.script_data()?;
    let run_script = |order: &str| -> anyhow::Result<Output> {
        let mut c = task.script("fed_sb_pooled_draw.sh", &dir.join(order));
        c.arg(order)
            .env("DATA", &data)
            .env("SEEDS", "0 1")
            .env("INIT_SAMPLES", "16")
            .env("LABELS", LABELS.join(","));
        run(c)
    };
    let original = std::fs::read_to_string(data.join("train.tsv"))?;
    let rows: Vec<&str> = original.lines().collect();
    let half = (rows.len() - 1) / 2;
    let mut heads = Vec::new();
    let mut rs = Vec::new();
    for order in ["as-is", "reversed", "rotated"] {
        let out = run_script(order)?;
        check_success(&format!("scripts/fed_sb_pooled_draw.sh {order}"), &out)?;
        let out_dir = dir.join(order);
        let ordered = std::fs::read_to_string(out_dir.join(format!("train-{order}.tsv")))?;
        let ordered: Vec<&str> = ordered.lines().collect();
        let want: Vec<&str> = match order {
            "as-is" => rows.clone(),
            "reversed" => std::iter::once(rows[0])
                .chain(rows[1..].iter().rev().copied())
                .collect(),
            _ => std::iter::once(rows[0])
                .chain(rows[1 + half..].iter().copied())
                .chain(rows[1..1 + half].iter().copied())
                .collect(),
        };
        assert_eq!(ordered, want, "train-{order}.tsv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        for seed in [0, 1] {
            let sim = json_file(&out_dir.join(format!("sim-s{seed}.jsonl")))?;
            let rounds: Vec<u64> = sim.iter().filter_map(|r| r["round"].as_u64()).collect();
            assert_eq!(rounds, [0, 1, 2], "{order}, seed {seed}");
            let train = json_file(&out_dir.join(format!("train-s{seed}.jsonl")))?;
            let last = train.last().context("no centralized result")?;
            // 2 clients × 2 rounds × 2 local steps.
            assert_eq!(last["steps"], 8, "{order}, seed {seed}: {last}");
            let central = last["eval_accuracy"].as_f64().context("eval_accuracy")?;
            let fed = sim[2]["eval_accuracy"].as_f64().context("eval_accuracy")?;
            let row = stdout
                .lines()
                .find(|l| l.split_whitespace().next() == Some(&seed.to_string()))
                .with_context(|| format!("no summary row for seed {seed}:\n{stdout}"))?;
            let gap: f64 = row
                .split_whitespace()
                .last()
                .context("gap")?
                .parse()
                .with_context(|| format!("the gap in {row:?}"))?;
            assert!(
                (gap - 100.0 * (central - fed)).abs() < 0.006,
                "{order}, seed {seed}: {row:?} against centralized {central}, Fed-SB {fed}"
            );
            let init = tensors_of(&out_dir.join(format!("init-s{seed}.safetensors")))?;
            heads.push(init["classifier.weight"].clone());
            rs.push(
                init.iter()
                    .filter(|(name, _)| name.ends_with(".lora_R"))
                    .flat_map(|(_, v)| v.iter().copied())
                    .collect::<Vec<f32>>(),
            );
        }
        assert!(stdout.contains("mean gap"), "{stdout}");
    }
    // Per seed, the same head weights from every order, and other sentences
    // (another R₀) from each.
    for seed in 0..2 {
        let (first, second, third) = (seed, seed + 2, seed + 4);
        assert_eq!(heads[first], heads[second], "seed {seed}");
        assert_eq!(heads[first], heads[third], "seed {seed}");
        assert!(!rs[first].is_empty());
        assert_ne!(
            rs[first], rs[second],
            "seed {seed}: reversed drew the same R₀"
        );
        assert_ne!(
            rs[first], rs[third],
            "seed {seed}: rotated drew the same R₀"
        );
        assert_ne!(rs[second], rs[third], "seed {seed}");
    }
    assert_ne!(heads[0], heads[1], "the seed sets the head");

    // Everything is done: a second run only prints the summary.
    let sim_file = dir.join("as-is/sim-s0.jsonl");
    let before = std::fs::metadata(&sim_file)?.modified()?;
    let again = run_script("as-is")?;
    check_success("scripts/fed_sb_pooled_draw.sh as-is, again", &again)?;
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!stderr.contains("== seed"), "it ran again:\n{stderr}");
    assert_eq!(std::fs::metadata(&sim_file)?.modified()?, before);
    assert!(String::from_utf8_lossy(&again.stdout).contains("mean gap"));

    let bad = run_script("sideways")?;
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("not sideways"), "{stderr}");

    let no_model = dir.join("no-model");
    let mut c = task.script("fed_sb_pooled_draw.sh", &dir.join("no-model-run"));
    c.arg("as-is").env("DATA", &data).env("MODEL", &no_model);
    let missing = run(c)?;
    assert_eq!(missing.status.code(), Some(2), "{missing:?}");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    let want = format!("missing {}", no_model.join("config.json").display());
    assert!(stderr.contains(&want), "{stderr}");
    assert!(
        !dir.join("no-model-run").exists(),
        "it wrote before checking"
    );
    Ok(())
}

/// The WebSocket run's task: the simulation's settings; `task` holds the `[task]` settings that
/// `shards.json` lists besides the fixed ones here (`lr_decay`, the head's
/// learning rate, the server's step).
fn task_toml(rounds: u64, task: &serde_json::Value) -> anyhow::Result<String> {
    let key = |k: &str| -> anyhow::Result<f64> {
        task[k]
            .as_f64()
            .with_context(|| format!("shards.json: task.{k} in {task}"))
    };
    let (lr_decay, server_lr, server_momentum, head_lr) = (
        key("lr_decay")?,
        key("server_learning_rate")?,
        key("server_momentum")?,
        key("head_learning_rate")?,
    );
    let warmup = task["lr_warmup_rounds"]
        .as_u64()
        .with_context(|| format!("shards.json: task.lr_warmup_rounds in {task}"))?;
    // The operator's adapter file, or the federated initialization the
    // simulator ran (`--federated-init`) with the settings it lists.
    let adapter = match task["federated_init_samples"].as_u64() {
        None => r#"file = "adapter.safetensors""#.to_owned(),
        Some(n) => format!(
            "init = \"federated\"\ninit_samples = {n}\ninit_learning_rate = {}\n\
             init_seed = {}\ncentre_head = {}",
            key("init_learning_rate")?,
            task["init_seed"].as_u64().context("task.init_seed")?,
            task["centre_head"].as_bool().context("task.centre_head")?
        ),
    };
    Ok(format!(
        r#"[task]
id = "sim-vs-ws"
rounds = {rounds}
min_participants = {CLIENTS}
max_participants = {CLIENTS}
round_deadline_secs = 600
labels = ["{}", "{}"]
local_steps = {LOCAL_STEPS}
batch_size = {BATCH}
learning_rate = 0.01
head_learning_rate = {head_lr}
lr_decay = {lr_decay}
lr_warmup_rounds = {warmup}
server_learning_rate = {server_lr}
server_momentum = {server_momentum}
max_seq_len = 16
[model]
id = "tiny-random-bert"
dir = "model"
[adapter]
rank = {RANK}
{adapter}
[eval]
file = "eval.tsv"
batch_size = {BATCH}
[server]
ping_interval_secs = 1
idle_timeout_secs = 60
"#,
        LABELS[0], LABELS[1]
    ))
}

/// Largest |a − b| / max(|b|, 1e-3) and the number of values that differ.
fn compare(sim: &AdapterState, ws: &AdapterState) -> (f64, usize) {
    let (a, b) = (flat(sim), flat(ws));
    assert_eq!(a.len(), b.len());
    let rel = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs() / f64::from(y).abs().max(1e-3))
        .fold(0.0, f64::max);
    let differ = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    (rel, differ)
}

/// The global state the simulator wrote for round `n` into `dir`
/// (`--write-globals`).
fn written_global(dir: &Path, n: u64) -> anyhow::Result<AdapterState> {
    Ok(decode_global(&std::fs::read(dir.join(format!("round-{n}.bin")))?)?.3)
}

/// The `shards.json` of a task that `sim_against_websockets` ran.
fn shards_manifest(task: &Task) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        task.path().join("shards").join("shards.json"),
    )?)?)
}

/// The simulation of `WS_RUN_FLAGS` alone for `rounds` rounds (what a
/// test's flag is compared against), its globals written to
/// `globals-plain`. Returns that directory and the run's output.
fn plain_run(task: &Task, rounds: u64, what: &str) -> anyhow::Result<(PathBuf, Output)> {
    let plain = task.path().join("globals-plain");
    let mut flags = WS_RUN_FLAGS.to_vec();
    flags.extend(["--write-globals", plain.to_str().context("path")?]);
    let out = run(task.sim(rounds, &flags))?;
    check_success(&format!("fedsb sim, {what}"), &out)?;
    Ok((plain, out))
}

/// How far round 1 moved the head from round 0 in the globals in `dir`:
/// the largest change of a head weight.
fn head_move(dir: &Path) -> anyhow::Result<f32> {
    let (s0, s1) = (written_global(dir, 0)?, written_global(dir, 1)?);
    Ok(s0
        .head_weight
        .data
        .iter()
        .zip(&s1.head_weight.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sim_equals_the_same_run_over_websockets() -> anyhow::Result<()> {
    sim_against_websockets(&[]).await?;
    Ok(())
}

/// `--centre-head`: `fedsb init --centre-head` writes the head the
/// simulator centres (round 0 agrees), and the centred run over WebSockets
/// equals the simulation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_centred_head_equals_the_same_run_over_websockets() -> anyhow::Result<()> {
    let (task, globals, _) = sim_against_websockets(&["--centre-head"]).await?;
    // The bias was centred: round 0's differs from the uncentred one.
    let (plain, _) = plain_run(&task, 1, "uncentred")?;
    let (centred, uncentred) = (written_global(&globals, 0)?, written_global(&plain, 0)?);
    assert_eq!(centred.r, uncentred.r);
    assert_eq!(centred.head_weight, uncentred.head_weight);
    assert_ne!(centred.head_bias, uncentred.head_bias);
    Ok(())
}

/// `--federated-init 5 --centre-head`: each client's own first 5 examples
/// (in the order of its batch seed) give the initialization's gradients and
/// the head's centring, as a task with `[adapter] init = "federated"` and
/// `centre_head = true` gets them from `fedsb join`. Round 0 and every round
/// after equal the run over WebSockets (and round 0's participants, samples
/// and bytes the aggregator's), and the initial model is not the pooled
/// initialization's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_initialization_equals_the_same_run_over_websockets() -> anyhow::Result<()> {
    let (task, globals, rounds) =
        sim_against_websockets(&["--federated-init", "5", "--centre-head"]).await?;
    let round0 = &rounds[0];
    assert_eq!(round0["participants"], CLIENTS, "{round0}");
    assert_eq!(round0["samples"], 5 * CLIENTS, "{round0}");
    // Per client at least its gradients, 4 bytes per weight of every
    // adapted linear (every layer of the tiny model, 6 linears each).
    let config = tiny_config();
    let (h, i) = (config.hidden_size as u64, config.intermediate_size as u64);
    let weights = config.num_hidden_layers as u64 * (4 * h * h + 2 * h * i);
    let up = round0["bytes_up"].as_u64().context("bytes_up")?;
    assert!(
        up > CLIENTS as u64 * 4 * weights,
        "{up} bytes up for {weights} weights"
    );
    assert!(round0["bytes_down"].as_u64().context("bytes_down")? > 0);
    let (pooled, _) = plain_run(&task, 1, "pooled initialization")?;
    let (fed, pooled) = (written_global(&globals, 0)?, written_global(&pooled, 0)?);
    assert_ne!(fed.r, pooled.r, "the federated R₀ is the pooled one");
    Ok(())
}

/// `--keep-moments`: every client carries its AdamW moments into its next
/// round. Round 1 equals the run without it (nothing is carried yet), round
/// 2 differs, and `fedsb join --keep-moments` (the flag `--write-shards`
/// lists for the joiners) over WebSockets gives the same global states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_moments_change_round_two_and_equal_the_run_over_websockets() -> anyhow::Result<()> {
    let (task, kept, _) = sim_against_websockets(&["--keep-moments"]).await?;
    let manifest = shards_manifest(&task)?;
    for c in manifest["clients"].as_array().context("clients")? {
        assert!(
            c["join_args"]
                .as_array()
                .context("join_args")?
                .iter()
                .any(|a| a == "--keep-moments"),
            "{c}"
        );
    }
    round_one_equal_round_two_differs(&task, &kept, "--keep-moments")?;
    Ok(())
}

/// `--lr-decay 0.5`: round 2 trains at half the rate of round 1. Round 1
/// equals the run at a constant rate, round 2 differs, and the aggregator
/// of a task with `lr_decay = 0.5` (the value `shards.json` lists) announces
/// the same rates in its `RoundOpen`s, so `fedsb join` over WebSockets gives
/// the same global states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lr_decay_changes_round_two_and_equals_the_run_over_websockets() -> anyhow::Result<()> {
    let (task, decayed, rounds) = sim_against_websockets(&["--lr-decay", "0.5"]).await?;
    let rates: Vec<&serde_json::Value> = rounds.iter().map(|l| &l["learning_rate"]).collect();
    assert_eq!(
        rates,
        [&serde_json::Value::Null, &0.01.into(), &0.005.into()]
    );
    let manifest = shards_manifest(&task)?;
    assert_eq!(manifest["task"]["lr_decay"], 0.5, "{manifest}");
    round_one_equal_round_two_differs(&task, &decayed, "--lr-decay 0.5")?;
    Ok(())
}

/// `--lr-warmup-rounds 1`: round 1 trains at half the rate, round 2 at the
/// full rate. Round 1's global model differs from the run without a
/// warm-up, and the aggregator of a task with `lr_warmup_rounds = 1` (the
/// value `shards.json` lists) announces the same rates in its `RoundOpen`s,
/// so `fedsb join` over WebSockets gives the same global states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_lr_warmup_changes_round_one_and_equals_the_run_over_websockets() -> anyhow::Result<()> {
    let (task, warm, rounds) = sim_against_websockets(&["--lr-warmup-rounds", "1"]).await?;
    let rates: Vec<&serde_json::Value> = rounds.iter().map(|l| &l["learning_rate"]).collect();
    assert_eq!(
        rates,
        [&serde_json::Value::Null, &0.005.into(), &0.01.into()]
    );
    let manifest = shards_manifest(&task)?;
    assert_eq!(manifest["task"]["lr_warmup_rounds"], 1, "{manifest}");
    let (plain, _) = plain_run(&task, 1, "no warm-up")?;
    assert_eq!(
        flat(&written_global(&warm, 0)?),
        flat(&written_global(&plain, 0)?),
        "round 0"
    );
    // Fresh AdamW steps move each head weight by about the rate, so half
    // the rate moves the head about half as far.
    let (half, full) = (head_move(&warm)?, head_move(&plain)?);
    eprintln!("round 1 moved the head by up to {half:e} with the warm-up, {full:e} without");
    assert!(
        half > 0.0 && half <= 1.05 * LOCAL_STEPS as f32 * 0.005,
        "the head moved by {half:e}"
    );
    assert!(full > 1.5 * half, "{full:e} vs {half:e}");
    Ok(())
}

/// `--head-lr 0.0025`: the head trains at a quarter of the clients' rate.
/// Round 1 differs from the run at one rate: the head moves much less from
/// round 0, the `R`s differ too (every step after the first sees another
/// head). An aggregator with `head_learning_rate = 0.0025` (the value
/// `shards.json` lists) announces it in `TaskInfo`, so `fedsb join` over
/// WebSockets gives the same global states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_learning_rate_changes_round_one_and_equals_the_run_over_websockets(
) -> anyhow::Result<()> {
    let (task, slow_head, rounds) = sim_against_websockets(&["--head-lr", "0.0025"]).await?;
    let manifest = shards_manifest(&task)?;
    // An f32 written as JSON: 0.0025 once read back as an f32.
    let head_lr = manifest["task"]["head_learning_rate"].as_f64();
    assert_eq!(head_lr.map(|h| h as f32), Some(0.0025), "{manifest}");
    // The announced body rate is unchanged.
    assert_eq!(rounds[1]["learning_rate"], 0.01);
    let (plain, _) = plain_run(&task, 1, "one rate")?;
    assert_eq!(
        flat(&written_global(&slow_head, 0)?),
        flat(&written_global(&plain, 0)?),
        "round 0"
    );
    let (slow, one_rate) = (head_move(&slow_head)?, head_move(&plain)?);
    eprintln!("round 1 moved the head by up to {slow:e} at --head-lr 0.0025, {one_rate:e} at --lr");
    // LOCAL_STEPS fresh AdamW steps move a weight by at most about
    // LOCAL_STEPS × its rate.
    assert!(
        slow > 0.0 && slow <= 1.05 * LOCAL_STEPS as f32 * 0.0025,
        "the head moved by {slow:e}"
    );
    assert!(one_rate > 2.0 * slow, "{one_rate:e} vs {slow:e}");
    let (r_slow, r_plain) = (
        written_global(&slow_head, 1)?.r,
        written_global(&plain, 1)?.r,
    );
    assert_ne!(r_slow, r_plain, "the R of round 1 did not change");
    Ok(())
}

/// `--server-lr 0.5 --server-momentum 0.5` (FedAvgM): round 1 already
/// differs from the plain mean (η), round 2 adds half of round 1's move, and
/// an aggregator with `server_learning_rate = 0.5` and `server_momentum =
/// 0.5` (the values `shards.json` lists) commits the same global states from
/// the same `fedsb join` updates. Each round of the simulation is checked
/// against the formula, from the clients' mean, which the plain run (η = 1,
/// β = 0) gives when it starts from the same global model: round 1 of both
/// starts from round 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_step_with_momentum_equals_the_run_over_websockets() -> anyhow::Result<()> {
    let (task, stepped, _) =
        sim_against_websockets(&["--server-lr", "0.5", "--server-momentum", "0.5"]).await?;
    let manifest = shards_manifest(&task)?;
    assert_eq!(manifest["task"]["server_learning_rate"], 0.5, "{manifest}");
    assert_eq!(manifest["task"]["server_momentum"], 0.5, "{manifest}");
    let (plain, _) = plain_run(&task, 1, "plain mean")?;
    let global =
        |dir: &Path, n: u64| -> anyhow::Result<Vec<f32>> { Ok(flat(&written_global(dir, n)?)) };
    let x0 = global(&stepped, 0)?;
    assert_eq!(x0, global(&plain, 0)?, "round 0");
    // Round 1: x1 = x0 + 0.5 (mean1 − x0), mean1 being the plain run's round 1.
    let mean1 = global(&plain, 1)?;
    let x1 = global(&stepped, 1)?;
    let mut worst = 0f64;
    for i in 0..x0.len() {
        let (p, m) = (f64::from(x0[i]), f64::from(mean1[i]));
        let want = p + 0.5 * (m - p);
        worst = worst.max((f64::from(x1[i]) - want).abs() / want.abs().max(1e-3));
    }
    eprintln!("round 1 against x0 + 0.5 (mean1 − x0): {worst:e} relative");
    // The clients' mean is rounded to f32 in the plain run only.
    assert!(
        worst <= 1e-6,
        "round 1 is not half way to the mean: {worst:e}"
    );
    assert_ne!(x1, mean1, "η = 0.5 did not change round 1");
    // Round 2 moves from x1 and adds half of round 1's move: it is not the
    // step without momentum. (Its mean is of updates trained from x1, which
    // no plain run reproduces; the WebSocket run above checks it.)
    let x2 = global(&stepped, 2)?;
    assert_ne!(x2, x1);
    Ok(())
}

/// Runs [`sim_against_websockets`]'s simulation without the flag under test
/// and checks that the run with it (`globals`) has the same round 1 and a
/// different round 2.
fn round_one_equal_round_two_differs(
    task: &Task,
    globals: &Path,
    flag: &str,
) -> anyhow::Result<()> {
    let (plain_globals, out) = plain_run(task, 2, &format!("without {flag}"))?;
    let rates: Vec<serde_json::Value> = json_lines(&out)?
        .iter()
        .map(|l| l["learning_rate"].clone())
        .collect();
    assert_eq!(rates, [serde_json::Value::Null, 0.01.into(), 0.01.into()]);
    let global =
        |dir: &Path, n: u64| -> anyhow::Result<Vec<f32>> { Ok(flat(&written_global(dir, n)?)) };
    assert_eq!(global(globals, 1)?, global(&plain_globals, 1)?, "round 1");
    let (a, b) = (global(globals, 2)?, global(&plain_globals, 2)?);
    let max_diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    eprintln!("round 2: with and without {flag} differ by up to {max_diff:e}");
    assert!(
        max_diff > 1e-5,
        "round 2 is the same with and without {flag} ({max_diff:e})"
    );
    Ok(())
}

/// The split, seed and output of [`sim_against_websockets`]'s simulation.
const WS_RUN_FLAGS: [&str; 5] = ["--split", "dirichlet:1.0", "--seed", "0", "--json"];

/// A two-round simulation with `extra` flags, then the same run over
/// WebSockets: the aggregator and one `fedsb join` per shard with the flags
/// the simulator's `shards.json` lists. Both must give the same global state
/// of every round and the same evaluations. Returns the task, the
/// simulator's globals directory and its JSON lines.
async fn sim_against_websockets(
    extra: &[&str],
) -> anyhow::Result<(Task, PathBuf, Vec<serde_json::Value>)> {
    const ROUNDS: u64 = 2;
    let task = Task::new()?;
    let dir = task.path().to_owned();
    let federated = extra.contains(&"--federated-init");
    // The operator's adapter file; the simulator initializes by itself with
    // the same seed and settings, so round 0 checks that both agree (and
    // that `fedsb init --centre-head` centres as `fedsb sim --centre-head`).
    // With --federated-init the aggregator initializes from the joiners'
    // gradients instead, as the simulator's clients did.
    if !federated {
        let mut init = task.init(0.01, "adapter.safetensors");
        if extra.contains(&"--centre-head") {
            init.arg("--centre-head");
        }
        check_success("fedsb init", &run(init)?)?;
    }

    let shards = dir.join("shards");
    let globals = dir.join("globals");
    let mut flags = WS_RUN_FLAGS.to_vec();
    flags.extend([
        "--write-shards",
        shards.to_str().context("path")?,
        "--write-globals",
        globals.to_str().context("path")?,
    ]);
    flags.extend_from_slice(extra);
    let sim = task.sim(ROUNDS, &flags);
    let out = tokio::task::spawn_blocking(move || run(sim)).await??;
    check_success("fedsb sim", &out)?;
    let sim_rounds = json_lines(&out)?;
    check_rounds_after(&sim_rounds, ROUNDS, false, federated)?;

    // The same run over WebSockets: the aggregator, with the task settings
    // `shards.json` lists, and one `fedsb join` per shard, with the shard's
    // batch seed.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(shards.join("shards.json"))?)?;
    // The simulator's own initial model, written for the task's
    // `[adapter] file`: the same tensors as the operator's `fedsb init`.
    assert_eq!(manifest["task"]["adapter_file"], "init.safetensors");
    if !federated {
        let (ours, operators) = (
            std::fs::read(shards.join("init.safetensors"))?,
            std::fs::read(dir.join("adapter.safetensors"))?,
        );
        let (ours, operators) = (
            safetensors::SafeTensors::deserialize(&ours)?,
            safetensors::SafeTensors::deserialize(&operators)?,
        );
        let mut names = operators.names();
        names.sort();
        let mut our_names = ours.names();
        our_names.sort();
        assert_eq!(our_names, names);
        for name in names {
            assert_eq!(
                ours.tensor(name)?.data(),
                operators.tensor(name)?.data(),
                "tensor {name} of shards/init.safetensors and fedsb init's file"
            );
        }
    }
    std::fs::write(dir.join("task.toml"), task_toml(ROUNDS, &manifest["task"])?)?;
    let agg = Aggregator::start_in(&dir)?;
    let mut joins = Vec::new();
    for c in manifest["clients"].as_array().context("clients")? {
        let file = c["file"].as_str().context("file")?;
        // The listed flags after `--data FILE` (the batch seed, and
        // `--keep-moments` when the simulation kept them).
        let args: Vec<&str> = c["join_args"]
            .as_array()
            .context("join_args")?
            .iter()
            .map(|a| a.as_str().context("a join argument"))
            .collect::<anyhow::Result<_>>()?;
        assert_eq!(args[..2], ["--data", file]);
        let seed = c["batch_seed"].as_u64().context("batch_seed")?;
        assert_eq!(args[2..4], ["--seed", &seed.to_string()]);
        let child = spawn_join(&dir, &agg, shards.join(file), file, &args[2..])?;
        joins.push(child);
    }
    for child in joins {
        let out = wait_child(child, RUN_TIMEOUT).await?;
        check_success("fedsb join", &out)?;
    }

    let mut identical = true;
    for n in 0..=ROUNDS {
        let r = reqwest::get(agg.url(&format!("/api/rounds/{n}/global"))).await?;
        if !r.status().is_success() {
            bail!("GET /api/rounds/{n}/global: {}", r.status());
        }
        let ws_frame = r.bytes().await?;
        let sim_frame = std::fs::read(globals.join(format!("round-{n}.bin")))?;
        let (ws_round, ws_parts, ws_samples, ws_state) = decode_global(&ws_frame)?;
        let (sim_round, sim_parts, sim_samples, sim_state) = decode_global(&sim_frame)?;
        assert_eq!(ws_round, sim_round);
        assert_eq!(ws_parts, sim_parts, "round {n}: participants");
        assert_eq!(ws_samples, sim_samples, "round {n}: samples");
        let (rel, differ) = compare(&sim_state, &ws_state);
        eprintln!(
            "round {n}: max relative difference {rel:e}, {differ} of {} values differ in their bits",
            flat(&ws_state).len()
        );
        identical &= differ == 0 && ws_frame[..] == sim_frame[..];
        assert!(
            rel <= 1e-6,
            "round {n}: simulator and WebSocket run differ by {rel:e} (relative)"
        );
        if n > 0 {
            assert_ne!(flat(&sim_state), {
                let (_, _, _, s0) = decode_global(&std::fs::read(globals.join("round-0.bin"))?)?;
                flat(&s0)
            });
        }
    }
    eprintln!("simulator and WebSocket frames bit-identical: {identical}");

    // The aggregator evaluates every committed round on the same eval set
    // with the same batch size: the same numbers as the simulator's.
    let started = Instant::now();
    let listed = loop {
        let listed = agg.json("/api/rounds").await?;
        let rounds = listed.as_array().context("/api/rounds is not an array")?;
        if rounds.len() as u64 == ROUNDS + 1 && rounds.iter().all(|r| !r["eval"].is_null()) {
            break rounds.clone();
        }
        if started.elapsed() > RUN_TIMEOUT {
            bail!("the aggregator did not evaluate every round: {listed}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (ws, sim) in listed.iter().zip(&sim_rounds) {
        let n = sim["round"].as_u64().context("round")?;
        assert_eq!(ws["round"], n);
        let eval = &ws["eval"];
        assert_eq!(eval["samples"], 24, "round {n}: {eval}");
        let (ws_acc, sim_acc) = (
            eval["accuracy"].as_f64().context("accuracy")?,
            sim["eval_accuracy"].as_f64().context("eval_accuracy")?,
        );
        let (ws_loss, sim_loss) = (
            eval["loss"].as_f64().context("loss")?,
            sim["eval_loss"].as_f64().context("eval_loss")?,
        );
        eprintln!("round {n}: eval accuracy {sim_acc} / {ws_acc}, loss {sim_loss} / {ws_loss} (sim / aggregator)");
        // The rate the aggregator announced for the round: the simulator's.
        assert_eq!(ws["learning_rate"], sim["learning_rate"], "round {n}");
        // What the aggregator counted: the simulator's participants,
        // samples and upload (round 0's: the federated initialization's).
        assert_eq!(ws["participants"], sim["participants"], "round {n}");
        assert_eq!(ws["total_samples"], sim["samples"], "round {n}");
        assert_eq!(ws["bytes_in"], sim["bytes_up"], "round {n}");
        assert_eq!(sim_acc, ws_acc, "round {n}: eval accuracy");
        assert!(
            (sim_loss - ws_loss).abs() <= 1e-6 * ws_loss.abs(),
            "round {n}: eval loss {sim_loss} (sim) vs {ws_loss} (aggregator)"
        );
    }
    Ok((task, globals, sim_rounds))
}
