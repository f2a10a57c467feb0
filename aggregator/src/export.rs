//! A committed global model as an adapter file: the task's frozen `A` and
//! `B` (from its adapter file) with the round's `R`s and head (from the
//! store), in the layout of `fedsb init` (`<module>.lora_A`, `lora_B`,
//! `lora_R`, `classifier.*`) and with the round and the task's
//! `max_seq_len` ([`MAX_SEQ_LEN`]) in the metadata. `fedsb
//! export` writes it; `/api/rounds/{n}/adapter` serves it. Equal rounds
//! give byte-identical files. `fedsb export --average N` writes the mean of
//! N consecutive rounds' models instead ([`export_rounds_mean`]).
//! [`check_pinned_files`] refuses files other than those the task's
//! database pins, and [`refuse_task_file`] an output that is one of the
//! task's own files.
//!
//! The file records the task's base model (`base_model_sha256`): the
//! SHA-256 of `model.safetensors` that the database pins, else `[model]
//! sha256`, else that of the model directory's file; with none of them
//! (the weights are not needed to export), the adapter file's own record
//! if it has one. An adapter file that records another base model than
//! the task's is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fedsb_engine::model::BertConfig;
use fedsb_protocol::RoundId;

use crate::adapter_file::{
    adapter_file_bytes, adapter_file_metadata, check_base_model, parse_module_names,
    read_adapter_file, state_to_engine, BASE_MODEL_SHA256, MAX_SEQ_LEN,
};
use crate::config::{AdapterInit, Config};
use crate::coordinator::accounted_epsilon_max;
use crate::files::{check_pin, hash_file, FileError, ADAPTER_FILE, MODEL_FILE};
use crate::store::{CommittedRound, RoundMeta, Store, StoreError};

/// Why a round could not be exported; the message names what is missing.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("task {task} has no committed round yet")]
    NoRounds { task: String },
    #[error("round {round} of task {task} is not committed: the last committed round is {last}")]
    NotCommitted { task: String, round: u64, last: u64 },
    #[error(
        "task {task} has no adapter file with A and B ([adapter] file is not set{}), \
         so its R matrices mean nothing on their own",
        if *.federated { ", and the federated initialization has not written one" } else { "" }
    )]
    NoAdapterFile { task: String, federated: bool },
    #[error("exporting needs [model] dir: the shapes of A and B come from its config.json")]
    NoModelDir,
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("the global state of round {round}: {message}")]
    State { round: u64, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "averaging {count} rounds ending at round {round} needs {count} committed rounds, \
         but there are only {} up to it (rounds 0-{round})",
        *.round + 1
    )]
    TooManyRounds { round: u64, count: u64 },
    #[error("averaging needs at least one round, not 0")]
    NoRoundsToAverage,
    #[error("the export task panicked")]
    Join,
    /// The task's adapter file records another base model than the task's;
    /// the message names both files and hashes.
    #[error("{0}")]
    OtherBaseModel(String),
    #[error(transparent)]
    Files(#[from] FileError),
    #[error(
        "--out {out} is this task's {what} {file}: the export would overwrite it; \
         write to another path"
    )]
    OutIsTaskFile {
        out: PathBuf,
        what: &'static str,
        file: PathBuf,
    },
}

/// Refuses to export with files other than the ones the task's database
/// pins (`model.safetensors`, the adapter file): its rounds' R only mean
/// something with those. Read-only: nothing is pinned here. A pinned file
/// that is not there is left to the export, which needs the adapter file
/// but not the model's weights.
pub async fn check_pinned_files(config: Arc<Config>, store: &Store) -> Result<(), ExportError> {
    let pinned = store.pinned_files().await?;
    if pinned.is_empty() {
        return Ok(());
    }
    tokio::task::spawn_blocking(move || {
        for p in &pinned {
            let path = match p.name.as_str() {
                MODEL_FILE => config.model.dir.as_ref().map(|d| d.join(MODEL_FILE)),
                ADAPTER_FILE => config.adapter_file_path(),
                _ => None,
            };
            let Some(path) = path.filter(|p| p.is_file()) else {
                continue;
            };
            let (sha256, _) = hash_file(&path)?;
            check_pin(p, &path, &sha256)?;
        }
        Ok(())
    })
    .await
    .map_err(|_| ExportError::Join)?
}

