//! `fedsb serve`: the HTTP and WebSocket server.
//!
//! | path | what |
//! |---|---|
//! | `/` | the `www/` page |
//! | `/ws` | the participant WebSocket (protocol in `docs/protocol.md`) |
//! | `/api/status` | JSON: round, state, participants, deadline, ε spent per participant (DP tasks) |
//! | `/api/task` | JSON: the task as participants see it (`TaskInfo`) |
//! | `/api/rounds` | JSON: every committed round with its evaluation (`eval`, null until done) and the participants' `learning_rate` (null for round 0) |
//! | `/api/demo`, `/api/demo-shard` | the demo data's shard size; the next shard of it (round-robin), as a file |
//! | `/api/eval` | JSON: the evaluation set (rows, GPU adapter), or `enabled: false` |
//! | `/api/events` | Server-Sent Events: `status` on every change, `eval` per finished evaluation |
//! | `/api/rounds/{n}/global` | the committed `GlobalModel` frame of round n |
//! | `/api/rounds/{n}/adapter` | round n's model as an adapter file (`fedsb export`'s bytes) |
//! | `/files/{sha256}` | model and adapter files, immutable, cached by hash (500 once changed on disk) |
//! | `/metrics` | Prometheus text format |

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use fedsb_protocol::{AdapterState, FileRef, RoundId, TaskInfo, MAX_FRAME_BYTES};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::set_header::SetResponseHeaderLayer;
use tracing::{error, info, warn};

use crate::config::AdapterInit;
use crate::config::Config;
use crate::coordinator::{
    initial_frame, now_unix_ms, Begin, Coordinator, CoordinatorHandle, FederatedInit, Status,
};
use crate::evaluator::{EvalError, EvalHandle, PreparedEval};
use crate::files::{
    check_pins, collect_files, hash_file_stamped, initial_adapter, served_adapter_file, FileError,
    FileStamp, ServedFile, ADAPTER_FILE, MODEL_FILE,
};
use crate::init_round::{InitModules, SharedFiles};
use crate::metrics::Metrics;
use crate::store::{CommittedRound, RoundMeta, RoundSummary, Store, StoreError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Files(#[from] FileError),
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error("demo.data {path}: {message}")]
    Demo {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "www_dir {path} is not a directory: set [server] www_dir (or --www-dir) to the \
         page's directory, www/ of the fedsb repository"
    )]
    WwwDir { path: PathBuf },
    #[error("server failed")]
    Io(#[from] std::io::Error),
    #[error("federated initialization: {0}")]
    Init(String),
}

/// Where `[server] www_dir` came from, which decides what a missing one does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WwwDir {
    /// Named by `[server] www_dir`, its environment variable or
    /// `--www-dir`: a missing directory is refused.
    Given,
    /// The default (`www` beside the configuration): a missing directory
    /// is warned about and the server runs without its page (`/api/*`,
    /// `/ws` and `/files/*` are all a native participant needs).
    Default,
}

/// How long a shutdown waits for open requests before the server exits
/// without them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Shared state of every request handler.
#[derive(Debug)]
pub struct App {
    pub config: Arc<Config>,
    pub task: Arc<TaskInfo>,
    pub coordinator: CoordinatorHandle,
    pub status: watch::Receiver<Status>,
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// The per-round evaluator, when `[eval] file` is set.
    pub eval: Option<EvalHandle>,
    /// Demo data handed out in shards, when `[demo] data` is set.
    pub demo: Option<DemoData>,
    files: SharedFiles,
    /// Size and modification time of the served files: a file that changed
    /// since it was hashed is no longer served.
    stamps: std::sync::Mutex<FileStamps>,
    /// The task as `/api/task` shows it (with the adapter file once a
    /// federated initialization has made it).
    shared_task: Arc<std::sync::RwLock<Arc<TaskInfo>>>,
    /// `true` once the shutdown began: ends the `/api/events` streams, which
    /// would otherwise hold the graceful shutdown open, and closes the
    /// participants' WebSockets with 1001 (going away).
    pub(crate) stopping: watch::Sender<bool>,
}

/// The stamps of the served files, by path: those they had when their hash
/// was last found right, and those they had when it was found wrong.
#[derive(Debug, Default)]
struct FileStamps {
    right: HashMap<PathBuf, FileStamp>,
    wrong: HashMap<PathBuf, FileStamp>,
}

/// A started server: its address, and a future that runs it.
pub struct Server {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    listener: TcpListener,
    router: Router,
}

/// What round 0 is made from when the state has no committed round, read
/// before the state is opened.
enum RoundZero {
    /// The adapter file's R₀ and head (zeros without one).
    File(AdapterState),
    /// The modules of a federated initialization.
    Federated(InitModules),
}

