//! `fedsb train` on a tiny random BERT (GPU: lavapipe here): `--init-lr`
//! initializes as `fedsb init --lr η` does while AdamW runs at `--lr`;
//! `--head-lr` trains the head at its own rate; `--init FILE` trains from
//! an adapter file's model; `--checkpoint-every` writes the model at its
//! steps and `fedsb average` averages such files; `fedsb init` and `fedsb
//! train` record their base model; and `fedsb init`'s report of its two
//! phases and its refusal of a rank wider than a layer.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::Context;
use fedsb_e2e::process::{check_success, last_json_line};
use fedsb_e2e::tiny_model::{labelled_tsv, write_tiny_model};
use fedsb_e2e::*;

const RANK: &str = "4";
const BATCH: &str = "8";
const INIT_SAMPLES: &str = "16";

fn fedsb(dir: &Path, command: &str, extra: &[&str]) -> anyhow::Result<Output> {
    fedsb_seeded(dir, command, "0", extra)
}

/// [`fedsb`] with another `--seed` (the initialization's examples and head,
/// and the batch order).
fn fedsb_seeded(dir: &Path, command: &str, seed: &str, extra: &[&str]) -> anyhow::Result<Output> {
    Command::new(fedsb_bin())
        .arg(command)
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--train")
        .arg(dir.join("train.tsv"))
        .args(["--rank", RANK, "--batch", BATCH, "--seed", seed])
        .args(["--init-samples", INIT_SAMPLES])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("running fedsb {command}"))
}

/// Every `*.lora_R` of an adapter file, by name, and its metadata.
type Adapter = (Vec<(String, Vec<f32>)>, HashMap<String, String>);

fn lora_r(path: &Path) -> anyhow::Result<Adapter> {
    let rs = tensors_of(path)?
        .into_iter()
        .filter(|(name, _)| name.ends_with(".lora_R"))
        .collect();
    let bytes = std::fs::read(path)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    Ok((rs, header.metadata().clone().unwrap_or_default()))
}

/// Largest |a − b| / max(|b|, 1e-4) over every R.
fn worst_relative(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter().zip(vb)
        })
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs() / f64::from(y).abs().max(1e-4))
        .fold(0.0, f64::max)
}

/// A fresh directory with a tiny random BERT (`model/`), 48 labelled
/// training rows (`train.tsv`) and 16 evaluation rows (`eval.tsv`).
fn tiny_task() -> anyhow::Result<tempfile::TempDir> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_tiny_model(&dir.join("model"), 11)?;
    std::fs::write(dir.join("train.tsv"), labelled_tsv(48, 2, 0.5))?;
    std::fs::write(dir.join("eval.tsv"), labelled_tsv(16, 4, 0.5))?;
    Ok(tmp)
}

/// One `fedsb train` step at the negligible `--lr 1e-9` with `extra` flags,
/// on `dir`'s `train.tsv` and `eval.tsv`, writing the adapter file `name` in
/// `dir`. Returns its path and the JSON summary.
fn train_one_step(
    dir: &Path,
    name: &str,
    extra: &[&str],
) -> anyhow::Result<(std::path::PathBuf, serde_json::Value)> {
    let path = dir.join(name);
    let eval = dir.join("eval.tsv");
    let mut flags = vec![
        "--eval",
        eval.to_str().context("path")?,
        "--steps",
        "1",
        "--lr",
        "1e-9",
        "--json",
        "--output",
        path.to_str().context("path")?,
    ];
    flags.extend_from_slice(extra);
    let out = fedsb(dir, "train", &flags)?;
    check_success(&format!("fedsb train {extra:?}"), &out)?;
    let summary = last_json_line(&out)?;
    Ok((path, summary))
}

