//! `fedsb join`: a native participant. It speaks the same protocol as a
//! browser tab, trains on the GPU (Vulkan, Metal, DX12; lavapipe without a
//! GPU) and never sends its data anywhere.
//!
//! ```text
//! fedsb join --server http://127.0.0.1:8080 --data my-data.tsv
//! fedsb join --server https://fedsb.example.org --data my-data.tsv
//! ```
//!
//! 1. Reads the task id from `/api/task`, connects to `ws://HOST:PORT/ws`,
//!    sends `Hello` with its participant key, reads `Welcome` (the task) and
//!    the round-0 or latest `GlobalModel`. The key (32 hex digits from the
//!    OS's random generator) is kept in
//!    `<cache-dir>/participants/<task id>-<first 16 hex digits of the data file's SHA-256>.key`
//!    (or `--participant-key-file`), so the same data joining again, after
//!    this process or the aggregator restarted, is the same participant: the
//!    aggregator keeps its id and its privacy spending, and an update it
//!    accepted before is not trained or counted again (it answers
//!    `UpdateAccepted` for that round before `RoundOpen`).
//! 2. Downloads the task's files (config.json, model.safetensors,
//!    tokenizer.json, adapter.safetensors) into `--cache-dir`, one file per
//!    SHA-256; a cached file whose hash still matches is not downloaded again,
//!    and a download whose hash differs from the announced one is refused.
//! 3. For every `RoundOpen` of a round it has not sent an update for: sets
//!    every `R` and the head to the latest global state, trains `local_steps`
//!    AdamW steps (weight decay 0.01; the head at the task's
//!    `head_learning_rate`; moments reset at the start of the
//!    round unless `--keep-moments`) on batches of `batch_size` drawn from
//!    its data (shuffled, epoch after epoch across rounds), and sends
//!    `Update { round, num_samples, train_loss, adapter }`.
//! 4. Exits 0 at `TaskFinished` (or after `--max-rounds` answered updates,
//!    or when its privacy budget is spent), printing one JSON line on stdout;
//!    progress goes to stderr. Ctrl-C or SIGTERM in the rounds finishes the
//!    round being trained, waits up to 10 s for the answers to the updates
//!    sent, sends `Leave`, prints the line with `"stopped": true` and exits
//!    130 or 143; a second signal quits at once.
//!
//! Tasks with differential privacy (`TaskInfo.privacy`: target ε, δ, clip
//! norm C): the participant calibrates σ so that all the steps it plans to
//! take (`--dp-rounds`, default the task's rounds, × `local_steps`) at
//! `q = batch_size / N` spend at most ε, trains every round with DP-SGD
//! (Poisson sampling, per-sample clipping to C, Gaussian noise, on the GPU),
//! records each round's steps in a privacy ledger (saved in the cache after
//! every round, so a restart keeps counting) and sends a `PrivacyReport` (σ,
//! q, steps, C, δ, ε spent so far) with every update, weighted by the
//! expected samples `q·N·steps`.
//! Before a round whose steps would take it past ε it refuses to train, says
//! so on stderr, sends `Leave` and exits 0 with `"budget_exhausted": true`.
//!
//! The WebSocket is read by a task of its own while the GPU trains, so pings
//! are answered and the aggregator never takes a long local round for a
//! dead participant.
//!
//! A connection lost after the handshake (the aggregator restarted, the
//! network dropped) is reopened with the same `Hello`, with pauses of 1 s
//! doubling up to 30 s, for up to `--reconnect-for` seconds (default 600; 0
//! exits at once). The aggregator must serve the same task. An update sent
//! but not answered before the loss is kept: if the aggregator has it, it
//! says so (`UpdateAccepted` before `RoundOpen`); if not, the same frame is
//! sent again at its `RoundOpen`. No round is trained twice, so no privacy
//! budget is spent twice either.
//!
//! `--server https://…` (an aggregator behind a TLS reverse proxy) uses TLS
//! for the files and `wss://` for the WebSocket (rustls), trusting Mozilla's
//! root certificates and any given with `--ca-cert` (a private CA, or the
//! proxy's self-signed certificate).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::{read_dataset_file, DataError, DataFormat, Dataset};
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::{ClassifierHead, Matrix};
use fedsb_engine::train::BatchSampler;
use fedsb_protocol::{
    AdapterState, ClientMessage, ClientUpdate, ErrorCode, FileRef, ParticipantId, RoundId,
    ServerMessage, TaskInfo, PROTOCOL_VERSION,
};
use futures_util::{SinkExt, StreamExt};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::Message;
use tracing::{info, warn};

use crate::data_args::{require_label_column, DataColumns};
use crate::dp_training::{DpTraining, LedgerFile};
use crate::privacy_cmd::AccountantArg;
use crate::signals::Signals;
use fedsb_participant::{task_adamw, LocalOptimizer, TaskModel};

/// The files a participant needs, by their names in `TaskInfo.files`.
const MODEL_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];
const ADAPTER_FILE: &str = "adapter.safetensors";

#[derive(Debug, Args)]
pub struct JoinArgs {
    /// The aggregator, e.g. http://127.0.0.1:8080 or https://fedsb.example.org
    /// (the WebSocket is /ws there).
    #[arg(long)]
    server: String,
    /// A PEM file of certificates to trust for an https:// server besides
    /// the usual public roots: a private CA, or the server's self-signed
    /// certificate (repeatable).
    #[arg(long)]
    ca_cert: Vec<PathBuf>,
    /// Local training data (.csv, .tsv or .jsonl); it never leaves this machine.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    columns: DataColumns,
    /// Where downloaded files are kept, one per SHA-256 (default:
    /// $XDG_CACHE_HOME/fedsb or ~/.cache/fedsb).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Use the GPU adapter whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
    /// A name for this participant, shown in the aggregator's logs.
    #[arg(long)]
    name: Option<String>,
    /// Leave after this many updates have been answered (accepted or
    /// rejected); at least 1.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_rounds: Option<u64>,
    /// Seed of the batch shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tasks with differential privacy: the number of rounds to spread the
    /// privacy budget over (default: all the task's rounds). Fewer rounds
    /// mean less noise per round; the participant stops once they are spent.
    #[arg(long)]
    dp_rounds: Option<u64>,
    /// Tasks with differential privacy: the accountant for σ and ε.
    #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
    accountant: AccountantArg,
    /// Tasks with differential privacy: where the steps this participant has
    /// taken are recorded, so a restart does not reset its budget (default:
    /// <cache-dir>/privacy/<task id>-<first 16 hex digits of the data file's SHA-256>.json).
    #[arg(long)]
    privacy_ledger: Option<PathBuf>,
    /// Where this participant's key is kept (created when missing): the
    /// secret that makes it the same participant to the aggregator across
    /// reconnects and restarts (default:
    /// <cache-dir>/participants/<task id>-<first 16 hex digits of the data file's SHA-256>.key).
    #[arg(long)]
    participant_key_file: Option<PathBuf>,
    /// When the connection is lost after the handshake (the aggregator
    /// restarted, the network dropped), keep trying to reconnect for this
    /// many seconds (0: exit with an error at once).
    #[arg(long, default_value_t = 600)]
    reconnect_for: u64,
    /// Carry the AdamW moments from one round into the next instead of
    /// resetting them at the start of every round (the default, as in the
    /// browser). The global `R` still replaces the local one; see README
    /// "Optimizer state across rounds".
    #[arg(long)]
    keep_moments: bool,
}

/// What the WebSocket reader hands to the training loop.
enum Event {
    Message(Box<ServerMessage>),
    /// The connection ended (with why).
    Closed(String),
}

/// What the training loop hands to the WebSocket writer.
enum Outgoing {
    Frame(Vec<u8>),
    Close,
}

/// One WebSocket connection to the aggregator: a task reads it (answering
/// pings while the GPU trains) and one writes it.
struct Link {
    events: mpsc::Receiver<Event>,
    out: tokio::sync::mpsc::UnboundedSender<Outgoing>,
    reader: tokio::task::JoinHandle<()>,
    /// `None` once closed.
    writer: Option<tokio::task::JoinHandle<()>>,
}

/// How often the participant pings the aggregator, and how long a
/// connection may stay silent (no frame, not even a pong or the server's
/// own pings) before it counts as lost and the participant reconnects: a
/// half-open connection (a NAT mapping that expired, a laptop that slept,
/// a server that froze) never ends by itself.
const CLIENT_PING: Duration = Duration::from_secs(15);
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// The longest a TCP/TLS connection and the WebSocket handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// After Ctrl-C or SIGTERM in the rounds: how long the participant waits
/// for the answers to updates it has sent before it leaves, and how often
/// it looks for the signal while it waits for the server.
const STOP_WAIT: Duration = Duration::from_secs(10);
const STOP_POLL: Duration = Duration::from_millis(200);