impl Server {
    /// Checks the page, the demo data, the served files and the eval set
    /// (read and checked, its model loaded), binds the listener, then opens
    /// the state (locked against a second server), checks the files against
    /// the task's pins, restores the last committed round (or writes round
    /// 0) and starts the evaluator. When the start fails after it created
    /// the database, the database is removed again.
    pub async fn start(config: Config, www: WwwDir) -> Result<Self, ServeError> {
        // Everything that needs no state first: a start refused here writes
        // nothing.
        let Preflight {
            demo,
            collected,
            round_zero,
            eval,
        } = preflight(&config, www).await?;
        let addr = SocketAddr::new(config.server.bind, config.server.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;

        let store = Store::open(
            &config.server.state_dir,
            &config.task.id,
            &config.identity_json(),
            now_unix_ms(),
        )?;
        let (created, path) = (store.created(), store.path().to_owned());
        // Only `--check` beside this server reads it: not worth a refusal.
        match listener.local_addr().map(|a| store.record_listener(a)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("could not record the address in the lock file: {e}"),
            Err(e) => tracing::warn!("could not read the listener's address: {e}"),
        }
        let started =
            Self::start_with_state(config, store, listener, collected, demo, round_zero, eval)
                .await;
        if started.is_err() && created {
            remove_database(&path);
        }
        started
    }

    /// `fedsb serve --check`: the checks of [`Server::start`] without
    /// starting. The page, the demo data, the served files (hashed), the
    /// initial model, the eval set with its model and the evaluator's GPU
    /// adapter are checked as a start checks them. When the state exists
    /// it is read read-only, beside a running server too: the task
    /// identity, the schema and the pinned files. The state directory must
    /// be one a start could create and write (a probe directory is made and
    /// removed). The address is tried (and released) unless a server holds
    /// the state and listens on its port itself, which its restart frees.
    /// Writes nothing else. Returns one line per check.
    pub async fn check(config: Config, www: WwwDir) -> Result<Vec<String>, ServeError> {
        let Preflight {
            demo,
            collected,
            round_zero,
            eval,
        } = preflight(&config, www).await?;
        let mut lines = Vec::new();
        let www_dir = &config.server.www_dir;
        lines.push(if www_dir.is_dir() {
            format!("page: {}", www_dir.display())
        } else {
            format!("page: none ({} does not exist)", www_dir.display())
        });
        if let (Some(d), Some(path)) = (&demo, &config.demo.data) {
            lines.push(format!(
                "demo data: {} ({} rows, shards of {})",
                path.display(),
                d.rows.len(),
                d.shard_rows
            ));
        }
        for (f, _) in &collected {
            lines.push(format!(
                "file {}: {} ({} bytes, SHA-256 {})",
                f.name,
                f.path.display(),
                f.size,
                f.sha256
            ));
        }
        lines.push(match (&round_zero, &config.adapter.file) {
            (RoundZero::Federated(_), _) => format!(
                "initial model: a federated initialization on {} samples per participant",
                config.adapter.init_samples
            ),
            (RoundZero::File(_), Some(path)) => {
                format!("initial model: the adapter file {}", path.display())
            }
            (RoundZero::File(_), None) => "initial model: R and head at zero".to_owned(),
        });
        if let (Some(e), Some(path)) = (&eval, &config.eval.file) {
            lines.push(format!(
                "eval set: {} ({} labelled rows), model loaded",
                path.display(),
                e.rows()
            ));
            let adapter = crate::evaluator::check_gpu(&config).await?;
            lines.push(format!("eval GPU adapter: {adapter}"));
        }

        let state_dir = &config.server.state_dir;
        let database = state_dir.join(format!("{}.sqlite3", config.task.id));
        if database.is_file() {
            let store = Store::open_read_only(state_dir, &config.task.id, &config.identity_json())?;
            let last = store.last_round().await?;
            let mut files: Vec<ServedFile> = collected.into_iter().map(|(f, _)| f).collect();
            if config.adapter.init == AdapterInit::Federated && last.is_some() {
                files.push(
                    committed_init_file(&config.federated_adapter_path())
                        .await?
                        .0,
                );
            }
            let pinned = store.pinned_files().await?;
            let new = check_pins(&pinned, &files)?;
            let progress = match &last {
                Some(l) if l.meta.round >= config.task.rounds => {
                    format!("finished: all {} rounds committed", config.task.rounds)
                }
                Some(l) => format!("round {} of {} committed", l.meta.round, config.task.rounds),
                None => "federated initialization not committed yet".to_owned(),
            };
            lines.push(format!(
                "state: {} (the same task; {progress})",
                database.display()
            ));
            let names = |files: &[crate::store::PinnedFile]| {
                files
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            lines.push(if pinned.is_empty() {
                "pinned files: none yet".to_owned()
            } else {
                format!("pinned files, all as pinned: {}", names(&pinned))
            });
            if !new.is_empty() {
                lines.push(format!(
                    "not pinned yet (a start pins them): {}",
                    names(&new)
                ));
            }
        } else {
            lines.push(format!(
                "state: {} does not exist yet; a start creates it",
                database.display()
            ));
        }
        crate::store::check_state_dir(state_dir)?;
        let addr = SocketAddr::new(config.server.bind, config.server.port);
        let holder = crate::store::state_holder(state_dir, &config.task.id)?;
        // The running server's own port, which its restart frees: not tried.
        // (A holder that recorded no address, from before it did, is taken
        // to listen on this one.)
        let own_port = holder
            .as_ref()
            .is_some_and(|h| h.listen.is_none_or(|l| l.port() == addr.port()));
        match &holder {
            Some(h) if own_port => lines.push(format!(
                "server: process {} holds this state now and listens on {}; \
                 restart it to apply this configuration",
                h.pid,
                h.listen
                    .map_or_else(|| "this port".to_owned(), |l| l.to_string())
            )),
            _ => {
                if let Some(h) = &holder {
                    lines.push(format!(
                        "server: process {} holds this state now, listening on {}; \
                         restart it to apply this configuration",
                        h.pid,
                        h.listen.map_or_else(|| "?".to_owned(), |l| l.to_string())
                    ));
                }
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Bind { addr, source })?;
                lines.push(if addr.port() == 0 {
                    format!("listen: {}, on a free port picked at the start", addr.ip())
                } else {
                    format!("listen: {addr} is free")
                });
            }
        }
        Ok(lines)
    }

    async fn start_with_state(
        mut config: Config,
        store: Store,
        listener: TcpListener,
        mut collected: Vec<(ServedFile, FileStamp)>,
        demo: Option<DemoData>,
        round_zero: RoundZero,
        eval: Option<PreparedEval>,
    ) -> Result<Self, ServeError> {
        let last = store.last_round().await?;
        // Federated initialization: the adapter file lives in the state
        // directory. Once round 0 is committed it exists and is served like a
        // configured one; before that the coordinator computes it, and it is
        // pinned in the transaction that commits round 0.
        let init_path = config.federated_adapter_path();
        let federated_init = config.adapter.init == AdapterInit::Federated;
        if federated_init && last.is_some() {
            collected.push(committed_init_file(&init_path).await?);
            config.adapter.file = Some(init_path.clone());
        } else if federated_init {
            store.pin_with_round_zero(ADAPTER_FILE, init_path.clone());
        }
        let files: Vec<ServedFile> = collected.iter().map(|(f, _)| f.clone()).collect();
        pin_files(&store, &files, last.is_some()).await?;
        if demo.is_some() {
            // Where the shards handed out before the restart stopped.
            let next = store.next_demo_shard().await?;
            info!(next_shard = next, "handing out demo shards round robin");
        }

        let config = Arc::new(config);
        let shape = config.adapter_shape();
        let model_sha256 = files
            .iter()
            .find(|f| f.name == MODEL_FILE)
            .map(|f| f.sha256.clone())
            .or_else(|| config.model.sha256.clone())
            .unwrap_or_default();
        let task = Arc::new(TaskInfo {
            task_id: config.task.id.clone(),
            model_id: config.model.id.clone(),
            model_sha256,
            module_names: config.module_names(),
            shape,
            labels: config.task.labels.clone(),
            local_steps: config.task.local_steps,
            batch_size: config.task.batch_size,
            learning_rate: config.task.learning_rate,
            head_learning_rate: config.task.head_learning_rate(),
            max_seq_len: config.task.max_seq_len,
            total_rounds: config.task.rounds,
            files: files
                .iter()
                .map(|f| FileRef {
                    name: f.name.clone(),
                    sha256: f.sha256.clone(),
                    size: f.size,
                    url: format!("/files/{}", f.sha256),
                })
                .collect(),
            privacy: config.privacy_policy(),
        });
        let stamps = FileStamps {
            right: collected
                .iter()
                .map(|(f, stamp)| (f.path.clone(), *stamp))
                .collect(),
            wrong: HashMap::new(),
        };
        let files: SharedFiles = Arc::new(std::sync::RwLock::new(
            files.into_iter().map(|f| (f.sha256.clone(), f)).collect(),
        ));
        let shared_task = Arc::new(std::sync::RwLock::new(task.clone()));
        let begin = match (last, round_zero) {
            (Some(last), _) => {
                info!(round = last.meta.round, sha256 = %last.meta.global_sha256,
                    "resuming from the last committed round");
                Begin::Resume(Box::new(last))
            }
            (None, RoundZero::Federated(modules)) => {
                let head = modules.head(config.task.labels.len(), config.adapter.init_seed);
                Begin::Initialize(Box::new(FederatedInit {
                    modules,
                    head,
                    path: init_path,
                    files: files.clone(),
                    shared_task: shared_task.clone(),
                }))
            }
            (None, RoundZero::File(adapter)) => {
                let frame = initial_frame(adapter.clone());
                let meta = RoundMeta::initial(&frame, now_unix_ms());
                store
                    .commit_round(meta.clone(), frame.clone(), Vec::new())
                    .await?;
                info!(sha256 = %meta.global_sha256, "initial state written as round 0");
                Begin::Resume(Box::new(CommittedRound {
                    meta,
                    frame,
                    adapter,
                }))
            }
        };

        // Each participant's privacy spending as of the last committed round.
        let privacy = store.privacy_reports().await?;
        // Updates accepted for the round that was collecting when the
        // aggregator stopped: they count in it again.
        let pending = match &begin {
            Begin::Resume(last) => {
                let round = RoundId(last.meta.round + 1);
                let pending = store.pending_updates(round).await?;
                if !pending.is_empty() {
                    info!(updates = pending.len(), %round,
                        "restoring the updates accepted before the restart");
                }
                pending
            }
            Begin::Initialize(_) => Vec::new(),
        };
        let metrics = Arc::new(Metrics::new());
        let (coordinator, status) = Coordinator::start(
            config.clone(),
            task.clone(),
            store.clone(),
            metrics.clone(),
            begin,
            privacy,
            pending,
        );
        let eval = crate::evaluator::spawn(
            config.clone(),
            eval,
            store.clone(),
            status.clone(),
            metrics.clone(),
        )
        .await?;
        let app = Arc::new(App {
            demo,
            config: config.clone(),
            task,
            coordinator,
            status,
            store,
            metrics,
            eval,
            files,
            stamps: std::sync::Mutex::new(stamps),
            shared_task,
            stopping: watch::channel(false).0,
        });
        let addr = listener.local_addr()?;
        let router = router(app.clone());
        Ok(Self {
            addr,
            app,
            listener,
            router,
        })
    }

    /// Serves until `shutdown` resolves, then stops accepting, ends the
    /// `/api/events` streams and the WebSockets, waits for the open
    /// requests up to [`SHUTDOWN_GRACE`] and returns (with a warning when
    /// requests were still open).
    ///
    /// Each connection is served by hyper's HTTP/1.1 server (with WebSocket
    /// upgrades) with a timer, so `[server] header_read_timeout_secs`
    /// holds: a connection that has not sent a whole request head that
    /// long after it opened, or after its last response, is closed.
    /// (`axum::serve` sets no timer, and first waits for bytes to tell
    /// HTTP/1 from HTTP/2, so a client that sent nothing, or trickled its
    /// headers, held a connection and a file descriptor for good.) A
    /// connection whose writes stall for `[server] write_timeout_secs` (a
    /// client that asked for a file and does not read it) is closed too.
    pub async fn run(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        use hyper_util::rt::{TokioIo, TokioTimer};
        use hyper_util::service::TowerToHyperService;

        let metrics = self.app.metrics.clone();
        let files_limit = raise_open_files_limit();
        if let Some(limit) = files_limit {
            metrics
                .open_files_limit
                .set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let header_read = Duration::from_secs(self.app.config.server.header_read_timeout_secs);
        let write_stall = Duration::from_secs(self.app.config.server.write_timeout_secs);
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(header_read);
        // Each connection's task holds a receiver: `closed()` resolves once
        // they have all ended.
        let (open_tx, open_rx) = watch::channel(());
        let stopping = self.app.stopping.subscribe();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: the
                        // listener stays; accept again after a pause.
                        metrics.accept_errors.inc();
                        if out_of_files(&e) {
                            let limit = files_limit.map_or("unknown".into(), |l| l.to_string());
                            warn!(error = %e, open_files_limit = %limit,
                                "accepting a connection failed: out of file descriptors, \
                                 each connection takes one; raise the hard limit on open \
                                 files (ulimit -Hn, systemd LimitNOFILE=); trying again in 1 s");
                        } else {
                            warn!(error = %e, "accepting a connection failed; trying again in 1 s");
                        }
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            let written = Written::default();
            let stream = Counted::new(stream, metrics.connections_open.clone(), written.clone());
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(write_stall));
            let in_progress = InProgress::default();
            let service = TowerToHyperService::new(in_progress.track(self.router.clone()));
            let conn = builder
                .serve_connection(TokioIo::new(Box::pin(stream)), service)
                .with_upgrades();
            let (open, mut stopping) = (open_rx.clone(), stopping.clone());
            tokio::spawn(async move {
                let mut conn = std::pin::pin!(conn);
                let ended = tokio::select! {
                    ended = conn.as_mut() => ended,
                    () = async { drop(stopping.wait_for(|s| *s).await) } => {
                        // Finish the request in progress, take no other.
                        conn.as_mut().graceful_shutdown();
                        // hyper waits for a request head begun, however
                        // slowly it comes. A connection with no request in
                        // the router and nothing left to write (no write
                        // waiting for the client, none made for a second)
                        // is owed nothing: it does not hold the stop.
                        let mut seen = written.get();
                        loop {
                            tokio::select! {
                                ended = conn.as_mut() => break ended,
                                () = tokio::time::sleep(STOP_STALL) => {
                                    let now = written.get();
                                    if !in_progress.any() && !written.waiting() && now == seen {
                                        drop(open);
                                        return;
                                    }
                                    seen = now;
                                }
                            }
                        }
                    }
                };
                if let Err(e) = ended {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(open);
            });
        }
        drop(self.listener);
        drop(open_rx);
        self.app.stopping.send_replace(true);
        tokio::select! {
            () = open_tx.closed() => {}
            () = tokio::time::sleep(SHUTDOWN_GRACE) => warn!(
                seconds = SHUTDOWN_GRACE.as_secs(),
                "requests still open after the shutdown began; exiting without them"
            ),
        }
        Ok(())
    }
}

/// The requests of one connection that have reached the router and whose
/// response has not been sent in full (its body is dropped once hyper has
/// written it, or the connection ended).
#[derive(Clone, Default)]
struct InProgress(Arc<std::sync::atomic::AtomicUsize>);

impl InProgress {
    fn any(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    /// `router`, counting each request from its call to the end of its
    /// response body.
    fn track(
        &self,
        router: Router,
    ) -> impl tower::Service<
        Request<hyper::body::Incoming>,
        Response = Response,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone {
        let count = self.clone();
        tower::service_fn(move |request: Request<hyper::body::Incoming>| {
            let guard = InProgressGuard::new(&count);
            let router = router.clone();
            async move {
                let response = router.oneshot(request.map(Body::new)).await?;
                Ok(response.map(|body| {
                    Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    })
                }))
            }
        })
    }
}

