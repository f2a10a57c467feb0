//! Evaluation of every committed global model on the task's eval set
//! (`[eval]` in the configuration) with the native engine.
//!
//! One thread owns the GPU device, the model and the tokenized eval set. It
//! evaluates every committed round that has no evaluation yet, oldest first
//! (round 0, the initial model, included), stores the result in SQLite
//! (`round_eval`, keyed by the eval set's content hash and row limit, so a
//! changed eval set is evaluated afresh) and announces it on a broadcast
//! channel that `/api/events` forwards to the page. After a restart it
//! catches up on the rounds it had not evaluated.
//!
//! Evaluation never holds up a round: the coordinator commits and broadcasts
//! without waiting, and a slow evaluation only lags behind.
//!
//! The eval set and the model are read and checked by [`prepare`] before
//! `fedsb serve` opens its state, so a wrong eval file is refused before a
//! database is created or touched; [`spawn`] then takes the GPU device.
//!
//! At shutdown [`EvalHandle::stop`] stops the thread before its next batch
//! and waits for it to release the device: a process that exited while the
//! thread still held (or was dropping) a lavapipe device crashed in the
//! driver's exit-time teardown (SIGSEGV). A round whose evaluation was cut
//! short has none stored, so the next start evaluates it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fedsb_engine::data::{read_dataset_file, ColumnSpec, Example};
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::LoraSbAdapters;
use fedsb_engine::train::evaluate_unless;
use fedsb_protocol::RoundId;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, watch};
use tracing::{error, info, warn};

use crate::adapter_file::{
    head_from_state, parse_module_names, read_adapter_file, state_to_engine, ModuleRef,
};
use crate::config::{AdapterInit, Config};
use crate::coordinator::{now_unix_ms, Status};
use crate::metrics::Metrics;
use crate::store::{RoundEval, Store};

/// Why the evaluator could not start.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("eval.file {path}: {message}")]
    Data { path: PathBuf, message: String },
    #[error("evaluation model: {0}")]
    Model(String),
    #[error("evaluation GPU: {0}")]
    Gpu(String),
}

/// The running evaluator: its eval-set key and its announcements.
#[derive(Debug, Clone)]
pub struct EvalHandle {
    /// Key of the eval set in the database (content hash and row limit).
    pub eval_set: String,
    /// Rows evaluated per round.
    pub samples: usize,
    /// The GPU adapter evaluating.
    pub adapter_name: String,
    /// Every finished evaluation.
    pub events: broadcast::Sender<RoundEval>,
    shutdown: Arc<Shutdown>,
}

/// How [`EvalHandle::stop`] reaches the evaluation thread and learns that it
/// ended.
#[derive(Debug)]
struct Shutdown {
    /// Checked before every batch.
    stop: Arc<AtomicBool>,
    /// Wakes the thread from its wait for the next commit.
    wake: watch::Sender<bool>,
    /// Disconnected once the thread has ended, its GPU device dropped.
    ended: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    /// The thread, joined once it has ended: it still runs its
    /// thread-local destructors after its closure returns (the GL
    /// dispatch library's among them, loaded when wgpu probes its
    /// backends), and a process that exits meanwhile frees them twice
    /// ("double free or corruption", SIGABRT).
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl EvalHandle {
    /// Stops the evaluation before its next batch and waits up to `timeout`
    /// for the thread to end and release its GPU device; `false` when it
    /// did not end in time (or was already waited for).
    pub fn stop(&self, timeout: Duration) -> bool {
        self.shutdown.stop.store(true, Ordering::Relaxed);
        self.shutdown.wake.send_replace(true);
        let ended = self
            .shutdown
            .ended
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(ended) = ended else {
            return false;
        };
        match ended.recv_timeout(timeout) {
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) | Ok(()) => {
                let thread = self
                    .shutdown
                    .thread
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .take();
                if let Some(thread) = thread {
                    // Its closure has returned: this waits only for the
                    // thread's own exit.
                    let _ = thread.join();
                }
                true
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                warn!(
                    seconds = timeout.as_secs_f64(),
                    "the evaluation thread did not stop in time; exiting without it"
                );
                false
            }
        }
    }
}

/// Everything the evaluation thread needs, loaded and checked up front so a
/// wrong eval file or model stops `fedsb serve` with a clear message.
struct Prepared {
    weights: BertWeights<f32>,
    tokenizer: BertTokenizer,
    examples: Vec<Example>,
    frozen: Option<(LoraSbAdapters<f32>, Vec<ModuleRef>)>,
    batch: usize,
}