/// Why a handshake did not end in `Welcome`.
enum Handshake {
    /// The aggregator answered with an error that trying again will not fix.
    Refused(anyhow::Error),
    /// No answer, a connection that failed, or one that may succeed later
    /// (this participant key's previous connection is not closed yet).
    Lost(anyhow::Error),
}

impl Link {
    /// Connects and sends the `Hello` frame.
    fn open(rt: &tokio::runtime::Runtime, server: &Endpoint, hello: &[u8]) -> anyhow::Result<Self> {
        let ws_url = &server.ws_url;
        let connector = tokio_tungstenite::Connector::Rustls(server.tls.clone());
        let (ws, _) = rt
            .block_on(async {
                tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_tungstenite::connect_async_tls_with_config(
                        ws_url.as_str(),
                        None,
                        false,
                        Some(connector),
                    ),
                )
                .await
            })
            .map_err(|_| {
                anyhow::anyhow!(
                    "connecting to {ws_url}: no WebSocket handshake within {} s",
                    CONNECT_TIMEOUT.as_secs()
                )
            })?
            .with_context(|| format!("connecting to {ws_url}"))?;
        info!(url = %ws_url, "connected");
        let (mut sink, mut stream) = ws.split();
        let (event_tx, events) = mpsc::channel::<Event>();
        let reader = rt.spawn(async move {
            loop {
                let Ok(next) = tokio::time::timeout(SILENCE_LIMIT, stream.next()).await else {
                    let why = format!(
                        "no frame from the server for {} s, not even a pong: the connection is dead",
                        SILENCE_LIMIT.as_secs()
                    );
                    let _ = event_tx.send(Event::Closed(why));
                    return;
                };
                let why = match next {
                    None => "connection closed".to_owned(),
                    Some(Err(e)) => format!("connection failed: {e}"),
                    Some(Ok(Message::Binary(b))) => match ServerMessage::decode(&b) {
                        Ok(m) => {
                            if event_tx.send(Event::Message(Box::new(m))).is_err() {
                                return;
                            }
                            continue;
                        }
                        Err(e) => format!("undecodable frame from the server: {e}"),
                    },
                    Some(Ok(Message::Close(c))) => format!("closed by the server: {c:?}"),
                    // Pings are answered by tungstenite while reading.
                    Some(Ok(_)) => continue,
                };
                let _ = event_tx.send(Event::Closed(why));
                return;
            }
        });
        let (out, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Outgoing>();
        let writer = rt.spawn(async move {
            let mut ping =
                tokio::time::interval_at(tokio::time::Instant::now() + CLIENT_PING, CLIENT_PING);
            loop {
                let o = tokio::select! {
                    o = out_rx.recv() => match o {
                        Some(o) => o,
                        None => return,
                    },
                    _ = ping.tick() => {
                        // Its pong keeps the reader's silence limit away.
                        if sink.send(Message::Ping(Default::default())).await.is_err() {
                            return;
                        }
                        continue;
                    }
                };
                match o {
                    Outgoing::Frame(f) => {
                        if let Err(e) = sink.send(Message::Binary(f.into())).await {
                            warn!("sending failed: {e}");
                            return;
                        }
                    }
                    Outgoing::Close => {
                        let _ = sink.send(Message::Close(None)).await;
                        let _ = sink.flush().await;
                        return;
                    }
                }
            }
        });
        let link = Self {
            events,
            out,
            reader,
            writer: Some(writer),
        };
        link.send_frame(hello.to_vec()).context("sending Hello")?;
        Ok(link)
    }

    fn send_frame(&self, frame: Vec<u8>) -> anyhow::Result<()> {
        self.out
            .send(Outgoing::Frame(frame))
            .map_err(|_| anyhow::anyhow!("the connection is gone"))
    }

    fn send(&self, m: &ClientMessage) -> anyhow::Result<()> {
        self.send_frame(m.encode())
    }

    /// The next event, or `None` after `wait` without one.
    fn poll(&self, wait: Duration) -> anyhow::Result<Option<Event>> {
        match self.events.recv_timeout(wait) {
            Ok(e) => Ok(Some(e)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(anyhow::anyhow!("the connection reader stopped"))
            }
        }
    }

    /// The next event, waiting at most `wait` (forever with `None`).
    fn next(&self, wait: Option<Duration>) -> anyhow::Result<Event> {
        match wait {
            Some(w) => self
                .events
                .recv_timeout(w)
                .map_err(|_| anyhow::anyhow!("no message from the server within {w:?}")),
            None => self.events.recv().context("the connection reader stopped"),
        }
    }

    /// Reads the answer to `Hello`: the participant id and the task.
    fn welcome(&self) -> Result<(ParticipantId, TaskInfo), Handshake> {
        let first = match self.next(Some(Duration::from_secs(60))) {
            Ok(Event::Message(m)) => *m,
            Ok(Event::Closed(why)) => {
                return Err(Handshake::Lost(anyhow::anyhow!("{why} before Welcome")))
            }
            Err(e) => return Err(Handshake::Lost(e)),
        };
        match first {
            ServerMessage::Welcome {
                protocol_version,
                participant,
                task,
            } => {
                if protocol_version != PROTOCOL_VERSION {
                    return Err(Handshake::Refused(anyhow::anyhow!(
                        "the server speaks protocol {protocol_version}, this fedsb {PROTOCOL_VERSION}"
                    )));
                }
                Ok((participant, task))
            }
            ServerMessage::Error { code, message } => {
                let e = anyhow::anyhow!("the server refused the handshake: {code:?}: {message}");
                Err(if code == ErrorCode::AlreadyConnected {
                    Handshake::Lost(e)
                } else {
                    Handshake::Refused(e)
                })
            }
            other => Err(Handshake::Refused(anyhow::anyhow!(
                "expected Welcome, got {other:?}"
            ))),
        }
    }

    /// Closes politely (waiting up to 5 s for the close frame to go out).
    /// Closing twice does nothing more (a finished task's handle must not
    /// be awaited again: tokio panics).
    fn close(&mut self, rt: &tokio::runtime::Runtime) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let _ = self.out.send(Outgoing::Close);
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), writer).await });
        self.reader.abort();
    }
}

/// Replaces the lost connection `link` (closing it) by a new one with the
/// same `Hello` (so the same participant key), retrying with growing pauses
/// (1 s, doubling up to 30 s) for up to `window`; returns the task of the
/// new `Welcome`, which must still be `task_id`. What follows `Welcome` (the
/// global state, `UpdateAccepted` if our update is in, `RoundOpen`) is left
/// to the caller.
fn reconnect(
    link: &mut Link,
    rt: &tokio::runtime::Runtime,
    server: &Endpoint,
    hello: &[u8],
    task_id: &str,
    window: Duration,
    stop: &AtomicI32,
) -> anyhow::Result<Option<TaskInfo>> {
    link.close(rt);
    let started = Instant::now();
    let mut pause = Duration::from_secs(1);
    let mut attempts = 0u32;
    loop {
        let until = Instant::now() + pause.min(window.saturating_sub(started.elapsed()));
        while Instant::now() < until {
            if stop.load(Ordering::SeqCst) != 0 {
                return Ok(None);
            }
            std::thread::sleep(STOP_POLL.min(until.saturating_duration_since(Instant::now())));
        }
        attempts += 1;
        let why = match Link::open(rt, server, hello) {
            Ok(mut new) => match new.welcome() {
                Ok((participant, task)) if task.task_id == task_id => {
                    info!(%participant, attempts, "reconnected");
                    *link = new;
                    return Ok(Some(task));
                }
                Ok((_, task)) => {
                    new.close(rt);
                    bail!(
                        "after reconnecting, the aggregator serves task {}, not {task_id}",
                        task.task_id
                    );
                }
                Err(Handshake::Refused(e)) => {
                    new.close(rt);
                    return Err(e);
                }
                Err(Handshake::Lost(e)) => {
                    new.close(rt);
                    e
                }
            },
            Err(e) => e,
        };
        if started.elapsed() >= window {
            return Err(why.context(format!(
                "could not reconnect to {} within {} s ({attempts} attempts)",
                server.ws_url,
                window.as_secs()
            )));
        }
        info!(
            attempt = attempts,
            "reconnecting failed: {why:#}; trying again"
        );
        pause = (pause * 2).min(Duration::from_secs(30));
    }
}

/// Tallies for the final JSON line.
#[derive(Default)]
struct Summary {
    accepted_rounds: Vec<u64>,
    rejected_rounds: Vec<u64>,
    samples_accepted: u64,
    samples_trained: u64,
    steps: u64,
    finished: bool,
    budget_exhausted: bool,
    reconnects: u64,
    /// Left because of Ctrl-C or SIGTERM.
    stopped: bool,
}