/// One request of [`InProgress`], counted until dropped.
struct InProgressGuard(InProgress);

impl InProgressGuard {
    fn new(count: &InProgress) -> Self {
        count.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(count.clone())
    }
}

impl Drop for InProgressGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A response body that holds its request's [`InProgressGuard`].
struct GuardedBody {
    body: Body,
    _guard: InProgressGuard,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// The most open files `fedsb serve` asks for: Linux's default ceiling
/// (`fs.nr_open`), far more connections than one aggregator serves.
const OPEN_FILES_WANTED: u64 = 1 << 20;

/// Raises the soft limit on open files towards the hard one, as servers
/// do: every connection holds a file descriptor, and shells and many
/// service managers still start processes with a soft limit of 1,024,
/// which would cap the aggregator at about a thousand participants while
/// the hard limit allows far more. Returns the soft limit now in force;
/// logs it, with a warning when it is low.
fn raise_open_files_limit() -> Option<u64> {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).ok();
    match rlimit::increase_nofile_limit(OPEN_FILES_WANTED) {
        Ok(limit) => {
            match before {
                Some((soft, hard)) if soft < limit => info!(
                    from = soft,
                    to = limit,
                    hard,
                    "raised the limit on open files (each connection takes one)"
                ),
                _ => info!(limit, "limit on open files (each connection takes one)"),
            }
            if limit < LOW_OPEN_FILES {
                warn!(
                    limit,
                    "the limit on open files is low: at most about that many participants and \
                     downloads at once; raise the hard limit (ulimit -Hn, systemd LimitNOFILE=)"
                );
            }
            Some(limit)
        }
        Err(e) => {
            warn!(error = %e, soft_and_hard = ?before,
                "cannot raise the limit on open files; connections beyond it are refused");
            before.map(|(soft, _)| soft)
        }
    }
}