/// Refuses an output path that is (links resolved) one of the task's own
/// files: its adapter file, a file of its model directory, its `[eval]` or
/// `[demo]` data, or its database.
pub fn refuse_task_file(config: &Config, database: &Path, out: &Path) -> Result<(), ExportError> {
    let Some(resolved) = resolve_path(out) else {
        return Ok(());
    };
    let mut own: Vec<(&'static str, PathBuf)> = Vec::new();
    if let Some(adapter) = config.adapter_file_path() {
        own.push(("adapter file", adapter));
    }
    if let Some(dir) = &config.model.dir {
        for name in ["config.json", MODEL_FILE, "tokenizer.json"] {
            own.push(("model file", dir.join(name)));
        }
    }
    if let Some(file) = &config.eval.file {
        own.push(("evaluation file", file.clone()));
    }
    if let Some(file) = &config.demo.data {
        own.push(("demo data file", file.clone()));
    }
    own.push(("state database", database.to_owned()));
    for (what, file) in own {
        if file.canonicalize().is_ok_and(|f| f == resolved) {
            return Err(ExportError::OutIsTaskFile {
                out: out.to_owned(),
                what,
                file,
            });
        }
    }
    Ok(())
}

/// `path` with its links resolved: the file's own path when it exists,
/// otherwise its directory's joined with its name; `None` when neither
/// exists. Two paths name the same file when their resolved paths are
/// equal, which is how output paths are checked against a command's inputs.
pub fn resolve_path(path: &Path) -> Option<PathBuf> {
    if let Ok(p) = path.canonicalize() {
        return Some(p);
    }
    let name = path.file_name()?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    dir.canonicalize().ok().map(|d| d.join(name))
}

/// One exported round: the adapter file's bytes and the round's metadata.
#[derive(Debug, Clone)]
pub struct ExportedRound {
    pub round: u64,
    /// The first round of the mean ([`export_rounds_mean`]); `round` itself
    /// when one round is exported.
    pub first_round: u64,
    /// The last committed round when it was exported.
    pub last_committed: u64,
    pub meta: RoundMeta,
    pub bytes: Vec<u8>,
    /// DP tasks: the file's `dp_epsilon_max` and `dp_epsilon_accounted_max`.
    pub dp_epsilon_max: Option<f64>,
    pub dp_epsilon_accounted_max: Option<f64>,
}

impl ExportedRound {
    /// The first and last round of a mean of several rounds, or `None` for
    /// one round's model.
    pub fn averaged_rounds(&self) -> Option<[u64; 2]> {
        (self.first_round < self.round).then_some([self.first_round, self.round])
    }
}

/// The adapter file of committed round `round` (default: the last one);
/// the files are read and the bytes made on a blocking thread.
pub async fn export_round(
    config: Arc<Config>,
    store: &Store,
    round: Option<u64>,
) -> Result<ExportedRound, ExportError> {
    export_rounds_mean(config, store, round, 1).await
}

/// The adapter file of the mean of the `count` committed rounds ending at
/// `round` (default: the last one): every `R` and the head averaged over
/// those rounds' global models (summed in f64), `A` and `B` the task's.
/// Since `A` and `B` are the same in every round, this is the mean of the
/// rounds' adapted weights `B·R·A` and heads, a post-processing of
/// committed models that damps their round-to-round swing. The metadata
/// names the rounds (`averaged_rounds = "first-last"`) and drops the one
/// round's `global_sha256`; with `count` 1 it is [`export_round`]'s file.
pub async fn export_rounds_mean(
    config: Arc<Config>,
    store: &Store,
    round: Option<u64>,
    count: u64,
) -> Result<ExportedRound, ExportError> {
    let task = config.task.id.clone();
    let latest = store
        .last_round()
        .await?
        .ok_or_else(|| ExportError::NoRounds { task: task.clone() })?;
    let last = latest.meta.round;
    let round = round.unwrap_or(last);
    if count == 0 {
        return Err(ExportError::NoRoundsToAverage);
    }
    if round > last {
        return Err(ExportError::NotCommitted {
            task: task.clone(),
            round,
            last,
        });
    }
    if count > round + 1 {
        return Err(ExportError::TooManyRounds { round, count });
    }
    let first = round + 1 - count;
    // The last round is read once; others by their number.
    let mut committed = Vec::with_capacity(count as usize);
    for n in first..=round {
        if n == last {
            committed.push(latest.clone());
            continue;
        }
        committed.push(store.committed_round(RoundId(n)).await?.ok_or_else(|| {
            ExportError::NotCommitted {
                task: task.clone(),
                round: n,
                last,
            }
        })?);
    }
    // DP tasks: what the participants had spent when this round committed.
    // Each report carries its participant's ε spent so far, so the largest
    // one up to this round is the worst-off participant's own count; the
    // aggregator's account of the updates up to this round (the only ones
    // the model depends on) does not rely on the participants' ledgers.
    let reports = if config.privacy.enabled {
        let mut reports = store.privacy_reports().await?;
        reports.retain(|r| r.round <= round);
        Some(reports)
    } else {
        None
    };
    // The model the rounds were trained on, as the task pinned it.
    let pinned_model = store
        .pinned_files()
        .await?
        .into_iter()
        .find(|p| p.name == MODEL_FILE)
        .map(|p| p.sha256.to_ascii_lowercase());
    tokio::task::spawn_blocking(move || {
        let privacy = reports.map(|reports| {
            let mut participants: Vec<_> = reports.iter().map(|r| r.participant).collect();
            participants.sort_unstable();
            participants.dedup();
            PrivacySpent {
                epsilon_max: reports.iter().map(|r| r.epsilon_spent).fold(0.0, f64::max),
                participants: participants.len(),
                epsilon_accounted_max: accounted_epsilon_max(
                    reports,
                    config.privacy_policy().as_ref(),
                ),
            }
        });
        let mean = mean_of(committed)?;
        adapter_file_of(&config, mean, first, last, privacy, pinned_model)
    })
    .await
    .map_err(|_| ExportError::Join)?
}

/// The last of `rounds` with its global state replaced by the mean of
/// theirs (the last one unchanged when there is one).
fn mean_of(mut rounds: Vec<CommittedRound>) -> Result<CommittedRound, ExportError> {
    let mut last = rounds.pop().expect("at least one round");
    if rounds.is_empty() {
        return Ok(last);
    }
    let count = (rounds.len() + 1) as f64;
    let mut sums: Vec<Vec<f64>> = last
        .adapter
        .named_tensors()
        .map(|(_, t)| t.data.iter().map(|&x| f64::from(x)).collect())
        .collect();
    for other in &rounds {
        let n = other.meta.round;
        let tensors: Vec<_> = other.adapter.named_tensors().collect();
        if tensors.len() != sums.len() {
            return Err(ExportError::State {
                round: n,
                message: format!(
                    "{} tensors, but round {} has {}",
                    tensors.len(),
                    last.meta.round,
                    sums.len()
                ),
            });
        }
        for ((name, t), sum) in tensors.into_iter().zip(&mut sums) {
            if t.data.len() != sum.len() {
                return Err(ExportError::State {
                    round: n,
                    message: format!(
                        "{name} has {} values, but {} in round {}",
                        t.data.len(),
                        sum.len(),
                        last.meta.round
                    ),
                });
            }
            for (s, &x) in sum.iter_mut().zip(&t.data) {
                *s += f64::from(x);
            }
        }
    }
    for (t, sum) in last.adapter.tensors_mut().zip(sums) {
        for (x, s) in t.data.iter_mut().zip(sum) {
            *x = (s / count) as f32;
        }
    }
    Ok(last)
}

/// What the participants of a DP task had spent by a round.
struct PrivacySpent {
    /// The largest ε any participant had spent, as they reported it.
    epsilon_max: f64,
    /// The largest ε the aggregator accounts for any participant's
    /// updates up to the round (`None` without reports).
    epsilon_accounted_max: Option<f64>,
    /// Participants with a privacy report up to the round.
    participants: usize,
}

/// The SHA-256 of the task's base model and the file it stands for in
/// messages: the one the database pins (`pinned`), else `[model] sha256`,
/// else the hash of the model directory's file if it is there.
fn task_base_model(
    config: &Config,
    model_dir: &Path,
    pinned: Option<String>,
) -> Result<Option<(String, String)>, ExportError> {
    let file = model_dir.join(MODEL_FILE);
    if let Some(sha256) = pinned {
        let name = format!("{} (as this task's database pins it)", file.display());
        return Ok(Some((name, sha256)));
    }
    if let Some(sha256) = &config.model.sha256 {
        let name = format!("{} (model.sha256 in the configuration)", file.display());
        return Ok(Some((name, sha256.to_ascii_lowercase())));
    }
    if file.is_file() {
        let (sha256, _) = hash_file(&file)?;
        return Ok(Some((file.display().to_string(), sha256)));
    }
    Ok(None)
}

/// The adapter file of a committed round (or of the mean of the rounds from
/// `first` on to it), `last` being the last committed; `pinned_model` is the
/// SHA-256 of `model.safetensors` that the task's database pins.
fn adapter_file_of(
    config: &Config,
    committed: CommittedRound,
    first: u64,
    last: u64,
    privacy: Option<PrivacySpent>,
    pinned_model: Option<String>,
) -> Result<ExportedRound, ExportError> {
    let task = config.task.id.clone();
    let round = committed.meta.round;
    let adapter_path = config
        .adapter_file_path()
        .ok_or_else(|| ExportError::NoAdapterFile {
            task: task.clone(),
            federated: config.adapter.init == AdapterInit::Federated,
        })?;
    let model_dir = config.model.dir.as_ref().ok_or(ExportError::NoModelDir)?;
    let config_json = model_dir.join("config.json");
    let file_err = |path: &PathBuf, message: String| ExportError::File {
        path: path.clone(),
        message,
    };
    let bert = std::fs::read(&config_json)
        .map_err(|e| e.to_string())
        .and_then(|b| BertConfig::from_json(&b).map_err(|e| e.to_string()))
        .map_err(|m| file_err(&config_json, m))?;
    let names = config.module_names();
    let modules = parse_module_names(&names, bert.num_hidden_layers)
        .map_err(|e| file_err(&config_json, e.to_string()))?;
    let adapter_bytes =
        std::fs::read(&adapter_path).map_err(|e| file_err(&adapter_path, e.to_string()))?;
    let frozen = read_adapter_file(
        &adapter_bytes,
        &names,
        &modules,
        &bert,
        config.adapter.rank as usize,
    )
    .map_err(|e| file_err(&adapter_path, e.to_string()))?;
    let adapter_metadata = adapter_file_metadata(&adapter_bytes)
        .map_err(|e| file_err(&adapter_path, e.to_string()))?;
    let base_model = match task_base_model(config, model_dir, pinned_model)? {
        Some((model_file, sha256)) => {
            check_base_model(
                &adapter_metadata,
                &adapter_path.display().to_string(),
                &model_file,
                &sha256,
            )
            .map_err(|e| ExportError::OtherBaseModel(e.to_string()))?;
            Some(sha256)
        }
        // A and B were made for the model the adapter file records.
        None => adapter_metadata.get(BASE_MODEL_SHA256).cloned(),
    };
    let (adapters, head) =
        state_to_engine(&frozen, &modules, &committed.adapter).map_err(|e| ExportError::State {
            round,
            message: e.to_string(),
        })?;
    let meta = committed.meta;
    let mut metadata = HashMap::from([
        ("format".to_owned(), "fedsb-lora-sb".to_owned()),
        ("rank".to_owned(), config.adapter.rank.to_string()),
        ("modules".to_owned(), config.adapter.modules.join(",")),
        (
            "labels".to_owned(),
            serde_json::to_string(&config.task.labels).unwrap_or_default(),
        ),
        ("model_id".to_owned(), config.model.id.clone()),
        ("task_id".to_owned(), task),
        ("round".to_owned(), round.to_string()),
        // The length the rounds were trained and evaluated at, which
        // `fedsb eval` then uses.
        (MAX_SEQ_LEN.to_owned(), config.task.max_seq_len.to_string()),
        ("participants".to_owned(), meta.participants.to_string()),
        ("total_samples".to_owned(), meta.total_samples.to_string()),
        ("global_sha256".to_owned(), meta.global_sha256.clone()),
        ("trained_by".to_owned(), "fedsb serve".to_owned()),
    ]);
    if first < round {
        // Not one round's global state: name the rounds instead.
        metadata.remove("global_sha256");
        metadata.insert("averaged_rounds".to_owned(), format!("{first}-{round}"));
    }
    if let Some(sha256) = base_model {
        metadata.insert(BASE_MODEL_SHA256.to_owned(), sha256);
    }
    let dp_epsilon_max = privacy.as_ref().map(|p| p.epsilon_max);
    let dp_epsilon_accounted_max = privacy.as_ref().and_then(|p| p.epsilon_accounted_max);
    if let Some(p) = privacy {
        metadata.insert("dp_epsilon_max".to_owned(), p.epsilon_max.to_string());
        if let Some(e) = p.epsilon_accounted_max {
            metadata.insert("dp_epsilon_accounted_max".to_owned(), e.to_string());
        }
        metadata.insert("dp_delta".to_owned(), config.privacy.delta.to_string());
        metadata.insert("dp_participants".to_owned(), p.participants.to_string());
    }
    let bytes = adapter_file_bytes(&names, &modules, &adapters, &head, metadata).map_err(|e| {
        ExportError::State {
            round,
            message: e.to_string(),
        }
    })?;
    Ok(ExportedRound {
        round,
        first_round: first,
        last_committed: last,
        meta,
        bytes,
        dp_epsilon_max,
        dp_epsilon_accounted_max,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{sha256_hex, PinnedFile};

    /// A safetensors file with one F32 value (the configuration reads the
    /// adapter file's header).
    fn adapter_bytes(x: f32) -> Vec<u8> {
        let data = x.to_le_bytes();
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
        safetensors::serialize([("x", view)], None).unwrap()
    }

    /// A task directory: `model/` (config.json, model.safetensors,
    /// tokenizer.json), `adapter.safetensors` and `task.toml`.
    fn task_dir() -> (tempfile::TempDir, Config) {
        let dir = tempfile::tempdir().unwrap();
        crate::test_support::write_fake_model(dir.path());
        std::fs::write(dir.path().join("adapter.safetensors"), adapter_bytes(1.0)).unwrap();
        let toml = r#"[task]
id = "t"
rounds = 2
labels = ["a", "b"]
[model]
id = "m"
dir = "model"
[adapter]
rank = 4
file = "adapter.safetensors"
[server]
state_dir = "state"
"#;
        std::fs::write(dir.path().join("task.toml"), toml).unwrap();
        let config = crate::config::load_locked(&dir.path().join("task.toml")).unwrap();
        (dir, config)
    }

    #[test]
    fn an_out_path_that_is_one_of_the_tasks_files_is_refused() {
        let (dir, mut config) = task_dir();
        let d = dir.path();
        for name in ["dev.tsv", "demo.tsv"] {
            std::fs::write(d.join(name), "sentence\tlabel\nok\ta\n").unwrap();
        }
        config.eval.file = Some(d.join("dev.tsv"));
        config.demo.data = Some(d.join("demo.tsv"));
        let database = d.join("state/t.sqlite3");
        std::fs::create_dir(d.join("state")).unwrap();
        std::fs::write(&database, b"").unwrap();
        let refused = |out: PathBuf, what: &str| {
            let err = refuse_task_file(&config, &database, &out).unwrap_err();
            assert!(
                matches!(&err, ExportError::OutIsTaskFile { what: w, .. } if *w == what),
                "{out:?}: {err}"
            );
            assert!(
                err.to_string().contains(&out.display().to_string()),
                "{err}"
            );
        };
        refused(d.join("adapter.safetensors"), "adapter file");
        refused(d.join("model/../adapter.safetensors"), "adapter file");
        refused(d.join("model/model.safetensors"), "model file");
        refused(d.join("state/t.sqlite3"), "state database");
        refused(d.join("dev.tsv"), "evaluation file");
        refused(d.join("demo.tsv"), "demo data file");
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(d.join("model/model.safetensors"), d.join("link")).unwrap();
            refused(d.join("link"), "model file");
        }
        refuse_task_file(&config, &database, &d.join("round-3.safetensors")).unwrap();
        refuse_task_file(&config, &database, &d.join("no/such/dir/x.safetensors")).unwrap();
        refuse_task_file(&config, &database, Path::new("x.safetensors")).unwrap();
    }

    /// `fedsb export` refuses a model or adapter file other than the pinned
    /// one, naming it and both hashes; a pinned file that is not there is
    /// left to the export.
    #[tokio::test]
    async fn an_export_with_another_pinned_file_is_refused() {
        let (dir, config) = task_dir();
        let config = Arc::new(config);
        let d = dir.path();
        let identity = config.identity_json();
        let store = Store::open(&d.join("state"), "t", &identity, 1).unwrap();
        store
            .pin_files(
                vec![
                    PinnedFile {
                        name: ADAPTER_FILE.into(),
                        path: d.join("adapter.safetensors"),
                        sha256: sha256_hex(&adapter_bytes(1.0)),
                    },
                    PinnedFile {
                        name: MODEL_FILE.into(),
                        path: d.join("model/model.safetensors"),
                        sha256: sha256_hex(b"weights"),
                    },
                ],
                1,
            )
            .await
            .unwrap();
        // Read-only, beside the running server's store.
        let read_only = Store::open_read_only(&d.join("state"), "t", &identity).unwrap();
        check_pinned_files(config.clone(), &read_only)
            .await
            .unwrap();

        std::fs::write(d.join("model/model.safetensors"), b"other weights").unwrap();
        let err = check_pinned_files(config.clone(), &read_only)
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&format!(
                "model.safetensors {} has SHA-256 {}, but this task's database pins {}",
                d.join("model/model.safetensors").display(),
                sha256_hex(b"other weights"),
                sha256_hex(b"weights")
            )),
            "{msg}"
        );
        std::fs::remove_file(d.join("model/model.safetensors")).unwrap();
        check_pinned_files(config.clone(), &read_only)
            .await
            .unwrap();

        std::fs::write(d.join("adapter.safetensors"), adapter_bytes(2.0)).unwrap();
        let err = check_pinned_files(config, &read_only).await.unwrap_err();
        assert!(
            matches!(&err, ExportError::Files(FileError::PinnedChanged { name, .. }) if name == ADAPTER_FILE),
            "{err}"
        );
    }
}