/// One AdamW step at a negligible `--lr` leaves R at R₀: with `--init-lr
/// 0.003` that is `fedsb init --lr 0.003`'s R₀; without it η is the tiny
/// `--lr` and R₀ is far smaller.
#[test]
fn init_lr_sets_the_initialization_apart_from_the_learning_rate() -> anyhow::Result<()> {
    let tmp = tiny_task()?;
    let dir = tmp.path();
    let init = dir.join("init.safetensors");
    let out = fedsb(
        dir,
        "init",
        &["--lr", "0.003", "--out", init.to_str().context("path")?],
    )?;
    check_success("fedsb init", &out)?;
    // The report splits the time into the GPU gradients and the CPU SVDs.
    let report = last_json_line(&out)?;
    let seconds = |key: &str| report[key].as_f64().context(format!("{key} in {report}"));
    let (all, gradients, svd) = (
        seconds("init_seconds")?,
        seconds("gradient_seconds")?,
        seconds("svd_seconds")?,
    );
    assert!(
        gradients > 0.0 && svd > 0.0 && gradients + svd <= all + 1e-6,
        "{report}"
    );

    let train = |name: &str, extra: &[&str]| -> anyhow::Result<(Adapter, serde_json::Value)> {
        let (path, summary) = train_one_step(dir, name, extra)?;
        Ok((lora_r(&path)?, summary))
    };
    let (r0, _) = lora_r(&init)?;
    let ((with_eta, meta), report) = train("init-lr.safetensors", &["--init-lr", "0.003"])?;
    assert_eq!(report["init_learning_rate"], 0.003, "{report}");
    assert_eq!(report["learning_rate"], 1e-9, "{report}");
    assert_eq!(
        meta.get("init_learning_rate").map(String::as_str),
        Some("0.003")
    );
    let rel = worst_relative(&with_eta, &r0);
    assert!(
        rel <= 1e-3,
        "R after one step at lr 1e-9 from --init-lr 0.003 differs from fedsb init --lr 0.003's R₀ by {rel:e}"
    );
    assert!(r0.iter().flat_map(|(_, v)| v).any(|&v| v.abs() > 1e-3));

    let ((without, _), report) = train("lr.safetensors", &[])?;
    assert_eq!(report["init_learning_rate"], 1e-9, "{report}");
    let largest = |rs: &[(String, Vec<f32>)]| {
        rs.iter()
            .flat_map(|(_, v)| v)
            .fold(0.0f32, |m, &v| m.max(v.abs()))
    };
    assert!(
        largest(&without) < largest(&r0) * 1e-3,
        "without --init-lr, η is --lr 1e-9: R₀ should be tiny, largest |R| {} against {}",
        largest(&without),
        largest(&r0)
    );

    let out = fedsb(
        dir,
        "train",
        &["--eval", "eval.tsv", "--init-lr=-1", "--steps", "1"],
    )?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--init-lr -1 must be positive"), "{stderr}");
    Ok(())
}