/// Below this many open files, `fedsb serve` warns at start.
const LOW_OPEN_FILES: u64 = 4096;

/// Whether `e` says the process or the system is out of file descriptors.
fn out_of_files(e: &std::io::Error) -> bool {
    #[cfg(unix)]
    {
        matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        false
    }
}

/// How long a stopping server lets a connection with no request in
/// progress and nothing to write sit before it closes it.
const STOP_STALL: Duration = Duration::from_secs(1);

/// The bytes written to one connection so far, and whether a write is
/// waiting for the client to read (the socket's buffer is full).
#[derive(Clone, Default)]
struct Written(Arc<(std::sync::atomic::AtomicU64, std::sync::atomic::AtomicBool)>);

impl Written {
    fn get(&self) -> u64 {
        self.0 .0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn waiting(&self) -> bool {
        self.0 .1.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn record<T>(&self, done: &std::task::Poll<std::io::Result<T>>, bytes: impl Fn(&T) -> u64) {
        use std::sync::atomic::Ordering::Relaxed;
        match done {
            std::task::Poll::Pending => self.0 .1.store(true, Relaxed),
            std::task::Poll::Ready(result) => {
                self.0 .1.store(false, Relaxed);
                if let Ok(t) = result {
                    self.0 .0.fetch_add(bytes(t), Relaxed);
                }
            }
        }
    }
}

/// A connection's TCP stream, counted in `fedsb_connections_open` until it
/// is dropped (after an upgrade the WebSocket holds it, so the gauge counts
/// WebSockets too), and counting the bytes written to it.
struct Counted {
    stream: tokio::net::TcpStream,
    open: prometheus_client::metrics::gauge::Gauge,
    written: Written,
}

impl Counted {
    fn new(
        stream: tokio::net::TcpStream,
        open: prometheus_client::metrics::gauge::Gauge,
        written: Written,
    ) -> Self {
        open.inc();
        Self {
            stream,
            open,
            written,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.open.dec();
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let done = std::pin::Pin::new(&mut this.stream).poll_write(cx, buf);
        this.written.record(&done, |&n| n as u64);
        done
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let done = std::pin::Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.written.record(&done, |&n| n as u64);
        done
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let done = std::pin::Pin::new(&mut this.stream).poll_flush(cx);
        this.written.record(&done, |_| 0);
        done
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Refuses a given `www_dir` that is not a directory; warns about a page
/// that will not work: a missing default `www_dir`, no `index.html`, or no
/// WebAssembly bundle.
fn check_www_dir(dir: &std::path::Path, www: WwwDir) -> Result<(), ServeError> {
    if !dir.is_dir() {
        if www == WwwDir::Given {
            return Err(ServeError::WwwDir {
                path: dir.to_owned(),
            });
        }
        warn!(www_dir = %dir.display(),
            "no web page: the default www_dir does not exist (set [server] www_dir or \
             --www-dir); / answers 404, the API and /ws work");
        return Ok(());
    }
    if !dir.join("index.html").is_file() {
        warn!(www_dir = %dir.display(), "www_dir has no index.html: / answers 404");
    }
    let bundle = dir.join("pkg/fedsb_wasm_client.js");
    if !bundle.is_file() {
        warn!(missing = %bundle.display(),
            "the page's WebAssembly bundle is missing: browsers get the page but cannot \
             train or evaluate; `cargo xtask build-wasm` builds it");
    }
    Ok(())
}

/// Checks the served files against the database's pins and pins the ones
/// not pinned yet (all of them at a task's first start).
async fn pin_files(store: &Store, files: &[ServedFile], resumed: bool) -> Result<(), ServeError> {
    let pinned = store.pinned_files().await?;
    let new = check_pins(&pinned, files)?;
    if new.is_empty() {
        return Ok(());
    }
    for f in &new {
        if resumed {
            // A database from before pins, or a file the task had not served.
            info!(file = %f.name, path = %f.path.display(), sha256 = %f.sha256,
                "pinning the file's SHA-256 at this start (the database had none for it): \
                 later starts refuse another file");
        } else {
            info!(file = %f.name, sha256 = %f.sha256,
                "pinned the file's SHA-256: later starts refuse another file");
        }
    }
    store.pin_files(new, now_unix_ms()).await?;
    Ok(())
}

/// What [`Server::start`] reads and checks before it touches the state.
struct Preflight {
    demo: Option<DemoData>,
    collected: Vec<(ServedFile, FileStamp)>,
    round_zero: RoundZero,
    eval: Option<PreparedEval>,
}

/// The checks that need no state: the page, the demo data, the served
/// files (hashed), the initial model and the eval set with its model.
async fn preflight(config: &Config, www: WwwDir) -> Result<Preflight, ServeError> {
    check_www_dir(&config.server.www_dir, www)?;
    let demo = match &config.demo.data {
        None => None,
        Some(path) => Some(DemoData::load(
            path,
            config.demo.shard_rows.unwrap_or(DEFAULT_DEMO_SHARD_ROWS),
        )?),
    };
    let collected = {
        let c = config.clone();
        tokio::task::spawn_blocking(move || collect_files(&c))
            .await
            .map_err(|_| FileError::Join)??
    };
    let round_zero = match config.adapter.init {
        AdapterInit::Federated => RoundZero::Federated(
            InitModules::from_config(config).map_err(|e| ServeError::Init(e.to_string()))?,
        ),
        AdapterInit::File => RoundZero::File(initial_adapter(config)?),
    };
    let eval = crate::evaluator::prepare(config).await?;
    Ok(Preflight {
        demo,
        collected,
        round_zero,
        eval,
    })
}

/// The adapter file of a federated initialization whose round 0 is
/// committed, hashed: it must exist.
async fn committed_init_file(
    init_path: &std::path::Path,
) -> Result<(ServedFile, FileStamp), ServeError> {
    if !init_path.is_file() {
        return Err(ServeError::Init(format!(
            "round 0 of the federated initialization is committed but its adapter file {} is missing",
            init_path.display()
        )));
    }
    let p = init_path.to_owned();
    Ok(tokio::task::spawn_blocking(move || served_adapter_file(&p))
        .await
        .map_err(|_| FileError::Join)??)
}

/// Removes a database a failed start created (with its write-ahead log and
/// shared memory), so that the next start begins afresh.
fn remove_database(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %PathBuf::from(p).display(), error = %e,
                "cannot remove the database of the failed start"),
        }
    }
}

fn router(app: Arc<App>) -> Router {
    let www = ServeDir::new(&app.config.server.www_dir).append_index_html_on_directories(true);
    Router::new()
        .route("/ws", get(ws))
        .route("/api/status", get(status))
        .route("/api/task", get(task))
        .route("/api/rounds", get(rounds))
        .route("/api/eval", get(eval_info))
        .route("/api/demo", get(demo_info))
        .route("/api/demo-shard", get(demo_shard))
        .route("/api/events", get(events))
        .route("/api/rounds/{round}/global", get(global))
        .route("/api/rounds/{round}/adapter", get(adapter))
        .route("/files/{sha256}", get(file))
        .route("/metrics", get(metrics))
        .fallback_service(
            tower::ServiceBuilder::new()
                .layer(SetResponseHeaderLayer::if_not_present(
                    header::CACHE_CONTROL,
                    HeaderValue::from_static("no-cache"),
                ))
                .service(www),
        )
        .with_state(app)
        // The page may talk to this server only: whatever it ran, it could
        // not send a volunteer's data to another origin.
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CONTENT_SECURITY_POLICY),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
}

/// The page's Content-Security-Policy, sent with every response (workers
/// take theirs from their script's): scripts, workers, fetches, event
/// streams and WebSockets only from this origin (`'self'` covers `ws:` and
/// `wss:` to it), WebAssembly compiled from there (`'wasm-unsafe-eval'`),
/// no plugins, no `<base>`, no forms, and not framed by another site.
/// Styles may be set inline (the chart library sizes its elements so).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; \
    script-src 'self' 'wasm-unsafe-eval'; style-src 'self' 'unsafe-inline'; \
    img-src 'self'; connect-src 'self'; worker-src 'self'; object-src 'none'; \
    base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// An error answered as JSON `{"error": ...}`. Internal causes are logged,
/// not shown.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        error!(error = %e, "database error while serving a request");
        Self(StatusCode::INTERNAL_SERVER_ERROR, "internal error".into())
    }
}