/// `http://h:p` → (`http://h:p`, `ws://h:p/ws`), `https://h` → (`https://h`,
/// `wss://h/ws`); `ws://` and `wss://` URLs are accepted too.
fn server_urls(server: &str) -> anyhow::Result<(String, String)> {
    let s = server.trim().trim_end_matches('/');
    let s = s.strip_suffix("/ws").unwrap_or(s);
    let (tls, rest) = if let Some(r) = s.strip_prefix("http://").or(s.strip_prefix("ws://")) {
        (false, r)
    } else if let Some(r) = s.strip_prefix("https://").or(s.strip_prefix("wss://")) {
        (true, r)
    } else {
        bail!("--server {server}: expected http://HOST:PORT or https://HOST[:PORT]");
    };
    if rest.is_empty() {
        bail!("--server {server}: no host");
    }
    let (http, ws) = if tls {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    Ok((format!("{http}://{rest}"), format!("{ws}://{rest}/ws")))
}

/// How this participant reaches the aggregator: its HTTP base URL and
/// WebSocket URL, and whom it trusts over TLS (Mozilla's roots and the
/// `--ca-cert` certificates), the same for the files and the WebSocket.
struct Endpoint {
    http_base: String,
    ws_url: String,
    http: reqwest::Client,
    tls: std::sync::Arc<rustls::ClientConfig>,
}

impl Endpoint {
    fn new(server: &str, ca_certs: &[PathBuf]) -> anyhow::Result<Self> {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::CertificateDer;
        let (http_base, ws_url) = server_urls(server)?;
        let mut roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        // A server that stops answering mid-download fails the download
        // instead of hanging it.
        let mut http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(SILENCE_LIMIT);
        for path in ca_certs {
            let what = || format!("--ca-cert {}", path.display());
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("{}: {e}", what()))?;
            if certs.is_empty() {
                bail!("{}: no PEM certificate in the file", what());
            }
            for c in certs {
                http = http.add_root_certificate(
                    reqwest::Certificate::from_der(c.as_ref()).with_context(what)?,
                );
                roots.add(c).with_context(what)?;
            }
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS configuration")?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            http_base,
            ws_url,
            http: http.build().context("the HTTP client")?,
            tls: std::sync::Arc::new(tls),
        })
    }
}

fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("fedsb");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache").join("fedsb");
    }
    PathBuf::from(".fedsb-cache")
}

/// `<task id>-<first 16 hex digits of the data file's SHA-256>`, with the
/// task id's characters other than ASCII letters, digits, `-` and `_`
/// replaced by `_`: the stem of the per-task, per-data files in the cache.
fn task_data_stem(task_id: &str, data_sha256: &str) -> String {
    let task_name: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{task_name}-{}", &data_sha256[..16])
}

/// Reads the participant key at `path`, or creates it (16 random bytes from
/// the OS as 32 hex digits; owner-only permissions on Unix).
fn participant_key(path: &Path) -> anyhow::Result<String> {
    participant_key_with(path, |from, to| std::fs::hard_link(from, to))
}

/// [`participant_key`], publishing a new key with `link` (a hard link
/// where the file system has them).
fn participant_key_with(
    path: &Path,
    link: impl Fn(&Path, &Path) -> std::io::Result<()>,
) -> anyhow::Result<String> {
    let read = || -> anyhow::Result<Option<String>> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let key = text.trim().to_owned();
                fedsb_protocol::check_participant_key(&key).map_err(|e| {
                    anyhow::anyhow!(
                        "the participant key in {} is not valid ({e}); delete the file to make a new one",
                        path.display()
                    )
                })?;
                Ok(Some(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => {
                Err(e).with_context(|| format!("reading the participant key {}", path.display()))
            }
        }
    };
    // Reads again, for up to a second, while `again` holds for what it
    // read: another join may be writing the key (see the fallback below).
    let read_patiently = |again: fn(&anyhow::Result<Option<String>>) -> bool| {
        let mut found = read();
        for _ in 0..20 {
            if !again(&found) {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
            found = read();
        }
        found
    };
    if let Some(key) = read_patiently(|found| found.is_err())? {
        return Ok(key);
    }
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("the OS random generator failed: {e}"))?;
    let key = hex::encode(bytes);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Written whole to a file of this process's own, then linked under the
    // key's name, which fails if another participant (the same data joined
    // twice at once) linked its key first: then that key is the one, and
    // no reader ever sees half a key.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = PathBuf::from(format!(
        "{}.{}-{call}.tmp",
        path.display(),
        std::process::id()
    ));
    let write_key = |at: &Path, create_new: bool| -> std::io::Result<()> {
        let mut options = std::fs::OpenOptions::new();
        options.write(true);
        if create_new {
            options.create_new(true);
        } else {
            options.create(true).truncate(true);
        }
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut f = options.open(at)?;
        std::io::Write::write_all(&mut f, format!("{key}\n").as_bytes())?;
        f.sync_all()
    };
    let written = write_key(&tmp, false)
        .with_context(|| format!("writing the participant key {}", tmp.display()));
    let linked = written.and_then(|()| match link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => {
            // No hard links here (FAT and exFAT drives, some network
            // shares): create the key's file itself, which also only one
            // process can do; one that loses may find it half written and
            // reads it again below.
            warn!(path = %path.display(), error = %e,
                "cannot hard-link the participant key; creating its file directly");
            match write_key(path, true) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e)
                    .with_context(|| format!("creating the participant key {}", path.display())),
            }
        }
    });
    let _ = std::fs::remove_file(&tmp);
    if linked? {
        info!(path = %path.display(), "created a participant key");
        return Ok(key);
    }
    // Another process made the key first: read it.
    read_patiently(|found| !matches!(found, Ok(Some(_))))?
        .with_context(|| format!("the participant key {} vanished", path.display()))
}

fn sha256_of_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The task id the aggregator serves (`/api/task`).
async fn task_id(server: &Endpoint) -> anyhow::Result<String> {
    let v = get_json(server, "/api/task").await?;
    v.get("task_id")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("GET {}/api/task: no task_id in {v}", server.http_base))
}

/// GET `path` of the aggregator's HTTP API as JSON.
async fn get_json(server: &Endpoint, path: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", server.http_base);
    let r = server
        .http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !r.status().is_success() {
        bail!("GET {url}: HTTP {}", r.status());
    }
    r.json()
        .await
        .with_context(|| format!("GET {url}: not JSON"))
}

/// The rounds a finished task committed, from `/api/status`; `None` while
/// it runs.
async fn finished_rounds(server: &Endpoint) -> anyhow::Result<Option<u64>> {
    let v = get_json(server, "/api/status").await?;
    Ok((v["state"] == "finished").then(|| v["last_committed_round"].as_u64().unwrap_or(0)))
}

/// Downloads `file` into `cache` unless a file with its hash is there already;
/// returns its path. The hash of what arrives must be the announced one.
async fn fetch_file(
    client: &reqwest::Client,
    base: &str,
    file: &FileRef,
    cache: &Path,
) -> anyhow::Result<PathBuf> {
    let expected = file.sha256.to_ascii_lowercase();
    if expected.len() != 64 || !expected.chars().all(|c| c.is_ascii_hexdigit()) {
        bail!(
            "the server announced {} with an invalid SHA-256 {:?}",
            file.name,
            file.sha256
        );
    }
    let path = cache.join(&expected);
    if path.is_file() {
        let found = sha256_of_file(&path)?;
        if found == expected {
            info!(file = %file.name, sha256 = %expected, "cached");
            return Ok(path);
        }
        warn!(file = %file.name, "cached copy is corrupt (SHA-256 {found}); downloading again");
    }
    let url = if file.url.starts_with("http://") || file.url.starts_with("https://") {
        file.url.clone()
    } else {
        format!("{base}/{}", file.url.trim_start_matches('/'))
    };
    let started = Instant::now();
    let (mut out, resumable) = Partial::open(cache, &expected, file.size)?;
    let resumed_from = out.size;
    if resumed_from > 0 {
        info!(file = %file.name, bytes = resumed_from, of = file.size,
            "resuming the download an earlier run left");
    }
    let written: Result<u64, Transfer> = async {
        let mut started_over = false;
        loop {
            let mut attempt = 1;
            loop {
                match download_into(client, &url, file, &mut out).await {
                    Ok(()) => break,
                    Err(Transfer::Retry(e)) if attempt < DOWNLOAD_ATTEMPTS => {
                        let pause = DOWNLOAD_RETRY_PAUSE * (1 << (attempt - 1));
                        warn!(file = %file.name, bytes_so_far = out.size, attempt,
                            error = format!("{e:#}"),
                            "download interrupted; resuming in {pause:?}");
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                    }
                    Err(Transfer::Retry(e)) => {
                        return Err(Transfer::Retry(e.context(format!(
                            "downloading {} from {url} failed {DOWNLOAD_ATTEMPTS} times",
                            file.name
                        ))))
                    }
                    Err(fatal) => return Err(fatal),
                }
            }
            out.file
                .sync_all()
                .with_context(|| format!("writing {}", out.path.display()))
                .map_err(Transfer::Fatal)?;
            let (size, found) = (out.size, hex::encode(out.hasher.clone().finalize()));
            if found == expected {
                // Renamed while this process holds the partial file's lock.
                std::fs::rename(&out.path, &path)
                    .with_context(|| format!("writing {}", path.display()))
                    .map_err(Transfer::Fatal)?;
                return Ok(size);
            }
            if resumed_from > 0 && !started_over {
                // What the earlier run left may be what is wrong.
                warn!(file = %file.name, "the resumed download does not have the announced \
                    SHA-256; downloading the whole file again");
                out.restart().map_err(Transfer::Fatal)?;
                started_over = true;
                continue;
            }
            return Err(Transfer::Fatal(anyhow::anyhow!(
                "{} from {url} has SHA-256 {found} ({size} bytes), but the server announced {expected} ({} bytes): refusing it",
                file.name,
                file.size
            )));
        }
    }
    .await;
    let part = out.path.clone();
    drop(out);
    let size = written.map_err(|e| {
        // A download cut off is kept for the next run where it is the
        // cache's one partial file of this hash; anything else is removed,
        // so none piles up (a model is 90 MB).
        let (e, keep) = match e {
            Transfer::Retry(e) => (e, resumable),
            Transfer::Fatal(e) => (e, false),
        };
        if keep {
            info!(file = %file.name, part = %part.display(),
                "the part downloaded is kept: the next run resumes it");
        } else {
            let _ = std::fs::remove_file(&part);
        }
        e
    })?;
    info!(file = %file.name, bytes = size, seconds = started.elapsed().as_secs_f64(), "downloaded");
    Ok(path)
}