/// The eval set, tokenizer and model of `[eval]`, read and checked by
/// [`prepare`] before the state is opened, for [`spawn`].
pub struct PreparedEval {
    prepared: Prepared,
    /// Key of the eval set in the database (content hash and row limit).
    eval_set: String,
}

impl PreparedEval {
    /// How many labelled rows are evaluated (after `[eval] limit`).
    pub fn rows(&self) -> usize {
        self.prepared.examples.len()
    }
}

/// Reads and checks the eval set of `[eval] file` (columns, labels against
/// the task's) and loads the model it is evaluated with; `None` when no eval
/// file is set. Needs no state: `fedsb serve` calls it before it opens the
/// database, so a wrong eval file creates and touches nothing.
pub async fn prepare(config: &Config) -> Result<Option<PreparedEval>, EvalError> {
    let Some(file) = config.eval.file.clone() else {
        return Ok(None);
    };
    let cfg = config.clone();
    let (prepared, eval_set) = tokio::task::spawn_blocking(move || prepare_blocking(&cfg, &file))
        .await
        .map_err(|_| EvalError::Model("loading task panicked".into()))??;
    Ok(Some(PreparedEval { prepared, eval_set }))
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(hex::encode(Sha256::digest(&bytes)))
}

fn prepare_blocking(config: &Config, file: &Path) -> Result<(Prepared, String), EvalError> {
    let e = &config.eval;
    let data_err = |message: String| EvalError::Data {
        path: file.to_owned(),
        message,
    };
    let spec = ColumnSpec {
        text: e.text_column.clone(),
        text_pair: e.text_pair_column.clone(),
        label: e.label_column.clone(),
        label_names: Some(config.task.labels.clone()),
        skip_rows_without_label: true,
    };
    let dataset = read_dataset_file(file, &spec).map_err(|err| data_err(err.to_string()))?;
    if dataset.label_column.is_none() {
        return Err(data_err(
            "no label column found (set eval.label_column)".into(),
        ));
    }
    if dataset.skipped.count > 0 {
        tracing::warn!(file = %file.display(), "eval set: {}", dataset.skipped);
    }
    let mut examples = dataset.examples;
    if e.limit > 0 {
        examples.truncate(e.limit);
    }
    if examples.is_empty() {
        return Err(data_err("no labelled rows".into()));
    }
    let hash = sha256_file(file).map_err(|err| data_err(err.to_string()))?;
    let eval_set = format!(
        "{hash}:{}:{}:{}:{}",
        examples.len(),
        dataset.text_column,
        dataset.text_pair_column.as_deref().unwrap_or(""),
        dataset.label_column.as_deref().unwrap_or("")
    );

    let dir = config
        .model
        .dir
        .as_ref()
        .ok_or_else(|| EvalError::Model("eval needs model.dir".into()))?;
    let weights = BertWeights::from_dir(dir).map_err(|err| EvalError::Model(err.to_string()))?;
    let tokenizer = BertTokenizer::from_file(dir.join("tokenizer.json"))
        .and_then(|t| t.with_max_length(config.task.max_seq_len as usize))
        .map_err(|err| EvalError::Model(err.to_string()))?;
    let frozen = match &config.adapter.file {
        None => None,
        Some(path) => Some(load_frozen(config, &weights, path)?),
    };
    Ok((
        Prepared {
            weights,
            tokenizer,
            examples,
            frozen,
            batch: e.batch_size,
        },
        eval_set,
    ))
}

/// A and B of every adapted module from the adapter file at `path`.
fn load_frozen(
    config: &Config,
    weights: &BertWeights<f32>,
    path: &Path,
) -> Result<(LoraSbAdapters<f32>, Vec<ModuleRef>), EvalError> {
    let bytes = std::fs::read(path)
        .map_err(|err| EvalError::Model(format!("adapter file {}: {err}", path.display())))?;
    let names = config.module_names();
    let modules = parse_module_names(&names, weights.config.num_hidden_layers)
        .map_err(|err| EvalError::Model(err.to_string()))?;
    let adapters = read_adapter_file(
        &bytes,
        &names,
        &modules,
        &weights.config,
        config.adapter.rank as usize,
    )
    .map_err(|err| EvalError::Model(format!("adapter file {}: {err}", path.display())))?;
    Ok((adapters, modules))
}