async fn ws(upgrade: WebSocketUpgrade, State(app): State<Arc<App>>) -> Response {
    // Frames up to 1 MiB above the protocol limit still arrive, so that the
    // sender gets a typed FrameTooLarge error; anything larger closes the
    // connection (WebSocket close code 1009).
    upgrade
        .max_message_size(MAX_FRAME_BYTES + (1 << 20))
        .max_frame_size(MAX_FRAME_BYTES + (1 << 20))
        // A 16 KiB read buffer and eager writes instead of tungstenite's
        // 128 KiB buffers: 100-110 KiB less per connection, with the same
        // round times (BENCHMARKS.md, "Aggregator capacity").
        .read_buffer_size(16 << 10)
        .write_buffer_size(0)
        .on_upgrade(move |socket| crate::connection::serve_socket(socket, app))
}

async fn status(State(app): State<Arc<App>>) -> Json<Status> {
    Json(app.status.borrow().clone())
}

async fn task(State(app): State<Arc<App>>) -> Json<TaskInfo> {
    let task = app
        .shared_task
        .read()
        .map(|t| (**t).clone())
        .unwrap_or_else(|_| (*app.task).clone());
    Json(task)
}

/// A committed round as `/api/rounds` lists it: the store's summary and the
/// learning rate its participants were told to train at (none for round 0).
#[derive(Debug, serde::Serialize)]
struct RoundListing {
    #[serde(flatten)]
    summary: RoundSummary,
    learning_rate: Option<f32>,
}