/// Tries a download gets before it fails; the pauses between them double
/// from [`DOWNLOAD_RETRY_PAUSE`] (1 + 2 + 4 + 8 s).
const DOWNLOAD_ATTEMPTS: u32 = 5;
const DOWNLOAD_RETRY_PAUSE: Duration = if cfg!(test) {
    Duration::from_millis(20)
} else {
    Duration::from_secs(1)
};

/// A download in progress: the bytes written so far and their hash.
struct Partial {
    file: std::fs::File,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
}

impl Partial {
    /// The partial file of the file with SHA-256 `sha256` in `cache`, and
    /// whether it outlives this process: `<sha256>.part`, locked while this
    /// process writes it, with what an earlier run left in it (hashed, to
    /// go on from its end; dropped if longer than the `announced` size);
    /// or, where another process writes that one (two participants sharing
    /// a cache) or the file system has no locks, `<sha256>.<pid>.part`, new,
    /// which the caller removes whatever happens.
    fn open(cache: &Path, sha256: &str, announced: u64) -> anyhow::Result<(Self, bool)> {
        use std::io::Read as _;
        let shared = cache.join(format!("{sha256}.part"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&shared)
            .with_context(|| format!("writing {}", shared.display()))?;
        if file.try_lock().is_ok() {
            let mut p = Self {
                file,
                path: shared,
                hasher: Sha256::new(),
                size: 0,
            };
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = p
                    .file
                    .read(&mut buf)
                    .with_context(|| format!("reading {}", p.path.display()))?;
                if n == 0 {
                    break;
                }
                p.hasher.update(&buf[..n]);
                p.size += n as u64;
            }
            if p.size > announced {
                p.restart()?;
            }
            return Ok((p, true));
        }
        let own = cache.join(format!("{sha256}.{}.part", std::process::id()));
        let file =
            std::fs::File::create(&own).with_context(|| format!("writing {}", own.display()))?;
        let p = Self {
            file,
            path: own,
            hasher: Sha256::new(),
            size: 0,
        };
        Ok((p, false))
    }

    /// Drops what was written: the server sends the file from its start.
    fn restart(&mut self) -> anyhow::Result<()> {
        use std::io::Seek;
        self.file
            .set_len(0)
            .and_then(|()| self.file.rewind())
            .with_context(|| format!("writing {}", self.path.display()))?;
        self.hasher = Sha256::new();
        self.size = 0;
        Ok(())
    }
}

/// Why a download attempt ended early.
enum Transfer {
    /// The connection failed or was cut off, or the server is briefly
    /// unavailable: worth resuming.
    Retry(anyhow::Error),
    /// The server refuses the file or sends something else: not.
    Fatal(anyhow::Error),
}

/// One attempt: asks for the bytes after those `out` holds (HTTP `Range`)
/// and appends them; a server that answers with the whole file (200) has
/// it written from the start.
async fn download_into(
    client: &reqwest::Client,
    url: &str,
    file: &FileRef,
    out: &mut Partial,
) -> Result<(), Transfer> {
    let what = || format!("downloading {} from {url}", file.name);
    let mut request = client.get(url);
    if out.size > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={}-", out.size));
    }
    let mut response = request
        .send()
        .await
        .with_context(what)
        .map_err(Transfer::Retry)?;
    let status = response.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT
        && response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(&format!("bytes {}-", out.size)));
    if !resumed {
        if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
            let e = anyhow::anyhow!("{}: the server cannot resume at byte {}", what(), out.size);
            out.restart().map_err(Transfer::Fatal)?;
            return Err(Transfer::Retry(e));
        }
        if !status.is_success() {
            let e = anyhow::anyhow!("{}: HTTP {status}", what());
            return Err(match status.as_u16() {
                502..=504 => Transfer::Retry(e),
                _ => Transfer::Fatal(e),
            });
        }
        if out.size > 0 {
            info!(file = %file.name, "the server sends the whole file again");
            out.restart().map_err(Transfer::Fatal)?;
        }
    }
    while let Some(chunk) = response
        .chunk()
        .await
        .with_context(what)
        .map_err(Transfer::Retry)?
    {
        out.size += chunk.len() as u64;
        if out.size > file.size {
            return Err(Transfer::Fatal(anyhow::anyhow!(
                "{}: the server sends more than the {} bytes it announced: refusing it",
                what(),
                file.size
            )));
        }
        out.hasher.update(&chunk);
        std::io::Write::write_all(&mut out.file, &chunk)
            .with_context(|| format!("writing {}", out.path.display()))
            .map_err(Transfer::Fatal)?;
    }
    Ok(())
}

/// The participant's half of the federated LoRA-SB initialization: the
/// summed gradients `Σ_batches ∂L_batch/∂W0` of every adapted module (task
/// order), with the published head, over `init_samples` of its examples drawn
/// as `fedsb init` draws seed examples (a shuffle seeded by `--seed`), in
/// batches of `batch_size`. Returns them and the number of examples.
#[allow(clippy::too_many_arguments)]
fn init_gradients(
    ctx: &GpuContext,
    task: &TaskInfo,
    paths: &HashMap<String, PathBuf>,
    data: &Dataset,
    seed: u64,
    init_samples: u64,
    batch_size: u32,
    head_weight: fedsb_protocol::Tensor,
    head_bias: fedsb_protocol::Tensor,
) -> anyhow::Result<(Vec<fedsb_protocol::Tensor>, u64)> {
    let read = |name: &str| -> anyhow::Result<Vec<u8>> {
        let p = &paths[name];
        std::fs::read(p).with_context(|| format!("reading {name} ({})", p.display()))
    };
    let weights = BertWeights::from_bytes(&read("config.json")?, &read("model.safetensors")?)
        .context("loading the task's model")?;
    let tokenizer = BertTokenizer::from_bytes(&read("tokenizer.json")?)
        .context("loading the task's tokenizer")?
        .with_max_length(task.max_seq_len as usize)?;
    Ok(pollster::block_on(fedsb_participant::init_gradients(
        ctx,
        task,
        &weights,
        &tokenizer,
        &data.examples,
        seed,
        init_samples,
        batch_size,
        head_weight,
        head_bias,
    ))?)
}

/// Loads the downloaded files with the same checks as a browser tab
/// ([`TaskModel::load`]).
fn load_task_files(task: &TaskInfo, paths: &HashMap<String, PathBuf>) -> anyhow::Result<TaskModel> {
    let read = |name: &str| -> anyhow::Result<Vec<u8>> {
        let p = &paths[name];
        std::fs::read(p).with_context(|| format!("reading {name} ({})", p.display()))
    };
    TaskModel::load(
        task,
        &read("config.json")?,
        &read("model.safetensors")?,
        &read("tokenizer.json")?,
        &read(ADAPTER_FILE)?,
    )
    .context("loading the task's files")
}