/// The name of the GPU adapter the evaluator would use (`[eval]
/// gpu_adapter`), with its device requested and released again: for
/// `fedsb serve --check`.
pub async fn check_gpu(config: &Config) -> Result<String, EvalError> {
    let adapter = config.eval.gpu_adapter.clone();
    tokio::task::spawn_blocking(move || {
        pollster::block_on(GpuContext::new(&GpuOptions {
            adapter: adapter.as_deref(),
        }))
        .map(|ctx| ctx.adapter_name().to_owned())
        .map_err(|e| EvalError::Gpu(e.to_string()))
    })
    .await
    .map_err(|_| EvalError::Gpu("requesting the GPU device panicked".into()))?
}

/// Starts the evaluator with what [`prepare`] read (nothing to start when it
/// is `None`). Returns once the GPU device is ready (or with the reason it is
/// not).
pub async fn spawn(
    config: Arc<Config>,
    prepared: Option<PreparedEval>,
    store: Store,
    mut status: watch::Receiver<Status>,
    metrics: Arc<Metrics>,
) -> Result<Option<EvalHandle>, EvalError> {
    let Some(PreparedEval {
        mut prepared,
        eval_set,
    }) = prepared
    else {
        return Ok(None);
    };
    // The gauges start at the newest evaluation stored before this start.
    if let Some(e) = store
        .round_summaries(Some(eval_set.clone()))
        .await
        .ok()
        .and_then(|rounds| rounds.into_iter().rev().find_map(|r| r.eval))
    {
        metrics.evaluated(e.round, e.accuracy, e.loss);
    }
    // The adapter file of a federated initialization whose round 0 is
    // committed: the server sets it in `config` once it has read the state,
    // after `prepare`.
    let resumed_init_file = config
        .adapter
        .file
        .clone()
        .filter(|_| prepared.frozen.is_none());
    if let Some(path) = resumed_init_file {
        let cfg = config.clone();
        prepared = tokio::task::spawn_blocking(move || {
            prepared.frozen = Some(load_frozen(&cfg, &prepared.weights, &path)?);
            Ok::<_, EvalError>(prepared)
        })
        .await
        .map_err(|_| EvalError::Model("loading task panicked".into()))??;
    }
    // A task still to be initialized federatedly has no adapter file yet:
    // A and B are read from the state directory once round 0 is committed.
    let init_file = (config.adapter.init == AdapterInit::Federated
        && config.adapter.file.is_none())
    .then(|| config.federated_adapter_path());
    let load_cfg = config.clone();
    let (events, _) = broadcast::channel(256);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let runtime = tokio::runtime::Handle::current();
    let handle_events = events.clone();
    let key = eval_set.clone();
    let gpu_adapter = config.eval.gpu_adapter.clone();
    let samples = prepared.examples.len();
    let stop = Arc::new(AtomicBool::new(false));
    let (wake, mut woken) = watch::channel(false);
    let (ended_tx, ended) = std::sync::mpsc::channel::<()>();
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new()
        .name("fedsb-eval".into())
        .spawn(move || {
            // Declared first, dropped last: after the GPU context.
            let _ended = ended_tx;
            let stop = thread_stop;
            let ctx = match pollster::block_on(GpuContext::new(&GpuOptions {
                adapter: gpu_adapter.as_deref(),
            })) {
                Ok(ctx) => ctx,
                Err(e) => {
                    let _ = ready_tx.send(Err(EvalError::Gpu(e.to_string())));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(ctx.adapter_name().to_owned()));
            // Rounds whose global model evaluates to a non-finite loss: not
            // stored (the database holds numbers), and not redone at every
            // commit; the next start tries them once more.
            let mut unevaluable = std::collections::BTreeSet::new();
            loop {
                // Rounds are in the database before the status says they are
                // committed, so the catch-up below covers `seen`; a commit
                // during the catch-up wakes the wait at once.
                let (seen, finished, initializing) = {
                    let s = status.borrow_and_update();
                    (
                        s.last_committed_round,
                        s.state == "finished",
                        s.state == "initializing",
                    )
                };
                if let (None, Some(path), false) = (&prepared.frozen, &init_file, initializing) {
                    match load_frozen(&load_cfg, &prepared.weights, path) {
                        Ok(f) => prepared.frozen = Some(f),
                        Err(e) => {
                            metrics.eval_failures.inc();
                            error!(error = %e, "the federated initialization's adapter file")
                        }
                    }
                }
                if let Err(e) = runtime.block_on(catch_up(
                    &ctx,
                    &prepared,
                    &store,
                    &key,
                    &handle_events,
                    &stop,
                    &mut unevaluable,
                    &metrics,
                )) {
                    metrics.eval_failures.inc();
                    error!(error = %e, "evaluation failed; retrying after the next commit");
                }
                if finished || stop.load(Ordering::Relaxed) {
                    return;
                }
                let next = runtime.block_on(async {
                    tokio::select! {
                        woke = status.wait_for(
                            |s| s.last_committed_round > seen || s.state == "finished",
                        ) => woke.is_ok(),
                        _ = woken.wait_for(|stop| *stop) => false,
                    }
                });
                if !next {
                    return; // the server stopped
                }
            }
        })
        .map_err(|e| EvalError::Gpu(format!("cannot start the evaluation thread: {e}")))?;
    let adapter_name = ready_rx
        .await
        .map_err(|_| EvalError::Gpu("the evaluation thread stopped".into()))??;
    info!(eval_set = %eval_set, samples, adapter = %adapter_name, "evaluating every committed round");
    Ok(Some(EvalHandle {
        eval_set,
        samples,
        adapter_name,
        events,
        shutdown: Arc::new(Shutdown {
            stop,
            wake,
            ended: std::sync::Mutex::new(Some(ended)),
            thread: std::sync::Mutex::new(Some(thread)),
        }),
    }))
}

/// Evaluates every committed round without an evaluation on `key`, in
/// order, except the `unevaluable` ones; a round whose loss is not finite
/// joins them and the later rounds are still evaluated.
#[allow(clippy::too_many_arguments)]
async fn catch_up(
    ctx: &GpuContext,
    p: &Prepared,
    store: &Store,
    key: &str,
    events: &broadcast::Sender<RoundEval>,
    stop: &AtomicBool,
    unevaluable: &mut std::collections::BTreeSet<u64>,
    metrics: &Metrics,
) -> Result<(), String> {
    let pending = store
        .rounds_without_eval(key.to_owned())
        .await
        .map_err(|e| e.to_string())?;
    for round in pending {
        if unevaluable.contains(&round) {
            continue;
        }
        // Decoded and checked against its checksum by the store.
        let state = store
            .committed_round(RoundId(round))
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("round {round} vanished from the database"))?
            .adapter;
        let started = Instant::now();
        let head = head_from_state(&state).map_err(|e| e.to_string())?;
        let result = match &p.frozen {
            Some((frozen, modules)) => {
                let (adapters, head) =
                    state_to_engine(frozen, modules, &state).map_err(|e| e.to_string())?;
                let mut encoder = GpuEncoder::new(ctx, &p.weights, Some(&adapters), Some(&head))
                    .map_err(|e| e.to_string())?;
                evaluate_unless(&mut encoder, &p.tokenizer, &p.examples, p.batch, stop).await
            }
            None => {
                // Without an adapter file every R multiplies nothing: the
                // global model is the base encoder with the global head.
                if state.r.iter().any(|r| r.data.iter().any(|&x| x != 0.0)) {
                    warn!(
                        round,
                        "global R is non-zero but no adapter file defines A and B; \
                         evaluating the head only"
                    );
                }
                let mut encoder = GpuEncoder::new(ctx, &p.weights, None, Some(&head))
                    .map_err(|e| e.to_string())?;
                evaluate_unless(&mut encoder, &p.tokenizer, &p.examples, p.batch, stop).await
            }
        }
        .map_err(|e| format!("round {round}: {e}"))?;
        let Some(result) = result else {
            info!(
                round,
                "evaluation stopped for the shutdown; the next start evaluates this round"
            );
            return Ok(());
        };
        if !(result.loss.is_finite() && result.accuracy.is_finite()) {
            error!(
                round,
                loss = result.loss,
                "the global model's evaluation loss is not finite (its outputs overflow); \
                 nothing is stored for this round and the later rounds are evaluated \
                 (the next start tries it again)"
            );
            unevaluable.insert(round);
            metrics.eval_failures.inc();
            continue;
        }
        let eval = RoundEval {
            round,
            accuracy: result.accuracy,
            loss: result.loss,
            samples: result.samples as u64,
            seconds: started.elapsed().as_secs_f64(),
            evaluated_unix_ms: now_unix_ms(),
            confusion: Some(result.confusion),
        };
        store
            .put_eval(key.to_owned(), eval.clone())
            .await
            .map_err(|e| e.to_string())?;
        metrics.evaluated(round, eval.accuracy, eval.loss);
        info!(
            round,
            accuracy = eval.accuracy,
            loss = eval.loss,
            seconds = eval.seconds,
            "global model evaluated"
        );
        let _ = events.send(eval);
    }
    Ok(())
}