async fn rounds(State(app): State<Arc<App>>) -> Result<Json<Vec<RoundListing>>, ApiError> {
    let eval_set = app.eval.as_ref().map(|e| e.eval_set.clone());
    let task = &app.config.task;
    let listed = app
        .store
        .round_summaries(eval_set)
        .await?
        .into_iter()
        .map(|summary| {
            let n = summary.meta.round;
            RoundListing {
                summary,
                learning_rate: (n > 0).then(|| task.round_learning_rate(n)),
            }
        })
        .collect();
    Ok(Json(listed))
}

/// Rows per demo shard unless `[demo] shard_rows` says otherwise.
pub const DEFAULT_DEMO_SHARD_ROWS: usize = 200;

/// Public demo data, one record per line, handed out shard by shard.
#[derive(Debug)]
pub struct DemoData {
    /// The header line of CSV/TSV files (none for JSONL).
    header: Option<String>,
    rows: Vec<String>,
    shard_rows: usize,
    extension: String,
}

impl DemoData {
    fn load(path: &std::path::Path, shard_rows: usize) -> Result<Self, ServeError> {
        let bad = |message: String| ServeError::Demo {
            path: path.to_owned(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = match extension.as_str() {
            "jsonl" | "ndjson" => None,
            "csv" | "tsv" | "tab" => Some(
                lines
                    .next()
                    .ok_or_else(|| bad("the file is empty".into()))?
                    .to_owned(),
            ),
            other => {
                return Err(bad(format!(
                    "unknown extension {other:?} (use .csv, .tsv or .jsonl)"
                )))
            }
        };
        let rows: Vec<String> = lines.map(str::to_owned).collect();
        if rows.is_empty() {
            return Err(bad("no data rows".into()));
        }
        Ok(Self {
            header,
            rows,
            shard_rows,
            extension,
        })
    }

    /// Shard `k`: `shard_rows` consecutive rows starting at `k·shard_rows`,
    /// wrapping around the end of the data.
    fn shard(&self, k: u64) -> String {
        let n = self.rows.len();
        // (k·shard_rows) mod n, without overflowing for any k.
        let start = ((k % n as u64) as usize).wrapping_mul(self.shard_rows) % n;
        let mut out = String::new();
        if let Some(h) = &self.header {
            out.push_str(h);
            out.push('\n');
        }
        for i in 0..self.shard_rows.min(n) {
            out.push_str(&self.rows[(start + i) % n]);
            out.push('\n');
        }
        out
    }
}

async fn demo_info(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(match &app.demo {
        None => serde_json::json!({ "enabled": false }),
        Some(d) => serde_json::json!({
            "enabled": true,
            "shard_rows": d.shard_rows.min(d.rows.len()),
            "rows": d.rows.len(),
        }),
    })
}

/// The next demo shard (round-robin over the data), as a file download. The
/// shard's index is taken in the task's database, so that a restarted server
/// goes on with the next one. A HEAD request describes the next shard
/// without handing it out.
async fn demo_shard(State(app): State<Arc<App>>, method: Method) -> Result<Response, ApiError> {
    let d = app.demo.as_ref().ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "this task hands out no demo data ([demo] data is not set)".into(),
        )
    })?;
    let taken = if method == Method::HEAD {
        app.store.next_demo_shard().await
    } else {
        app.store.take_demo_shard().await
    };
    let k = taken.map_err(|e| {
        error!(error = %e, "cannot hand out a demo shard");
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot hand out a demo shard: the server's database failed (its log says why)".into(),
        )
    })?;
    let content_type = match d.extension.as_str() {
        "csv" => "text/csv; charset=utf-8",
        "jsonl" | "ndjson" => "application/jsonl; charset=utf-8",
        _ => "text/tab-separated-values; charset=utf-8",
    };
    let disposition = format!("attachment; filename=\"demo-shard-{k}.{}\"", d.extension);
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (header::CONTENT_DISPOSITION, disposition),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        d.shard(k),
    )
        .into_response())
}