fn read_local_data(args: &JoinArgs, task: &TaskInfo) -> anyhow::Result<Dataset> {
    let spec = args.columns.spec(Some(task.labels.clone()));
    let data = read_dataset_file(&args.data, &spec).map_err(|e| {
        let hint = format!(
            "its labels must be the task's classes {:?} (names, or class ids 0 to {})",
            task.labels,
            task.labels.len().saturating_sub(1)
        );
        crate::data_args::reading_error(e, &args.data, Some(hint))
    })?;
    require_label_column(&data, &args.data)?;
    if data.label_names != task.labels {
        bail!(
            "{}: classes {:?} do not match the task's {:?}",
            args.data.display(),
            data.label_names,
            task.labels
        );
    }
    Ok(data)
}

/// Trains `steps` steps from `global` and returns the round's update, with
/// `opt`'s optimizer state ([`LocalOptimizer`]: AdamW moments reset every
/// round, as in the browser, unless `--keep-moments`).
#[allow(clippy::too_many_arguments)]
fn train_round(
    encoder: &mut GpuEncoder<'_>,
    loaded: &TaskModel,
    data: &Dataset,
    sampler: &mut BatchSampler,
    dp: Option<&mut DpTraining>,
    global: &AdapterState,
    steps: u32,
    opt: &mut LocalOptimizer,
    round: RoundId,
) -> anyhow::Result<ClientUpdate> {
    let started = Instant::now();
    if let Some(dp) = dp {
        let (local, report, out) = pollster::block_on(fedsb_participant::train_round_dp(
            encoder,
            &loaded.tokenizer,
            &loaded.frozen,
            &loaded.modules,
            &data.examples,
            dp,
            global,
            steps,
            opt,
            round,
        ))?;
        info!(
            %round,
            steps,
            samples = out.samples,
            train_loss = out.mean_loss,
            epsilon_spent = out.epsilon_spent,
            epsilon_budget = dp.epsilon_budget(),
            seconds = started.elapsed().as_secs_f64(),
            "local round trained with DP-SGD"
        );
        return Ok(local.into_update(round, Some(report)));
    }
    let local = pollster::block_on(fedsb_participant::train_round(
        encoder,
        &loaded.tokenizer,
        &loaded.frozen,
        &loaded.modules,
        &data.examples,
        sampler,
        global,
        steps,
        opt,
        round,
    ))?;
    let seconds = started.elapsed().as_secs_f64();
    info!(
        %round,
        steps,
        samples = local.samples,
        train_loss = local.mean_loss,
        seconds,
        samples_per_second = local.samples as f64 / seconds.max(1e-9),
        "local round trained"
    );
    Ok(local.into_update(round, None))
}