/// `--head-lr`: one AdamW step at a negligible `--lr` and `--head-lr 0.01`
/// moves every head weight with a gradient by about 0.01 (a fresh AdamW's
/// first step is ±lr) and leaves every R as the run without the flag does;
/// the report and the adapter file name the rate, and a bad one is refused.
#[test]
fn head_lr_trains_the_head_at_its_own_rate() -> anyhow::Result<()> {
    let tmp = tiny_task()?;
    let dir = tmp.path();
    type Run = (Vec<(String, Vec<f32>)>, Vec<f32>, serde_json::Value);
    // `head_lr`: the rate the adapter file's metadata must name.
    let train = |name: &str, extra: &[&str], head_lr: &str| -> anyhow::Result<Run> {
        let mut flags = vec!["--init-lr", "0.003"];
        flags.extend_from_slice(extra);
        let (path, summary) = train_one_step(dir, name, &flags)?;
        let tensors = tensors_of(&path)?;
        let head = tensors
            .iter()
            .find(|(n, _)| *n == "classifier.weight")
            .map(|(_, v)| v.clone())
            .context("classifier.weight")?;
        let (rs, meta) = lora_r(&path)?;
        assert_eq!(
            meta.get("head_learning_rate").map(String::as_str),
            Some(head_lr),
            "{meta:?}"
        );
        Ok((rs, head, summary))
    };
    let (r_plain, head_plain, report) = train("plain.safetensors", &[], "0.000000001")?;
    assert_eq!(report["head_learning_rate"], 1e-9, "{report}");
    let (r_fast, head_fast, report) =
        train("fast-head.safetensors", &["--head-lr", "0.01"], "0.01")?;
    assert_eq!(report["head_learning_rate"], 0.01, "{report}");
    assert_eq!(r_fast, r_plain, "the R trained at --lr must not change");
    let moves: Vec<f32> = head_fast
        .iter()
        .zip(&head_plain)
        .map(|(a, b)| (a - b).abs())
        .collect();
    let largest = moves.iter().fold(0f32, |m, &d| m.max(d));
    assert!(
        (0.0095..=0.0101).contains(&largest),
        "the head moved by up to {largest:e}, not about --head-lr 0.01"
    );
    assert!(
        moves.iter().filter(|&&d| d > 0.009).count() > moves.len() / 2,
        "{moves:?}"
    );

    let out = fedsb(
        dir,
        "train",
        &["--eval", "eval.tsv", "--head-lr", "0", "--steps", "1"],
    )?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--head-lr 0 must be positive"), "{stderr}");
    Ok(())
}

/// A rank above min(out, in) of some adapted linear (16 in the tiny model)
/// is refused with the module's name, and no adapter file is written.
#[test]
fn init_refuses_a_rank_wider_than_a_layer() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    write_tiny_model(&dir.join("model"), 11)?;
    std::fs::write(dir.join("train.tsv"), labelled_tsv(16, 2, 0.5))?;
    let init = dir.join("init.safetensors");
    let out = Command::new(fedsb_bin())
        .arg("init")
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--train")
        .arg(dir.join("train.tsv"))
        .args(["--rank", "17", "--out"])
        .arg(&init)
        .env("RUST_LOG", "warn")
        .output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rank 17 must be in 1..=16 for attention.self.query"),
        "{stderr}"
    );
    assert!(!init.exists(), "a refused init wrote {}", init.display());
    Ok(())
}

/// Arguments that would fail a finished run fail before it starts: an
/// `--output` in a missing directory, a `--max-seq-len` beyond the model's
/// positions, training data of one class; each names what is wrong and the
/// run writes nothing.
#[test]
fn train_refuses_what_would_fail_it_before_training() -> anyhow::Result<()> {
    let tmp = tiny_task()?;
    let dir = tmp.path();
    let eval = dir.join("eval.tsv");
    let eval = eval.to_str().context("path")?;
    let missing = dir.join("no-such-dir/out.safetensors");
    let cases: [(Vec<&str>, &str); 2] = [
        (
            vec!["--output", missing.to_str().context("path")?],
            "no-such-dir does not exist",
        ),
        (
            vec!["--max-seq-len", "100000"],
            "--max-seq-len 100000 is longer than the model's",
        ),
    ];
    for (flags, expected) in cases {
        let mut all = vec!["--eval", eval, "--steps", "1"];
        all.extend(flags);
        let out = fedsb(dir, "train", &all)?;
        assert!(!out.status.success(), "{all:?} succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{all:?}: {stderr}");
        // Refused before any GPU work: nothing about an adapter or a step.
        assert!(!stderr.contains("adapter:"), "{all:?}: {stderr}");
    }
    std::fs::write(
        dir.join("train.tsv"),
        "sentence\tlabel\na fine film\tpositive\nwell made\tpositive\n",
    )?;
    let out = fedsb(dir, "train", &["--eval", eval, "--steps", "1"])?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("every example has the label positive"),
        "{stderr}"
    );
    assert!(!missing.exists());
    Ok(())
}