async fn eval_info(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    Json(match &app.eval {
        None => serde_json::json!({ "enabled": false }),
        Some(e) => serde_json::json!({
            "enabled": true,
            "samples": e.samples,
            "adapter": e.adapter_name,
        }),
    })
}

/// `/api/events`: the status (at once and on every change) and each finished
/// evaluation, as Server-Sent Events, so the page updates as rounds commit.
/// The stream ends when the server begins to shut down.
async fn events(
    State(app): State<Arc<App>>,
) -> Sse<impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let status = app.status.clone();
    let evals = app.eval.as_ref().map(|e| e.events.subscribe());
    let stopping = app.stopping.subscribe();
    let first = true;
    let stream = futures_util::stream::unfold(
        (status, evals, stopping, first),
        |(mut status, mut evals, mut stopping, first)| async move {
            if *stopping.borrow_and_update() {
                return None;
            }
            let event = if first {
                let s = status.borrow_and_update().clone();
                status_event(&s)
            } else {
                tokio::select! {
                    _ = stopping.wait_for(|stop| *stop) => return None,
                    changed = status.changed() => {
                        changed.ok()?;
                        let s = status.borrow_and_update().clone();
                        status_event(&s)
                    }
                    eval = recv_eval(&mut evals) => match eval {
                        Some(e) => Event::default()
                            .event("eval")
                            .json_data(&e)
                            .unwrap_or_else(|_| Event::default().comment("unencodable eval")),
                        None => return None,
                    },
                }
            };
            Some((Ok(event), (status, evals, stopping, false)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}

fn status_event(s: &Status) -> Event {
    Event::default()
        .event("status")
        .json_data(s)
        .unwrap_or_else(|_| Event::default().comment("unencodable status"))
}

/// The next evaluation; pends forever without an evaluator, and skips
/// announcements a slow reader missed (the page refetches `/api/rounds`).
async fn recv_eval(
    evals: &mut Option<tokio::sync::broadcast::Receiver<crate::store::RoundEval>>,
) -> Option<crate::store::RoundEval> {
    let Some(rx) = evals else {
        return std::future::pending().await;
    };
    loop {
        match rx.recv().await {
            Ok(e) => return Some(e),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                return std::future::pending().await
            }
        }
    }
}

/// The `{round}` of a round path: 400 unless it is a number.
fn round_number(round: &str) -> Result<u64, ApiError> {
    round.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("round {round:?} is not a number"),
        )
    })
}

/// A committed round's bytes with an ETag of their SHA-256, revalidated
/// on every use (`no-cache`), not cached as immutable: the URL names a task
/// id and a round, not the bytes, and another state directory (a new task
/// of the same id) serves other bytes under it. A request whose
/// `If-None-Match` names the same bytes gets 304.
fn round_bytes(
    request: &HeaderMap,
    bytes: Vec<u8>,
    headers: Vec<(header::HeaderName, String)>,
) -> Response {
    let etag = format!("\"{}\"", crate::store::sha256_hex(&bytes));
    let matches = request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == etag
        });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        bytes.into_response()
    };
    let h = response.headers_mut();
    for (name, value) in headers {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    response
}

async fn global(
    State(app): State<Arc<App>>,
    Path(round): Path<String>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    let n = round_number(&round)?;
    let frame =
        app.store.global_frame(RoundId(n)).await?.ok_or_else(|| {
            ApiError(StatusCode::NOT_FOUND, format!("round {n} is not committed"))
        })?;
    Ok(round_bytes(
        &request,
        frame,
        vec![(header::CONTENT_TYPE, "application/octet-stream".to_owned())],
    ))
}