pub fn run(args: JoinArgs) -> anyhow::Result<()> {
    // The data file is checked before anything goes on the network (its
    // labels need the task's classes, so it is read after the handshake).
    if !args.data.is_file() {
        bail!("--data {}: no such file", args.data.display());
    }
    let name = args.data.display().to_string();
    if DataFormat::from_file_name(&name).is_none() {
        return Err(DataError::UnknownFormat { file: name }.into());
    }
    let server = Endpoint::new(&args.server, &args.ca_cert)?;
    let (http_base, http) = (&server.http_base, &server.http);
    let cache = args.cache_dir.clone().unwrap_or_else(default_cache_dir);
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("creating the cache directory {}", cache.display()))?;
    // The network runs on the runtime's threads; the GPU work on this one.
    let rt = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    let key_path = match &args.participant_key_file {
        Some(p) => p.clone(),
        None => {
            let task_id = rt.block_on(task_id(&server))?;
            let data_hash = sha256_of_file(&args.data)?;
            cache
                .join("participants")
                .join(format!("{}.key", task_data_stem(&task_id, &data_hash)))
        }
    };
    let key = participant_key(&key_path)?;

    let client = format!(
        "fedsb-join/{}{}",
        env!("CARGO_PKG_VERSION"),
        args.name
            .as_deref()
            .map_or(String::new(), |n| format!(" {n}"))
    );
    let hello = ClientMessage::Hello {
        protocol_version: PROTOCOL_VERSION,
        client,
        participant_key: Some(key),
    }
    .encode();
    let mut link = Link::open(&rt, &server, &hello)?;
    let (participant, task) = match link.welcome() {
        Ok(w) => w,
        Err(Handshake::Refused(e) | Handshake::Lost(e)) => return Err(e),
    };
    info!(
        %participant,
        task = %task.task_id,
        model = %task.model_id,
        rank = task.shape.rank,
        modules = task.shape.modules,
        labels = ?task.labels,
        total_rounds = task.total_rounds,
        "joined"
    );
    let mut task = task;
    // A finished task trains nothing: say so before downloading its model.
    if let Some(rounds) = rt.block_on(finished_rounds(&server))? {
        info!(rounds, "the task has finished; nothing to train");
        link.close(&rt);
        rt.shutdown_timeout(Duration::from_secs(1));
        let summary = Summary {
            finished: true,
            ..Summary::default()
        };
        println!("{}", summary.json(participant, &task.task_id, None)?);
        return Ok(());
    }
    // A task without an adapter file starts with a federated initialization
    // (an `InitRequest` follows `Welcome`); otherwise it cannot be trained.
    let federated_init = !task.files.iter().any(|f| f.name == ADAPTER_FILE);
    for name in MODEL_FILES {
        if !task.files.iter().any(|f| f.name == name) {
            bail!(
                "task {} serves no {name}: the operator must set `[model] dir` to a Hugging Face model directory",
                task.task_id
            );
        }
    }
    let data = read_local_data(&args, &task)?;
    info!(
        examples = data.len(),
        file = %args.data.display(),
        "local data (it stays here)"
    );

    // Files, by hash.
    let mut paths = HashMap::new();
    for name in MODEL_FILES {
        let f = task
            .files
            .iter()
            .find(|f| f.name == name)
            .expect("checked above");
        let p = rt.block_on(fetch_file(http, http_base, f, &cache))?;
        paths.insert(name.to_owned(), p);
    }
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: args.adapter.as_deref(),
    }))?;
    info!(adapter = %ctx.adapter_name(), "GPU");

    let mut summary = Summary::default();
    if federated_init {
        let first = match link.next(Some(Duration::from_secs(60)))? {
            Event::Message(m) => *m,
            Event::Closed(why) => bail!("{why} before the initialization request"),
        };
        if !matches!(
            first,
            ServerMessage::InitRequest { .. } | ServerMessage::InitAccepted { .. }
        ) {
            bail!(
                "task {} serves no LoRA-SB adapter file (A and B) and does not initialize them federatedly \
                 (it sent {} instead of init_request), so participants cannot train it: \
                 the operator must run `fedsb init --model <dir> --train <seed data> --out adapter.safetensors` \
                 and set `[adapter] file = \"adapter.safetensors\"`, or set `[adapter] init = \"federated\"`, \
                 in the task configuration",
                task.task_id,
                first.kind()
            );
        }
        // The gradient frames, kept with the request they answer: an
        // aggregator that restarted asks again with the same request, and
        // gets the same frames without computing them again.
        let mut answered: Option<(ServerMessage, Vec<ClientMessage>)> = None;
        // Whether the initialization turned our gradients away for having
        // as many participants as it takes: we wait for its adapter file.
        let mut left_out = false;
        let mut next_msg = Some(first);
        let file = loop {
            let msg = match next_msg.take() {
                Some(m) => m,
                None => match link.next(None)? {
                    Event::Message(m) => *m,
                    Event::Closed(why) => {
                        if args.reconnect_for == 0 {
                            bail!("{why} during the federated initialization");
                        }
                        warn!("{why} during the federated initialization; reconnecting for up to {} s", args.reconnect_for);
                        // Signals are the default ones until the rounds.
                        let t = reconnect(
                            &mut link,
                            &rt,
                            &server,
                            &hello,
                            &task.task_id,
                            Duration::from_secs(args.reconnect_for),
                            &AtomicI32::new(0),
                        )?
                        .expect("no stop without a signal handler");
                        summary.reconnects += 1;
                        // Finished meanwhile: the adapter file is in the task.
                        if let Some(f) = t.files.into_iter().find(|f| f.name == ADAPTER_FILE) {
                            break f;
                        }
                        continue;
                    }
                },
            };
            match msg {
                request @ ServerMessage::InitRequest { .. } => {
                    let frames = match answered.take() {
                        Some((asked, frames)) if asked == request => {
                            info!("the aggregator asks for the initialization gradients again; sending the same ones");
                            frames
                        }
                        _ => {
                            let ServerMessage::InitRequest {
                                init_samples,
                                batch_size,
                                head_weight,
                                head_bias,
                            } = request.clone()
                            else {
                                unreachable!("matched above")
                            };
                            let started = Instant::now();
                            let (gradients, samples) = init_gradients(
                                &ctx,
                                &task,
                                &paths,
                                &data,
                                args.seed,
                                init_samples,
                                batch_size,
                                head_weight,
                                head_bias,
                            )?;
                            info!(
                                samples,
                                seconds = started.elapsed().as_secs_f64(),
                                "initialization gradients computed; sending them"
                            );
                            fedsb_participant::init_frames(gradients, samples)
                        }
                    };
                    // A connection lost meanwhile shows as the next event.
                    for frame in &frames {
                        if link.send(frame).is_err() {
                            break;
                        }
                    }
                    answered = Some((request, frames));
                }
                ServerMessage::InitAccepted { num_samples } => {
                    info!(num_samples, "initialization gradients accepted");
                }
                ServerMessage::Error {
                    code: ErrorCode::RoundFull,
                    message,
                } => {
                    if !left_out {
                        info!(%message, "the initialization has as many participants as it takes; waiting for its adapter file, then training in the rounds");
                    }
                    left_out = true;
                }
                // Our InitDone, after every gradient was turned away.
                ServerMessage::Error {
                    code: ErrorCode::NotInitializing,
                    ..
                } if left_out => {}
                ServerMessage::Error { code, message } => bail!(
                    "the server rejected our initialization gradients: {}: {message}",
                    code.as_str()
                ),
                ServerMessage::AdapterReady { file } => break file,
                other => warn!("ignoring {other:?} during the initialization"),
            }
        };
        info!(sha256 = %file.sha256, size = file.size, "the adapter file is ready");
        task.files.retain(|f| f.name != ADAPTER_FILE);
        task.files.push(file);
    }
    let adapter_ref = task
        .files
        .iter()
        .find(|f| f.name == ADAPTER_FILE)
        .expect("present or added by the initialization");
    let p = rt.block_on(fetch_file(http, http_base, adapter_ref, &cache))?;
    paths.insert(ADAPTER_FILE.to_owned(), p);
    let loaded = load_task_files(&task, &paths)?;

    let zero_head = ClassifierHead {
        weight: Matrix::zeros(task.labels.len(), loaded.weights.config.hidden_size),
        bias: vec![0.0; task.labels.len()],
    };
    let mut encoder = GpuEncoder::new(
        &ctx,
        &loaded.weights,
        Some(&loaded.frozen),
        Some(&zero_head),
    )?;
    let mut opt = LocalOptimizer::new(task_adamw(&task)?, args.keep_moments);
    let mut sampler = BatchSampler::new(data.len(), task.batch_size as usize, args.seed);
    let dp = match &task.privacy {
        Some(policy) => {
            let rounds = args.dp_rounds.unwrap_or(task.total_rounds);
            if rounds == 0 {
                bail!("--dp-rounds must be at least 1");
            }
            let planned = rounds.saturating_mul(u64::from(task.local_steps));
            let mut dp = DpTraining::calibrate(
                policy,
                data.len(),
                task.batch_size as usize,
                planned,
                args.accountant.into(),
            )
            .with_context(|| {
                format!(
                    "task {} uses differential privacy (ε = {}, δ = {}, C = {})",
                    task.task_id, policy.epsilon, policy.delta, policy.clip_norm
                )
            })?;
            let ledger_path = match &args.privacy_ledger {
                Some(p) => p.clone(),
                None => {
                    let data_hash = sha256_of_file(&args.data)?;
                    cache.join("privacy").join(format!(
                        "{}.json",
                        task_data_stem(&task.task_id, &data_hash)
                    ))
                }
            };
            if dp.load_ledger(&ledger_path)? {
                info!(
                    ledger = %ledger_path.display(),
                    steps = dp.steps_taken(),
                    epsilon_spent = dp.epsilon_spent()?,
                    "privacy ledger of earlier runs on this data"
                );
            }
            info!(
                epsilon = policy.epsilon,
                delta = policy.delta,
                clip_norm = policy.clip_norm,
                noise_multiplier = dp.config.noise_multiplier,
                sample_rate = dp.config.sample_rate,
                planned_steps = planned,
                rounds,
                accountant = %dp.accountant(),
                "differential privacy: DP-SGD with σ calibrated for the planned steps"
            );
            Some((dp, ledger_path))
        }
        None => None,
    };
    let (mut dp, ledger_path) = match dp {
        Some((d, p)) => (Some(d), Some(p)),
        None => (None, None),
    };

    let mut global: Option<(RoundId, AdapterState)> = None;
    let mut submitted: BTreeSet<RoundId> = BTreeSet::new();
    // Updates sent on this connection that await an answer: round, sample
    // count and the frame (kept to send again after a reconnect).
    let mut awaiting: Vec<(RoundId, u64, Vec<u8>)> = Vec::new();
    // Updates sent on a connection that was lost before they were answered:
    // the aggregator may have accepted them (then it says so with
    // `UpdateAccepted` after the reconnect) or not (then its `RoundOpen`
    // comes first and the same frame is sent again, without training again).
    let mut unanswered: BTreeMap<RoundId, (u64, Vec<u8>)> = BTreeMap::new();
    let mut leave = false;
    // The answer to the centring request, kept with the request: asked
    // again after a reconnect, the same frame is sent again.
    let mut centred: Option<(ServerMessage, ClientMessage)> = None;
    // From here on, Ctrl-C or SIGTERM stops training (a round in progress
    // is finished and sent: its privacy is spent), waits up to STOP_WAIT
    // for the answers to the updates sent, sends `Leave` and exits with the
    // signal's status after the summary; a second signal quits at once.
    let stop = Arc::new(AtomicI32::new(0));
    {
        let _runtime = rt.enter();
        let mut signals = Signals::new();
        let stop = Arc::clone(&stop);
        rt.spawn(async move {
            let (first, status) = signals.next().await;
            warn!(
                signal = first,
                "stopping: leaving the task after the round in training, if any, and \
                 the answers to the updates sent (a second signal quits at once)"
            );
            stop.store(status, Ordering::SeqCst);
            let (second, status) = signals.next().await;
            warn!(signal = second, "second signal: exiting now");
            std::process::exit(status);
        });
    }
    let mut stopping: Option<Instant> = None;
    let outcome: anyhow::Result<()> = loop {
        if stopping.is_none() && stop.load(Ordering::SeqCst) != 0 {
            stopping = Some(Instant::now());
        }
        if let Some(since) = stopping {
            if awaiting.is_empty() || since.elapsed() >= STOP_WAIT {
                if !awaiting.is_empty() {
                    warn!(
                        updates = awaiting.len(),
                        "leaving without the aggregator's answer to the updates sent"
                    );
                }
                let _ = link.send(&ClientMessage::Leave {
                    reason: "stopped by a signal".into(),
                });
                summary.stopped = true;
                break Ok(());
            }
        }
        let event = match link.poll(STOP_POLL) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => break Err(e),
        };
        let msg = match event {
            Event::Message(m) => *m,
            Event::Closed(why) if stopping.is_some() => {
                warn!("{why} while stopping");
                summary.stopped = true;
                break Ok(());
            }
            Event::Closed(why) => {
                if args.reconnect_for == 0 {
                    break Err(anyhow::anyhow!("{why} before the task finished"));
                }
                warn!("{why}; reconnecting for up to {} s", args.reconnect_for);
                match reconnect(
                    &mut link,
                    &rt,
                    &server,
                    &hello,
                    &task.task_id,
                    Duration::from_secs(args.reconnect_for),
                    &stop,
                ) {
                    Ok(Some(_)) => {}
                    // Stopped while reconnecting: nobody to leave.
                    Ok(None) => {
                        summary.stopped = true;
                        break Ok(());
                    }
                    Err(e) => break Err(e),
                }
                summary.reconnects += 1;
                for (round, samples, frame) in awaiting.drain(..) {
                    submitted.remove(&round);
                    unanswered.insert(round, (samples, frame));
                }
                continue;
            }
        };
        match msg {
            ServerMessage::GlobalModel {
                round,
                participants,
                adapter,
                ..
            } => {
                if let Err(e) = adapter.validate(&task.shape) {
                    break Err(anyhow::anyhow!(
                        "the global state of round {round} does not fit the task: {e}"
                    ));
                }
                info!(%round, participants, "global state");
                global = Some((round, adapter));
            }
            ServerMessage::RoundOpen {
                round,
                local_steps,
                learning_rate,
                ..
            } => {
                if submitted.contains(&round) {
                    info!(%round, "round extended; our update is already in");
                    continue;
                }
                if stopping.is_some() {
                    continue;
                }
                // Updates of earlier rounds lost with a connection: those
                // rounds committed without them.
                let stale: Vec<RoundId> = unanswered.range(..round).map(|(r, _)| *r).collect();
                for r in stale {
                    warn!(round = %r, "our update was lost with the connection and its round is closed");
                    unanswered.remove(&r);
                    summary.rejected_rounds.push(r.0);
                }
                if let Some((samples, frame)) = unanswered.remove(&round) {
                    info!(%round, "the aggregator does not have our update; sending it again");
                    if let Err(e) = link.send_frame(frame.clone()) {
                        warn!("{e}; the update is sent again after the next reconnect");
                    }
                    submitted.insert(round);
                    awaiting.push((round, samples, frame));
                    continue;
                }
                let Some((from, state)) = &global else {
                    warn!(%round, "round opened before any global state; waiting");
                    continue;
                };
                info!(%round, from = %from, local_steps, learning_rate, "training");
                let steps = if local_steps > 0 {
                    local_steps
                } else {
                    task.local_steps
                };
                if let Err(e) = opt.set_learning_rate(learning_rate) {
                    break Err(anyhow::anyhow!("round {round}: {e}"));
                }
                if let Some(dp) = &dp {
                    let check = match dp.check(u64::from(steps)) {
                        Ok(c) => c,
                        Err(e) => break Err(e.into()),
                    };
                    if !check.within_budget {
                        let message = dp.exhausted_message(&check, round, steps);
                        warn!("{message}");
                        eprintln!("fedsb join: {message}");
                        summary.budget_exhausted = true;
                        let _ = link.send(&ClientMessage::Leave {
                            reason: "privacy budget exhausted".into(),
                        });
                        break Ok(());
                    }
                }
                let local = train_round(
                    &mut encoder,
                    &loaded,
                    &data,
                    &mut sampler,
                    dp.as_mut(),
                    state,
                    steps,
                    &mut opt,
                    round,
                );
                // Steps taken are spent, whether or not the round succeeded.
                if let (Some(dp), Some(path)) = (&dp, &ledger_path) {
                    if let Err(e) = dp.save_ledger(path) {
                        break Err(e);
                    }
                }
                let local = match local {
                    Ok(update) => update,
                    Err(e) => break Err(e),
                };
                let samples = local.num_samples;
                summary.samples_trained += samples;
                summary.steps += u64::from(steps);
                let update = ClientMessage::Update(local).encode();
                // A connection lost while training is noticed as the next
                // event; the update is kept and sent again after the reconnect.
                if let Err(e) = link.send_frame(update.clone()) {
                    warn!("{e}; the update is sent again after the reconnect");
                }
                submitted.insert(round);
                awaiting.push((round, samples, update));
            }
            ServerMessage::UpdateAccepted { round } => {
                if let Some(i) = awaiting.iter().position(|(r, _, _)| *r == round) {
                    info!(%round, "update accepted");
                    let (_, samples, _) = awaiting.remove(i);
                    summary.accepted_rounds.push(round.0);
                    summary.samples_accepted += samples;
                } else if let Some((samples, _)) = unanswered.remove(&round) {
                    info!(%round, "our update sent before the reconnect was accepted");
                    submitted.insert(round);
                    summary.accepted_rounds.push(round.0);
                    summary.samples_accepted += samples;
                } else if submitted.insert(round) {
                    // Sent before this connection (we, or the aggregator,
                    // restarted since): it counts; do not train the round.
                    info!(%round, "our update for this round was accepted before we connected");
                    summary.accepted_rounds.push(round.0);
                }
                leave = args
                    .max_rounds
                    .is_some_and(|m| submitted.len() as u64 >= m && awaiting.is_empty());
            }
            ServerMessage::Error { code, message } => {
                if code == ErrorCode::VersionMismatch {
                    break Err(anyhow::anyhow!("the server refused us: {message}"));
                }
                warn!(code = code.as_str(), %message, "the server rejected a message");
                // Errors answer our messages in order: this one is about the
                // oldest update still awaiting an answer, if any.
                if !awaiting.is_empty() {
                    let (round, _, _) = awaiting.remove(0);
                    summary.rejected_rounds.push(round.0);
                }
                if code == ErrorCode::InvalidPrivacyReport {
                    // Our DP training does not fit the task (the aggregator
                    // accounts more ε for our key than the budget allows, or
                    // another policy): every later update would be refused
                    // too, and would spend privacy for nothing.
                    let _ = link.send(&ClientMessage::Leave {
                        reason: "privacy report refused".into(),
                    });
                    break Err(anyhow::anyhow!(
                        "the aggregator refused our update's privacy report, so this \
                         participant stops: {message}"
                    ));
                }
                leave = args
                    .max_rounds
                    .is_some_and(|m| submitted.len() as u64 >= m && awaiting.is_empty());
            }
            ServerMessage::TaskFinished { rounds_committed } => {
                info!(rounds_committed, "task finished");
                summary.finished = true;
                break Ok(());
            }
            ServerMessage::Welcome { .. } => {
                warn!("ignoring a second Welcome");
            }
            ServerMessage::CentreRequest { .. } if stopping.is_some() => {}
            request @ ServerMessage::CentreRequest { .. } => {
                let answer = match centred.take() {
                    Some((asked, answer)) if asked == request => {
                        info!(
                            "the aggregator asks for the logit sums again; sending the same ones"
                        );
                        answer
                    }
                    _ => {
                        let ServerMessage::CentreRequest {
                            init_samples,
                            batch_size,
                            adapter,
                        } = &request
                        else {
                            unreachable!("matched above")
                        };
                        match pollster::block_on(fedsb_participant::centre_logits(
                            &mut encoder,
                            &loaded.tokenizer,
                            &loaded.frozen,
                            &loaded.modules,
                            &data.examples,
                            args.seed,
                            *init_samples,
                            *batch_size,
                            adapter,
                        )) {
                            Ok(m) => m,
                            Err(e) => break Err(anyhow::anyhow!("centring the initial head: {e}")),
                        }
                    }
                };
                if let ClientMessage::CentreLogits {
                    logit_sums,
                    num_samples,
                } = &answer
                {
                    info!(num_samples, logit_sums = ?logit_sums.data, "sending the logit sums of the initial model for centring its head");
                }
                // A connection lost meanwhile shows as the next event.
                let _ = link.send(&answer);
                centred = Some((request, answer));
            }
            ServerMessage::CentreAccepted { num_samples } => {
                info!(num_samples, "logit sums accepted; waiting for round 0");
            }
            m @ (ServerMessage::InitRequest { .. }
            | ServerMessage::InitAccepted { .. }
            | ServerMessage::AdapterReady { .. }) => {
                warn!("ignoring an initialization message after the initialization: {m:?}");
            }
        }
        if leave {
            info!("leaving after --max-rounds updates");
            let _ = link.send(&ClientMessage::Leave {
                reason: "max rounds reached".into(),
            });
            break Ok(());
        }
    };

    // Close the connection politely, then report.
    link.close(&rt);
    rt.shutdown_timeout(Duration::from_secs(1));
    outcome?;
    println!("{}", summary.json(participant, &task.task_id, dp.as_ref())?);
    if summary.stopped {
        // 130 after SIGINT, 143 after SIGTERM, as if the signal had ended it.
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        std::process::exit(stop.load(Ordering::SeqCst));
    }
    Ok(())
}