/// `fedsb train --init FILE` on `dir`'s data (seed 0, batch 8), with
/// `extra` flags.
fn train_from(dir: &Path, file: &Path, extra: &[&str]) -> anyhow::Result<Output> {
    Command::new(fedsb_bin())
        .arg("train")
        .arg("--model")
        .arg(dir.join("model"))
        .arg("--train")
        .arg(dir.join("train.tsv"))
        .arg("--eval")
        .arg(dir.join("eval.tsv"))
        .arg("--init")
        .arg(file)
        .args(["--batch", BATCH, "--seed", "0", "--json"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .context("running fedsb train --init FILE")
}

/// Largest |a − b| over the tensors both files hold.
fn worst_absolute(a: &Path, b: &Path) -> anyhow::Result<f64> {
    let (a, b) = (tensors_of(a)?, tensors_of(b)?);
    anyhow::ensure!(
        a.keys().eq(b.keys()),
        "different tensors: {:?} and {:?}",
        a.keys(),
        b.keys()
    );
    Ok(a.iter()
        .flat_map(|(name, va)| va.iter().zip(&b[name]))
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
        .fold(0.0, f64::max))
}

/// `--init FILE` trains from an adapter file's A, B, R and head instead
/// of a LoRA-SB initialization:
/// - from `fedsb init --lr 0.003`'s file, three steps at `--lr 0.01` end
///   where `fedsb train --init-lr 0.003` ends after the same steps (it makes
///   the same initialization itself), and far from where they end from
///   another initialization;
/// - one step at a negligible rate leaves the file's model, and the final
///   evaluation is `fedsb eval`'s of the file;
/// - a `--rank` other than the file's, the initialization's own flags, a
///   file without a head and training data with other classes are refused.
#[test]
fn init_file_trains_from_an_adapter_files_model() -> anyhow::Result<()> {
    let tmp = tiny_task()?;
    let dir = tmp.path();
    let path = |name: &str| dir.join(name);
    let s = |p: &Path| p.to_str().context("path").map(str::to_owned);
    let init = path("init.safetensors");
    check_success(
        "fedsb init",
        &fedsb(dir, "init", &["--lr", "0.003", "--out", &s(&init)?])?,
    )?;
    let other = path("other.safetensors");
    check_success(
        "fedsb init --seed 1",
        &fedsb_seeded(dir, "init", "1", &["--lr", "0.003", "--out", &s(&other)?])?,
    )?;

    // Three steps from the file and three from the run's own initialization.
    let from_file = path("from-file.safetensors");
    let out = train_from(
        dir,
        &init,
        &["--steps", "3", "--lr", "0.01", "--output", &s(&from_file)?],
    )?;
    check_success("fedsb train --init FILE", &out)?;
    let report = last_json_line(&out)?;
    assert_eq!(report["init_file"], s(&init)?, "{report}");
    assert_eq!(report["rank"], 4, "{report}");
    // The run's record: its seed and the file's length (the tiny model's 32
    // positions, what fedsb init took without --max-seq-len).
    assert_eq!(report["seed"], 0, "{report}");
    assert_eq!(report["max_seq_len"], 32, "{report}");
    // Nothing of the initialization ran: no samples, η or centring.
    for key in ["init_samples", "init_learning_rate", "centre_head"] {
        assert!(report[key].is_null(), "{key} in {report}");
    }
    let own = path("own-init.safetensors");
    let eval = path("eval.tsv");
    check_success(
        "fedsb train --init-lr 0.003",
        &fedsb(
            dir,
            "train",
            &[
                "--eval",
                &s(&eval)?,
                "--init-lr",
                "0.003",
                "--lr",
                "0.01",
                "--steps",
                "3",
                "--output",
                &s(&own)?,
            ],
        )?,
    )?;
    let from_other = path("from-other.safetensors");
    check_success(
        "fedsb train --init FILE other",
        &train_from(
            dir,
            &other,
            &["--steps", "3", "--lr", "0.01", "--output", &s(&from_other)?],
        )?,
    )?;
    let same = worst_absolute(&from_file, &own)?;
    let apart = worst_absolute(&from_other, &own)?;
    assert!(
        same <= 1e-5 && apart > 1e-2,
        "after 3 steps from fedsb init's file the model is {same:e} from fedsb train's own \
         initialization's, and {apart:e} from another file's"
    );
    let (_, meta) = lora_r(&from_file)?;
    assert_eq!(meta.get("init_file"), Some(&s(&init)?), "{meta:?}");
    assert_eq!(meta.get("rank").map(String::as_str), Some("4"));

    // One step at a negligible rate: the file's model, and its evaluation.
    let still = path("still.safetensors");
    let out = train_from(
        dir,
        &init,
        &["--steps", "1", "--lr", "1e-9", "--output", &s(&still)?],
    )?;
    check_success("fedsb train --init FILE --lr 1e-9", &out)?;
    let trained = last_json_line(&out)?;
    let moved = worst_absolute(&still, &init)?;
    assert!(
        moved <= 1e-6,
        "one step at lr 1e-9 moved the model by {moved:e}"
    );
    let out = Command::new(fedsb_bin())
        .arg("eval")
        .arg("--model")
        .arg(path("model"))
        .arg("--adapter-file")
        .arg(&init)
        .arg("--eval")
        .arg(path("eval.tsv"))
        .env("RUST_LOG", "warn")
        .output()?;
    check_success("fedsb eval", &out)?;
    let evaluated = last_json_line(&out)?;
    let (a, b) = (
        trained["eval_loss"].as_f64().context("eval_loss")?,
        evaluated["loss"].as_f64().context("loss")?,
    );
    assert!(
        (a - b).abs() <= 1e-5,
        "train's eval loss {a} against eval's {b}"
    );
    assert_eq!(trained["eval_accuracy"], evaluated["accuracy"]);

    // Refusals, each naming what was wrong.
    let refused = |extra: &[&str], file: &Path, wanted: &str| -> anyhow::Result<()> {
        let out = train_from(dir, file, extra)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(wanted), "{extra:?}: {stderr}");
        Ok(())
    };
    refused(
        &["--rank", "8"],
        &init,
        "--rank 8 does not match the rank 4 of",
    )?;
    refused(&["--init-samples", "16"], &init, "cannot be used with")?;
    refused(&["--centre-head"], &init, "cannot be used with")?;
    let headless = path("headless.safetensors");
    rewrite_adapter_file(
        &init,
        &headless,
        |name| !name.starts_with("classifier."),
        |_| {},
    )?;
    refused(&[], &headless, "has no classifier head")?;
    std::fs::write(
        path("train.tsv"),
        "sentence\tlabel\ngood .\tpositive\nbad .\tneutral\n",
    )?;
    refused(&[], &init, "\"neutral\"")?;
    Ok(())
}

/// `fedsb init` and `fedsb train --output` (and its checkpoints) record
/// their base model: `base_model_sha256` is the SHA-256 of the model's
/// model.safetensors (init's report names it too); the trained files also
/// record the `max_seq_len` they trained at. `fedsb train --init`
/// with a file made on another model of the same shapes is refused, naming
/// both files and hashes, and `fedsb average` refuses files recorded for
/// different models.
#[test]
fn init_and_train_record_their_base_model() -> anyhow::Result<()> {
    let tmp = tiny_task()?;
    let dir = tmp.path();
    let path = |name: &str| dir.join(name);
    let s = |p: &Path| p.to_str().context("path").map(str::to_owned);
    let m1 = sha256sum(&path("model/model.safetensors"))?;
    let base_model = |file: &Path| -> anyhow::Result<Option<String>> {
        Ok(lora_r(file)?.1.get("base_model_sha256").cloned())
    };

    let init = path("init.safetensors");
    let out = fedsb(dir, "init", &["--out", &s(&init)?])?;
    check_success("fedsb init", &out)?;
    assert_eq!(last_json_line(&out)?["base_model_sha256"], m1.as_str());
    assert_eq!(base_model(&init)?, Some(m1.clone()), "fedsb init's file");
    assert_eq!(
        lora_r(&init)?.1.get("max_seq_len").map(String::as_str),
        Some("32"),
        "fedsb init's file records the length its gradients ran at"
    );
    let run = path("run.safetensors");
    train_steps(
        dir,
        "2",
        &["--checkpoint-every", "1", "--output", &s(&run)?],
    )?;
    for file in [&run, &path("run.step-1.safetensors")] {
        assert_eq!(base_model(file)?, Some(m1.clone()), "{}", file.display());
        // And the sequence length it trained at: the tiny model's 32
        // positions, below the default of 128.
        assert_eq!(
            lora_r(file)?.1.get("max_seq_len").map(String::as_str),
            Some("32"),
            "{}",
            file.display()
        );
    }

    // Another random checkpoint of the same architecture.
    write_tiny_model(&path("model2"), 12)?;
    let m2 = sha256sum(&path("model2/model.safetensors"))?;
    assert_ne!(m1, m2);
    let out = Command::new(fedsb_bin())
        .arg("train")
        .arg("--model")
        .arg(path("model2"))
        .arg("--train")
        .arg(path("train.tsv"))
        .arg("--eval")
        .arg(path("eval.tsv"))
        .arg("--init")
        .arg(&init)
        .args(["--batch", BATCH, "--steps", "1"])
        .env("RUST_LOG", "warn")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "--init with another model was accepted"
    );
    for part in [
        format!(
            "{} was made for a base model whose model.safetensors has SHA-256 {}",
            init.display(),
            &m1[..12]
        ),
        format!(
            "but {} has {}",
            path("model2/model.safetensors").display(),
            &m2[..12]
        ),
    ] {
        assert!(stderr.contains(&part), "{part:?} not in:\n{stderr}");
    }

    let elsewhere = path("elsewhere.safetensors");
    rewrite_adapter_file(
        &run,
        &elsewhere,
        |_| true,
        |metadata| {
            metadata
                .get_or_insert_with(HashMap::new)
                .insert("base_model_sha256".into(), m2.clone());
        },
    )?;
    let out = average(&[&run, &elsewhere], &path("mean.safetensors"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "files of two base models were averaged"
    );
    assert!(
        stderr.contains(&format!(
            "{} was made for the base model with SHA-256 {m2} but {} for the one with {m1}",
            elsewhere.display(),
            run.display()
        )),
        "{stderr}"
    );
    Ok(())
}

/// `fedsb train --init FILE` trains at the sequence length the file
/// records unless `--max-seq-len` says otherwise, and its output records
/// the length it trained at: a run from an exported round goes on at the
/// task's length without the flag.
#[test]
fn training_from_a_file_keeps_its_sequence_length() -> anyhow::Result<()> {
    let tmp = tiny_task()?;
    let dir = tmp.path();
    let path = |name: &str| dir.join(name);
    let s = |p: &Path| p.to_str().context("path").map(str::to_owned);
    let recorded = |file: &Path| -> anyhow::Result<Option<String>> {
        Ok(lora_r(file)?.1.get("max_seq_len").cloned())
    };
    // The tiny model has 32 positions: 32 would be the default.
    let init = path("init-12.safetensors");
    let out = fedsb(dir, "init", &["--max-seq-len", "12", "--out", &s(&init)?])?;
    check_success("fedsb init --max-seq-len 12", &out)?;
    assert_eq!(recorded(&init)?.as_deref(), Some("12"));
    for (extra, want) in [(None, "12"), (Some("20"), "20")] {
        let output = path(&format!("from-init-{want}.safetensors"));
        let mut flags = vec!["--steps", "1", "--lr", "0.01", "--output"];
        let output_path = s(&output)?;
        flags.push(&output_path);
        if let Some(n) = extra {
            flags.extend(["--max-seq-len", n]);
        }
        let out = train_from(dir, &init, &flags)?;
        check_success(&format!("fedsb train --init {flags:?}"), &out)?;
        assert_eq!(recorded(&output)?.as_deref(), Some(want), "{flags:?}");
    }
    Ok(())
}

/// Copies the adapter file `from` to `to`, keeping only the tensors whose
/// names pass `keep` and letting `edit` change the metadata on the way.
fn rewrite_adapter_file(
    from: &Path,
    to: &Path,
    keep: impl Fn(&str) -> bool,
    edit: impl FnOnce(&mut Option<HashMap<String, String>>),
) -> anyhow::Result<()> {
    let bytes = std::fs::read(from)?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> = shaped_tensors(&bytes)?
        .into_iter()
        .filter(|(name, _)| keep(name))
        .map(|(name, (shape, data))| {
            let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name, shape, bytes)
        })
        .collect();
    let views = raw
        .iter()
        .map(|(name, shape, data)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut metadata = header.metadata().clone();
    edit(&mut metadata);
    std::fs::write(to, safetensors::serialize(views, metadata)?)?;
    Ok(())
}

/// `fedsb train` at `--lr 0.01` for `steps` steps with `extra` flags, on
/// `dir`'s `train.tsv` and `eval.tsv`; fails unless it succeeds.
fn train_steps(dir: &Path, steps: &str, extra: &[&str]) -> anyhow::Result<Output> {
    let eval = dir.join("eval.tsv");
    let mut flags = vec!["--eval", eval.to_str().context("path")?];
    flags.extend(["--steps", steps, "--lr", "0.01", "--json"]);
    flags.extend_from_slice(extra);
    let out = fedsb(dir, "train", &flags)?;
    check_success(&format!("fedsb train --steps {steps} {extra:?}"), &out)?;
    Ok(out)
}

/// `fedsb average` on `files`, writing `out`.
fn average(files: &[&Path], out: &Path) -> anyhow::Result<Output> {
    Command::new(fedsb_bin())
        .arg("average")
        .args(files)
        .arg("--out")
        .arg(out)
        .env("RUST_LOG", "warn")
        .output()
        .context("running fedsb average")
}

/// `--checkpoint-every 1` in a 3-step run writes the model after steps 1
/// and 2 next to `--output` (the last step's model is `--output` itself),
/// each the model a run of that many steps ends with. `fedsb average` of
/// the three is their mean: every R and the head averaged in f64, A and B
/// copied, the metadata all three agree on kept and the files listed; one
/// file averages to itself; files of another initialization (other A and
/// B) or with other classes are refused, and so are bad flags.
#[test]
fn checkpoints_are_the_run_at_their_step_and_average_into_their_mean() -> anyhow::Result<()> {
    let tmp = tiny_task()?;
    let dir = tmp.path();
    let path = |name: &str| dir.join(name);
    let s = |p: &Path| p.to_str().context("path").map(str::to_owned);
    let run = path("run.safetensors");
    let out = train_steps(
        dir,
        "3",
        &["--checkpoint-every", "1", "--output", &s(&run)?],
    )?;
    let (step1, step2) = (
        path("run.step-1.safetensors"),
        path("run.step-2.safetensors"),
    );
    let report = last_json_line(&out)?;
    assert_eq!(
        report["checkpoints"],
        serde_json::json!([s(&step1)?, s(&step2)?]),
        "{report}"
    );
    assert!(!path("run.step-3.safetensors").exists());
    let two = path("two.safetensors");
    train_steps(dir, "2", &["--output", &s(&two)?])?;
    let (same, moved) = (
        worst_absolute(&step2, &two)?,
        worst_absolute(&step1, &step2)?,
    );
    assert!(
        same <= 1e-6 && moved > 1e-4,
        "the step-2 checkpoint is {same:e} from a 2-step run's model and {moved:e} from step 1's"
    );
    let (_, meta) = lora_r(&step1)?;
    assert_eq!(meta.get("steps").map(String::as_str), Some("1"), "{meta:?}");

    let mean = path("mean.safetensors");
    check_success("fedsb average", &average(&[&step1, &step2, &run], &mean)?)?;
    let inputs = [tensors_of(&step1)?, tensors_of(&step2)?, tensors_of(&run)?];
    let got = tensors_of(&mean)?;
    assert!(got.keys().eq(inputs[2].keys()));
    for (name, values) in &got {
        let trained = name.ends_with(".lora_R") || name.starts_with("classifier.");
        let expected: Vec<f32> = if trained {
            (0..values.len())
                .map(|i| {
                    let sum: f64 = inputs.iter().map(|t| f64::from(t[name][i])).sum();
                    (sum / 3.0) as f32
                })
                .collect()
        } else {
            inputs[2][name].clone()
        };
        assert_eq!(values, &expected, "{name}");
    }
    assert_ne!(got, inputs[2], "the mean is the last file");
    let (_, meta) = lora_r(&mean)?;
    let listed: Vec<String> = serde_json::from_str(&meta["averaged_files"])?;
    assert_eq!(listed, [s(&step1)?, s(&step2)?, s(&run)?]);
    assert_eq!(meta.get("steps"), None, "the steps differ: {meta:?}");
    assert_eq!(meta.get("rank").map(String::as_str), Some(RANK));
    assert_eq!(meta.get("labels"), lora_r(&run)?.1.get("labels"));
    // The sequence length they all trained at, which `fedsb eval` uses.
    assert_eq!(meta.get("max_seq_len").map(String::as_str), Some("32"));
    let one = path("one.safetensors");
    check_success("fedsb average, one file", &average(&[&run], &one)?)?;
    assert_eq!(tensors_of(&one)?, inputs[2]);

    let refused = |files: &[&Path], message: &str| -> anyhow::Result<()> {
        let out = average(files, &path("refused.safetensors"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{files:?} must be refused");
        assert!(
            stderr.contains(message),
            "{files:?}: {message:?} not in {stderr}"
        );
        assert!(!path("refused.safetensors").exists());
        Ok(())
    };
    // Another seed draws other initialization examples: other A and B.
    let other = path("other.safetensors");
    let eval = path("eval.tsv");
    check_success(
        "fedsb train --seed 1",
        &fedsb_seeded(
            dir,
            "train",
            "1",
            &[
                "--eval",
                &s(&eval)?,
                "--steps",
                "1",
                "--output",
                &s(&other)?,
            ],
        )?,
    )?;
    refused(&[&run, &other], "only files with the same frozen A and B")?;
    let relabelled = path("relabelled.safetensors");
    rewrite_adapter_file(
        &run,
        &relabelled,
        |_| true,
        |metadata| {
            metadata
                .get_or_insert_with(HashMap::new)
                .insert("labels".into(), r#"["bad","good"]"#.into());
        },
    )?;
    refused(&[&run, &relabelled], "has the classes [\"bad\",\"good\"]")?;
    refused(&[&run, &path("missing.safetensors")], "missing.safetensors")?;
    refused(&[&eval], "is not a safetensors file")?;
    for (flags, message) in [
        (
            vec!["--checkpoint-every", "0", "--output", "x.safetensors"],
            "--checkpoint-every must be at least 1",
        ),
        (vec!["--checkpoint-every", "1"], "--output <OUTPUT>"),
    ] {
        let mut all = vec!["--eval", eval.to_str().context("path")?, "--steps", "2"];
        all.extend(flags.iter().copied());
        let out = fedsb(dir, "train", &all)?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(message),
            "{flags:?}: {stderr}"
        );
    }
    Ok(())
}