/// The committed round's model as an adapter file (`fedsb export`'s file):
/// 404 for a round not committed, 409 while the task has no A and B.
async fn adapter(
    State(app): State<Arc<App>>,
    Path(round): Path<String>,
    request: HeaderMap,
) -> Result<Response, ApiError> {
    use crate::export::{export_round, ExportError};
    let n = round_number(&round)?;
    // The export reads the adapter file's A and B and the model's
    // config.json: both must still be the files the server started with.
    let read: Vec<ServedFile> = app
        .files
        .read()
        .map(|files| {
            files
                .values()
                .filter(|f| f.name == ADAPTER_FILE || f.name == "config.json")
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for f in &read {
        check_unchanged(&app, f).await?;
    }
    let exported = export_round(app.config.clone(), &app.store, Some(n))
        .await
        .map_err(|e| match e {
            ExportError::Store(e) => ApiError::from(e),
            e @ (ExportError::NoRounds { .. } | ExportError::NotCommitted { .. }) => {
                ApiError(StatusCode::NOT_FOUND, e.to_string())
            }
            e @ (ExportError::NoAdapterFile { .. } | ExportError::NoModelDir) => {
                ApiError(StatusCode::CONFLICT, e.to_string())
            }
            e => {
                error!(error = %e, round = n, "exporting a round failed");
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
        })?;
    let name = format!("{}-round-{n}.safetensors", app.config.task.id);
    Ok(round_bytes(
        &request,
        exported.bytes,
        vec![
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
    ))
}

async fn file(
    State(app): State<Arc<App>>,
    Path(sha256): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let f = app
        .files
        .read()
        .ok()
        .and_then(|files| files.get(&sha256).cloned())
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no file with content hash {sha256}"),
            )
        })?;
    check_unchanged(&app, &f).await?;
    let etag = format!("\"{sha256}\"");
    let cache = HeaderValue::from_static("public, max-age=31536000, immutable");
    let matches = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if matches {
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        match ServeFile::new(&f.path).oneshot(req).await {
            Ok(r) => r.map(Body::new),
            Err(e) => match e {},
        }
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, cache);
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    Ok(resp)
}

/// Whether a served file is still the one hashed at start. Its size and
/// modification time are checked on every request; when they differ from
/// those it was hashed with (or it was not hashed here: the federated
/// initialization's adapter file), it is hashed again, once per change. A
/// file with another hash is logged and answered with 500: served under its
/// old hash and cached as immutable, its new bytes would be taken for the
/// old ones. Restored, it is served again.
async fn check_unchanged(app: &App, f: &ServedFile) -> Result<(), ApiError> {
    let now = tokio::fs::metadata(&f.path)
        .await
        .ok()
        .map(|m| FileStamp::from_metadata(&m));
    let known = {
        let stamps = app.stamps.lock().unwrap_or_else(|e| e.into_inner());
        match now {
            Some(now) if stamps.right.get(&f.path) == Some(&now) => Some(true),
            Some(now) if stamps.wrong.get(&f.path) == Some(&now) => Some(false),
            // Changed, new to this server, or gone (the read fails and is logged).
            _ => None,
        }
    };
    let right = match known {
        Some(right) => right,
        None => {
            let path = f.path.clone();
            let hashed = tokio::task::spawn_blocking(move || hash_file_stamped(&path)).await;
            let mut stamps = app.stamps.lock().unwrap_or_else(|e| e.into_inner());
            match hashed {
                Ok(Ok((sha256, _, stamp))) if sha256 == f.sha256 => {
                    stamps.wrong.remove(&f.path);
                    stamps.right.insert(f.path.clone(), stamp);
                    true
                }
                Ok(Ok((sha256, _, stamp))) => {
                    error!(file = %f.name, path = %f.path.display(), sha256 = %f.sha256,
                        now = %sha256,
                        "the file changed on disk since the server hashed it, so it is no longer \
                         served: restore it, or restart fedsb serve (which refuses a changed \
                         model or adapter file of a task with committed rounds)");
                    stamps.wrong.insert(f.path.clone(), stamp);
                    false
                }
                Ok(Err(e)) => {
                    error!(file = %f.name, error = %e, "a served file cannot be read");
                    false
                }
                Err(_) => false,
            }
        }
    };
    if right {
        return Ok(());
    }
    app.metrics.file_errors.inc();
    Err(ApiError(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!(
            "{} changed on the server since it started; the operator must restore it or restart the server",
            f.name
        ),
    ))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `www_dir` the configuration or `--www-dir` names must exist; the
    /// default one may be missing (the server runs without its page), and
    /// a page without its bundle only warns.
    #[test]
    fn a_given_www_dir_must_exist_and_a_default_one_may_be_missing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("www");
        let err = check_www_dir(&missing, WwwDir::Given).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("www_dir {} is not a directory", missing.display())),
            "{err}"
        );
        check_www_dir(&missing, WwwDir::Default).unwrap();
        std::fs::create_dir(&missing).unwrap();
        std::fs::write(missing.join("index.html"), "<html>").unwrap();
        check_www_dir(&missing, WwwDir::Given).unwrap();
    }

    #[test]
    fn a_failed_start_removes_the_database_it_created() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.sqlite3");
        for suffix in ["", "-wal", "-shm"] {
            std::fs::write(dir.path().join(format!("t.sqlite3{suffix}")), b"x").unwrap();
        }
        std::fs::write(dir.path().join("t.lock"), b"1").unwrap();
        remove_database(&db);
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec!["t.lock"]);
    }
}