impl Summary {
    /// The JSON line `fedsb join` ends with.
    fn json(
        &self,
        participant: ParticipantId,
        task_id: &str,
        dp: Option<&DpTraining>,
    ) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::json!({
            "participant": participant.0,
            "task_id": task_id,
            "finished": self.finished,
            "rounds_participated": self.accepted_rounds.len(),
            "rounds": self.accepted_rounds,
            "rounds_rejected": self.rejected_rounds,
            "samples": self.samples_accepted,
            "samples_trained": self.samples_trained,
            "reconnects": self.reconnects,
            "steps": self.steps,
            "budget_exhausted": self.budget_exhausted,
            "stopped": self.stopped,
            "epsilon_spent": dp.map(|d| d.epsilon_spent()).transpose()?,
            "noise_multiplier": dp.map(|d| d.config.noise_multiplier),
            "sample_rate": dp.map(|d| d.config.sample_rate),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_participant_key_is_made_once_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir
            .path()
            .join("participants")
            .join("t-0123456789abcdef.key");
        let key = participant_key(&path).unwrap();
        assert_eq!(key.len(), 32);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()), "{key}");
        assert_eq!(participant_key(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Another file, another key.
        let other = participant_key(&dir.path().join("other.key")).unwrap();
        assert_ne!(other, key);
        // A damaged key file is an error naming the file, not a silent new key.
        std::fs::write(&path, "not a key!\n").unwrap();
        let err = participant_key(&path).unwrap_err().to_string();
        assert!(err.contains("t-0123456789abcdef.key"), "{err}");
        assert!(err.contains("delete the file"), "{err}");
    }

    /// Participants that make the same key file at once all end with the
    /// one key that was written first, whole; no temporary file stays.
    /// Where the file system has no hard links, the key's file is created
    /// directly: still one key, made once and shared by joins racing to
    /// make it.
    #[test]
    fn keys_are_made_without_hard_links_too() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("participants").join("fat.key");
        let no_links =
            |_: &Path, _: &Path| Err(std::io::Error::from(std::io::ErrorKind::Unsupported));
        let key = participant_key_with(&path, no_links).unwrap();
        assert_eq!(participant_key_with(&path, no_links).unwrap(), key);
        assert_eq!(participant_key(&path).unwrap(), key);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        for round in 0..20 {
            let path = dir.path().join(format!("race-{round}.key"));
            let keys: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| participant_key_with(&path, no_links).unwrap()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(keys.iter().all(|k| *k == keys[0]), "{keys:?}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn participants_making_one_key_at_once_share_it() {
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("k").join("t.key");
            let keys: Vec<String> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| participant_key(&path).unwrap()))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
            assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), keys[0]);
            let names: Vec<_> = std::fs::read_dir(dir.path().join("k"))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["t.key"]);
        }
    }

    #[test]
    fn task_data_stems_are_file_name_safe() {
        let hash = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        assert_eq!(
            task_data_stem("sst2-demo", hash),
            "sst2-demo-0123456789abcdef"
        );
        assert_eq!(task_data_stem("a/b c", hash), "a_b_c-0123456789abcdef");
    }

    /// Serves `body` at `/files/x` on a free port; returns the base URL.
    async fn serve_once(body: &'static [u8]) -> String {
        let app =
            axum::Router::new().route("/files/x", axum::routing::get(move || async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    /// A file server whose first answer stops after `cut` bytes of `body`
    /// (`cut_every`: every answer does); later ones honour `Range` when
    /// `ranges`, or send the whole file. Returns its URL and the `Range`
    /// header of each request ("" without one).
    async fn cutting_server(
        body: &'static [u8],
        cut: usize,
        ranges: bool,
        cut_every: bool,
    ) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let from: Option<usize> = head
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().trim_end_matches('-').parse().ok());
                log.lock()
                    .unwrap()
                    .push(from.map_or(String::new(), |f| format!("bytes={f}-")));
                let len = body.len();
                let (status, start) = match from {
                    Some(f) if ranges => (
                        format!(
                            "206 Partial Content\r\nContent-Range: bytes {f}-{}/{len}",
                            len - 1
                        ),
                        f,
                    ),
                    _ => ("200 OK".to_owned(), 0),
                };
                let rest = &body[start..];
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    rest.len()
                );
                let _ = sock.write_all(reply.as_bytes()).await;
                let send = if n == 0 || cut_every {
                    &rest[..cut.min(rest.len())]
                } else {
                    rest
                };
                let _ = sock.write_all(send).await;
                let _ = sock.shutdown().await;
                n += 1;
            }
        });
        (format!("http://{addr}"), seen)
    }

    /// A download cut off is resumed where it stopped (or started again by
    /// a server without ranges), and gives up after the set attempts.
    #[tokio::test]
    async fn interrupted_downloads_resume() {
        const BODY: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let sha = hex::encode(Sha256::digest(BODY));
        let client = reqwest::Client::new();
        for ranges in [true, false] {
            let cache = tempfile::tempdir().unwrap();
            let (base, seen) = cutting_server(BODY, 10, ranges, false).await;
            let path = fetch_file(&client, &base, &file_ref(sha.clone(), 36), cache.path())
                .await
                .unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), BODY, "ranges: {ranges}");
            assert_eq!(*seen.lock().unwrap(), ["", "bytes=10-"], "ranges: {ranges}");
            assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
        }
        // Cut off every time: the error says so; the part is kept, and the
        // next run (a server that sends it all) resumes it.
        let cache = tempfile::tempdir().unwrap();
        let (base, seen) = cutting_server(BODY, 4, true, true).await;
        let e = fetch_file(&client, &base, &file_ref(sha.clone(), 36), cache.path())
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("failed 5 times"), "{e:#}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["", "bytes=4-", "bytes=8-", "bytes=12-", "bytes=16-"]
        );
        let part = cache.path().join(format!("{sha}.part"));
        assert_eq!(std::fs::read(&part).unwrap(), &BODY[..20]);
        let (base, seen) = cutting_server(BODY, usize::MAX, true, false).await;
        let path = fetch_file(&client, &base, &file_ref(sha.clone(), 36), cache.path())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), BODY);
        assert_eq!(*seen.lock().unwrap(), ["bytes=20-"]);
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 1);
    }

    /// What an earlier run left that is not the start of the file (a disk
    /// error, another file's bytes) is found by the hash and downloaded
    /// again whole, once; a part longer than announced is dropped; a part
    /// another process is writing is left alone (this one downloads into
    /// a part of its own, removed when done).
    #[tokio::test]
    async fn parts_left_by_earlier_runs_are_checked() {
        const BODY: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let sha = hex::encode(Sha256::digest(BODY));
        let client = reqwest::Client::new();
        let cache = tempfile::tempdir().unwrap();
        let part = cache.path().join(format!("{sha}.part"));
        for (left, requests) in [
            (&b"0123XXXX"[..], &["bytes=8-", ""][..]),
            (&[b'0'; 40][..], &[""][..]),
        ] {
            std::fs::write(&part, left).unwrap();
            let (base, seen) = cutting_server(BODY, usize::MAX, true, false).await;
            let path = fetch_file(&client, &base, &file_ref(sha.clone(), 36), cache.path())
                .await
                .unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), BODY);
            assert_eq!(*seen.lock().unwrap(), requests);
            assert!(!part.exists());
            std::fs::remove_file(&path).unwrap();
        }
        // Another process's part, locked: untouched.
        std::fs::write(&part, b"0123").unwrap();
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&part)
            .unwrap();
        other.try_lock().unwrap();
        let (base, seen) = cutting_server(BODY, usize::MAX, true, false).await;
        let path = fetch_file(&client, &base, &file_ref(sha.clone(), 36), cache.path())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), BODY);
        assert_eq!(*seen.lock().unwrap(), [""]);
        assert_eq!(std::fs::read(&part).unwrap(), b"0123");
        assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 2);
    }

    fn file_ref(sha256: String, size: u64) -> FileRef {
        FileRef {
            name: "model.safetensors".into(),
            sha256,
            size,
            url: "/files/x".into(),
        }
    }

    #[tokio::test]
    async fn downloads_are_verified_cached_and_mismatches_refused() {
        let cache = tempfile::tempdir().unwrap();
        let base = serve_once(b"the real bytes").await;
        let client = reqwest::Client::new();

        let right = hex::encode(Sha256::digest(b"the real bytes"));
        let path = fetch_file(&client, &base, &file_ref(right.clone(), 14), cache.path())
            .await
            .unwrap();
        assert_eq!(path, cache.path().join(&right));
        assert_eq!(std::fs::read(&path).unwrap(), b"the real bytes");
        // Cached: served from disk even when the server is unreachable.
        let again = fetch_file(
            &client,
            "http://127.0.0.1:9",
            &file_ref(right.clone(), 14),
            cache.path(),
        )
        .await
        .unwrap();
        assert_eq!(again, path);
        // A corrupt cached copy is fetched again.
        std::fs::write(&path, b"bit rot").unwrap();
        fetch_file(&client, &base, &file_ref(right.clone(), 14), cache.path())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"the real bytes");

        // The server's bytes do not have the announced hash: refused, nothing kept.
        let other = hex::encode(Sha256::digest(b"other bytes"));
        let e = fetch_file(&client, &base, &file_ref(other.clone(), 14), cache.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("refusing") && e.contains(&right) && e.contains(&other),
            "{e}"
        );
        // Nor are more bytes than announced.
        let e = fetch_file(&client, &base, &file_ref(other.clone(), 11), cache.path())
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than the 11 bytes it announced"), "{e}");
        assert!(!cache.path().join(&other).exists());
        let leftovers = std::fs::read_dir(cache.path()).unwrap().count();
        assert_eq!(leftovers, 1, "only the verified file stays in the cache");
        let e = fetch_file(&client, &base, &file_ref("abc".into(), 1), cache.path())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("invalid SHA-256"), "{e}");
    }

    #[test]
    fn server_urls_accept_http_and_ws() {
        assert_eq!(
            server_urls("http://127.0.0.1:8080/").unwrap(),
            (
                "http://127.0.0.1:8080".to_owned(),
                "ws://127.0.0.1:8080/ws".to_owned()
            )
        );
        assert_eq!(
            server_urls("ws://h:1/ws").unwrap().0,
            "http://h:1".to_owned()
        );
        assert_eq!(
            server_urls("https://fedsb.example.org/").unwrap(),
            (
                "https://fedsb.example.org".to_owned(),
                "wss://fedsb.example.org/ws".to_owned()
            )
        );
        assert_eq!(
            server_urls("wss://h:8443/ws").unwrap().0,
            "https://h:8443".to_owned()
        );
        assert!(server_urls("h:1")
            .unwrap_err()
            .to_string()
            .contains("expected http://HOST:PORT or https://"));
        assert!(server_urls("https://").is_err());
    }
}
