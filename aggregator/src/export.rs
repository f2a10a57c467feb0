//! A committed global model as an adapter file: the task's frozen `A` and
//! `B` (from its adapter file) with the round's `R`s and head (from the
//! store), in the layout of `fedsb init` (`<module>.lora_A`, `lora_B`,
//! `lora_R`, `classifier.*`) and with the round in the metadata. `fedsb
//! export` writes it; `/api/rounds/{n}/adapter` serves it. Equal rounds
//! give byte-identical files. `fedsb export --average N` writes the mean of
//! N consecutive rounds' models instead ([`export_rounds_mean`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use fedsb_engine::model::BertConfig;
use fedsb_protocol::RoundId;

use crate::adapter_file::{
    adapter_file_bytes, parse_module_names, read_adapter_file, state_to_engine,
};
use crate::config::{AdapterInit, Config};
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
    // one up to this round is the model's guarantee for the worst-off
    // participant's data.
    let privacy = if config.privacy.enabled {
        let reports = store.privacy_reports().await?;
        let upto: Vec<_> = reports.iter().filter(|r| r.round <= round).collect();
        let mut participants: Vec<_> = upto.iter().map(|r| r.participant).collect();
        participants.sort_unstable();
        participants.dedup();
        Some(PrivacySpent {
            epsilon_max: upto.iter().map(|r| r.epsilon_spent).fold(0.0, f64::max),
            participants: participants.len(),
        })
    } else {
        None
    };
    tokio::task::spawn_blocking(move || {
        let mean = mean_of(committed)?;
        adapter_file_of(&config, mean, first, last, privacy)
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
    /// The largest ε any participant had spent.
    epsilon_max: f64,
    /// Participants with a privacy report up to the round.
    participants: usize,
}

/// The adapter file of a committed round (or of the mean of the rounds from
/// `first` on to it), `last` being the last committed.
fn adapter_file_of(
    config: &Config,
    committed: CommittedRound,
    first: u64,
    last: u64,
    privacy: Option<PrivacySpent>,
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
    if let Some(p) = privacy {
        metadata.insert("dp_epsilon_max".to_owned(), p.epsilon_max.to_string());
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
    })
}
