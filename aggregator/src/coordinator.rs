//! The round state machine, run as one task that owns all round state.
//!
//! Connections talk to it through [`CoordinatorHandle`]; it answers each
//! command in order, so no lock guards the round. A round goes
//! open → collecting → aggregating → committed:
//!
//! * **collecting**: updates are checked ([`Round::accept`]) and summed.
//! * The round is **aggregated** as soon as it holds `max_participants`
//!   updates, or holds at least `min_participants` and every connected
//!   participant has sent one, or its deadline passes with at least
//!   `min_participants` (see [`QuorumPolicy`] for fewer).
//! * **committed**: the mean is written to SQLite; only after the write
//!   returned is it broadcast as `GlobalModel`, followed by the next
//!   `RoundOpen` (or `TaskFinished`).
//!
//! A participant that disconnects simply stops being waited for; one that
//! stalls is waited for until the deadline only.
//!
//! Every accepted update is written to the store before it is summed and
//! acknowledged, and restored into the reopened round after a restart. A
//! participant that presents a participant key gets the same id on every
//! connection (the store maps the key's hash to it), so an update it had
//! accepted before a reconnect or restart counts once: it is told with
//! `UpdateAccepted` right after `GlobalModel`, and a second one is refused
//! as a duplicate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use fedsb_privacy::pld::single_step_delta;
use fedsb_privacy::{append_segment, epsilon_spent, AccountantKind, TrainingSegment};
use fedsb_protocol::{
    AdapterState, ClientUpdate, ErrorCode, FileRef, ParticipantId, PrivacyPolicy, PrivacyReport,
    RoundId, ServerMessage, TaskInfo, Tensor, PROTOCOL_VERSION,
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tracing::{error, info, warn};

use crate::config::{Config, QuorumPolicy};
use crate::files::{initial_adapter, ServedFile};
use crate::init_round::{
    build_adapter_file, hash_file, CentreCollector, InitCollector, InitModules, SharedFiles,
};
use crate::metrics::Metrics;
use crate::round::{Rejection, Round};
use crate::store::{
    sha256_hex, CommittedRound, PendingUpdate, RoundMeta, Store, StoredPrivacyReport,
};

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Frames queued for one connection, at most this many; a participant that
/// falls further behind is disconnected.
pub const OUTBOX_FRAMES: usize = 64;

/// Where the coordinator sends one participant's frames.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub frames: mpsc::Sender<Bytes>,
    /// Notified when the coordinator drops the participant.
    pub kick: Arc<Notify>,
}

enum Command {
    Join {
        client: String,
        participant_key: Option<String>,
        outbox: Outbox,
        reply: oneshot::Sender<Result<ParticipantId, Rejection>>,
    },
    Update {
        participant: ParticipantId,
        update: Box<ClientUpdate>,
        frame_bytes: u64,
        /// The update's privacy report accounted off the coordinator's
        /// task ([`CoordinatorHandle::update`]).
        accounted: Option<Accounted>,
        reply: oneshot::Sender<Result<RoundId, Rejection>>,
    },
    /// The participant's privacy entry, for accounting an update.
    PrivacyOf {
        participant: ParticipantId,
        reply: oneshot::Sender<Result<Option<ParticipantPrivacy>, Rejection>>,
    },
    Leave {
        participant: ParticipantId,
    },
    InitGradient {
        participant: ParticipantId,
        module: u32,
        gradient: Tensor,
        frame_bytes: u64,
        reply: oneshot::Sender<Result<(), Rejection>>,
    },
    InitDone {
        participant: ParticipantId,
        num_samples: u64,
        reply: oneshot::Sender<Result<u64, Rejection>>,
    },
    CentreLogits {
        participant: ParticipantId,
        logit_sums: Tensor,
        num_samples: u64,
        frame_bytes: u64,
        reply: oneshot::Sender<Result<u64, Rejection>>,
    },
}

/// An update's privacy report as [`account_update`] accounted it, and the
/// number of the participant's accepted updates it was accounted after (so
/// the coordinator can tell whether its entry changed since).
struct Accounted {
    epsilon: Option<f64>,
    after_updates: u64,
}

/// Cheap handle to the coordinator task.
#[derive(Clone, Debug)]
pub struct CoordinatorHandle {
    tx: mpsc::Sender<Command>,
    /// The task's DP policy and local steps, for checking and accounting
    /// updates on the connections' tasks.
    policy: Option<PrivacyPolicy>,
    local_steps: u64,
    /// How many accountings run at once (one per CPU): a PLD can take
    /// hundreds of MB.
    accounting: Arc<tokio::sync::Semaphore>,
}

impl CoordinatorHandle {
    /// Registers a participant after a valid `Hello`. The coordinator queues
    /// `Welcome`, the current `GlobalModel`, `UpdateAccepted` if the
    /// participant key's update for the collecting round is in, and, if a
    /// round is collecting, `RoundOpen` on the outbox before answering. A
    /// participant key that another open connection presented is refused
    /// ([`ErrorCode::AlreadyConnected`]).
    pub async fn join(
        &self,
        client: String,
        participant_key: Option<String>,
        outbox: Outbox,
    ) -> Result<ParticipantId, Rejection> {
        self.ask(|reply| Command::Join {
            client,
            participant_key,
            outbox,
            reply,
        })
        .await
    }

    /// Offers an update; returns the round it was accepted into.
    ///
    /// An update with a privacy report is accounted first, here, on the
    /// connection's task ([`account_update`]: a PLD takes 60–90 ms, more
    /// for many steps), so that the coordinator, which serves every other
    /// participant, only checks and records it.
    pub async fn update(
        &self,
        participant: ParticipantId,
        update: ClientUpdate,
        frame_bytes: u64,
    ) -> Result<RoundId, Rejection> {
        let accounted = match &update.privacy {
            Some(report) => {
                check_report(report, self.policy.as_ref(), self.local_steps)?;
                let before = self
                    .ask(|reply| Command::PrivacyOf { participant, reply })
                    .await?;
                let _permit = self.accounting.acquire().await.map_err(|_| {
                    Rejection::new(ErrorCode::Internal, "the aggregator is shutting down")
                })?;
                let epsilon =
                    account_update(before.as_ref(), participant, report, self.policy.as_ref())
                        .await?;
                Some(Accounted {
                    epsilon,
                    after_updates: before.map_or(0, |p| p.updates),
                })
            }
            None => None,
        };
        self.ask(|reply| Command::Update {
            participant,
            update: Box::new(update),
            frame_bytes,
            accounted,
            reply,
        })
        .await
    }

    /// Offers one module's initialization gradient.
    pub async fn init_gradient(
        &self,
        participant: ParticipantId,
        module: u32,
        gradient: Tensor,
        frame_bytes: u64,
    ) -> Result<(), Rejection> {
        self.ask(|reply| Command::InitGradient {
            participant,
            module,
            gradient,
            frame_bytes,
            reply,
        })
        .await
    }

    /// The participant has sent every initialization gradient.
    pub async fn init_done(
        &self,
        participant: ParticipantId,
        num_samples: u64,
    ) -> Result<u64, Rejection> {
        self.ask(|reply| Command::InitDone {
            participant,
            num_samples,
            reply,
        })
        .await
    }

    /// Offers the participant's logit sums for centring the initial head.
    pub async fn centre_logits(
        &self,
        participant: ParticipantId,
        logit_sums: Tensor,
        num_samples: u64,
        frame_bytes: u64,
    ) -> Result<u64, Rejection> {
        self.ask(|reply| Command::CentreLogits {
            participant,
            logit_sums,
            num_samples,
            frame_bytes,
            reply,
        })
        .await
    }

    /// Sends the command `make` builds around a reply channel and awaits
    /// the coordinator's answer; a coordinator that is gone answers
    /// [`ErrorCode::Internal`].
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, Rejection>>) -> Command,
    ) -> Result<T, Rejection> {
        let (reply, rx) = oneshot::channel();
        let internal = || Rejection::new(ErrorCode::Internal, "the aggregator is shutting down");
        self.tx.send(make(reply)).await.map_err(|_| internal())?;
        rx.await.map_err(|_| internal())?
    }

    /// The participant is gone.
    pub async fn leave(&self, participant: ParticipantId) {
        let _ = self.tx.send(Command::Leave { participant }).await;
    }
}

/// Snapshot served by `/api/status`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Status {
    pub task_id: String,
    pub protocol_version: u16,
    /// `initializing`, `centring` (the initial head, `[adapter]
    /// centre_head`), `collecting` or `finished`.
    pub state: &'static str,
    /// The round collecting updates (absent when finished).
    pub round: Option<u64>,
    pub last_committed_round: u64,
    pub total_rounds: u64,
    pub participants_connected: usize,
    pub updates_in_round: usize,
    pub min_participants: u32,
    pub max_participants: u32,
    pub deadline_unix_ms: Option<u64>,
    /// Differential privacy spent per participant, from the privacy reports
    /// of its accepted updates (empty for tasks without DP). The reports of
    /// committed rounds are stored with the round and those of the open
    /// round with its pending updates, so the list survives a restart.
    pub privacy: Vec<ParticipantPrivacy>,
}

/// What one participant reported spending (its latest accepted update's
/// [`fedsb_protocol::PrivacyReport`], with steps summed over its updates),
/// and what the aggregator accounts for it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ParticipantPrivacy {
    pub participant: u64,
    pub client: String,
    /// ε spent over all its updates, at `delta`, as the participant reports
    /// it (the largest report: a participant that lost its ledger reports
    /// less).
    pub epsilon_spent: f64,
    /// ε at `delta` that the aggregator itself accounts for the (σ, q,
    /// steps) of every update it accepted from this participant, with
    /// [`account_epsilon`]: it does not rely on the participant's ledger.
    /// `None` where no accountant bounds it (an update without noise, on a
    /// task without DP).
    pub epsilon_accounted: Option<f64>,
    pub delta: f64,
    pub noise_multiplier: f64,
    pub sample_rate: f64,
    pub clip_norm: f64,
    /// DP-SGD steps of all its accepted updates.
    pub steps: u64,
    /// Accepted updates that carried a report.
    pub updates: u64,
    pub last_round: u64,
    pub connected: bool,
    /// The accepted updates' DP-SGD steps, as a participant's ledger holds
    /// them ([`fedsb_privacy::append_segment`]); `None` once an update
    /// could not be accounted (σ = 0).
    #[serde(skip)]
    segments: Option<Vec<TrainingSegment>>,
    /// Whether `epsilon_accounted` may be behind `segments`: restored from
    /// rows stored without it (before schema version 6, or unbounded), or
    /// a restored pending update added since. [`account_all`] accounts
    /// these at start; every other entry's is the one stored with its
    /// latest update.
    #[serde(skip)]
    stale: bool,
}

/// The accountant the aggregator's ε of a participant on a DP task comes
/// from (a task without DP shows [`rdp_epsilon`]): the
/// privacy-loss-distribution accountant that participants use by default,
/// at its default spacing, so the aggregator and a participant whose
/// ledger holds the same steps compute the same ε; the RDP bound (looser,
/// never below the true ε) where the PLD would need too many grid points.
/// `None` where neither bounds it.
pub fn account_epsilon(segments: &[TrainingSegment], delta: f64) -> Option<f64> {
    [AccountantKind::Pld, AccountantKind::Rdp]
        .into_iter()
        .filter_map(|kind| epsilon_spent(kind, segments, delta).ok())
        .find(|e| e.is_finite())
}

/// The RDP bound of `segments` at `delta` (milliseconds, any σ): what the
/// aggregator shows for reports on a task without DP, which sets no budget
/// to hold them to.
fn rdp_epsilon(segments: &[TrainingSegment], delta: f64) -> Option<f64> {
    epsilon_spent(AccountantKind::Rdp, segments, delta)
        .ok()
        .filter(|e| e.is_finite())
}

/// How far the ε the aggregator accounts may exceed a task's target before
/// it refuses an update: a participant checks its budget with the same
/// accountant on a superset of the same steps, and the browser's
/// floating-point functions may round a few grid points of the PLD
/// differently from the native ones.
pub const ACCOUNTING_TOLERANCE: f64 = 1e-3;

struct Peer {
    client: String,
    outbox: Outbox,
}

enum Phase {
    /// Federated LoRA-SB initialization: collecting the participants'
    /// gradients before round 1.
    Initializing {
        collector: Box<InitCollector>,
        deadline: Instant,
    },
    /// Centring the initial head (`[adapter] centre_head`): the federated
    /// initialization's adapter file is served; collecting the
    /// participants' logit sums before round 0 is committed.
    Centring {
        centring: Box<Centring>,
        deadline: Instant,
    },
    Collecting {
        round: Round,
        deadline: Instant,
    },
    Finished,
}

/// Round 0 of a federated initialization while its head is centred.
struct Centring {
    collector: CentreCollector,
    /// Round 0's state before centring (the adapter file's `R₀` and head).
    adapter: AdapterState,
    /// The `CentreRequest` frame.
    request: Bytes,
    /// Logit sums from this many participants suffice once nobody connected
    /// is still expected: the task's quorum, or fewer when fewer sent
    /// initialization gradients.
    quorum: usize,
    /// The initialization's participants, samples and bytes, for round 0.
    init_participants: u32,
    init_samples: u64,
    init_bytes_in: u64,
    opened_unix_ms: u64,
    started: Instant,
}

/// What the coordinator starts from.
pub enum Begin {
    /// The last committed round (round 0 when nothing was trained yet).
    Resume(Box<CommittedRound>),
    /// A federated initialization, then round 1.
    Initialize(Box<FederatedInit>),
}

/// Everything the federated initialization needs.
pub struct FederatedInit {
    pub modules: InitModules,
    pub head: fedsb_engine::reference::ClassifierHead<f32>,
    /// Where the adapter file is written (in the state directory).
    pub path: std::path::PathBuf,
    /// The files served at `/files/{sha256}`; the adapter file joins them.
    pub files: SharedFiles,
    /// `/api/task`'s copy of the task, updated with the adapter file.
    pub shared_task: Arc<std::sync::RwLock<Arc<TaskInfo>>>,
}

/// Owns the task's round state. Create with [`Coordinator::start`].
pub struct Coordinator {
    config: Arc<Config>,
    task: Arc<TaskInfo>,
    store: Store,
    metrics: Arc<Metrics>,
    peers: HashMap<ParticipantId, Peer>,
    next_participant: u64,
    global_round: RoundId,
    global_frame: Bytes,
    phase: Phase,
    status: watch::Sender<Status>,
    privacy: PrivacyMap,
    init: Option<Box<FederatedInit>>,
    /// The `InitRequest` frame while initializing.
    init_request: Option<Bytes>,
}

impl Coordinator {
    /// Starts the coordinator from the last committed round and returns its
    /// handle and a status feed. `privacy` is what the store holds of the
    /// committed rounds' privacy reports ([`Store::privacy_reports`]): the
    /// per-participant spending it starts from. `pending` are the updates
    /// the store holds for the round after the last committed one
    /// ([`Store::pending_updates`]): they are accepted into it again, in
    /// their order.
    pub fn start(
        config: Arc<Config>,
        task: Arc<TaskInfo>,
        store: Store,
        metrics: Arc<Metrics>,
        begin: Begin,
        privacy: Vec<StoredPrivacyReport>,
        pending: Vec<PendingUpdate>,
    ) -> (CoordinatorHandle, watch::Receiver<Status>) {
        let (tx, rx) = mpsc::channel(1024);
        let policy = task.privacy.clone();
        let local_steps = config.task.local_steps;
        let (global_round, global_frame, init) = match begin {
            Begin::Resume(last) => (RoundId(last.meta.round), Bytes::from(last.frame), None),
            Begin::Initialize(init) => (RoundId(0), Bytes::new(), Some(init)),
        };
        let placeholder = Status {
            task_id: task.task_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            state: "collecting",
            round: None,
            last_committed_round: global_round.0,
            total_rounds: config.task.rounds,
            participants_connected: 0,
            updates_in_round: 0,
            min_participants: config.task.min_participants,
            max_participants: config.task.max_participants,
            deadline_unix_ms: None,
            privacy: Vec::new(),
        };
        let (status, status_rx) = watch::channel(placeholder);
        let restored = restore_privacy(privacy, task.privacy.as_ref());
        if !restored.is_empty() {
            info!(
                participants = restored.len(),
                "per-participant privacy spending restored from the store"
            );
        }
        let mut c = Self {
            config,
            task,
            store,
            metrics,
            peers: HashMap::new(),
            // Ids stay unique across restarts of the same task.
            next_participant: now_unix_ms() * 1000,
            global_round,
            global_frame,
            phase: Phase::Finished,
            status,
            privacy: restored,
            init_request: None,
            init: None,
        };
        match init {
            Some(init) => c.start_initialization(init),
            None => {
                c.open_next_round();
                c.restore_pending(pending);
            }
        }
        let started = Instant::now();
        let accounted = account_all(&mut c.privacy, c.task.privacy.is_some());
        if accounted > 0 {
            info!(
                participants = accounted,
                seconds = started.elapsed().as_secs_f64(),
                "privacy accounted again for restored updates stored without the aggregator's ε"
            );
        }
        c.publish_status();
        tokio::spawn(c.run(rx));
        let handle = CoordinatorHandle {
            tx,
            policy,
            local_steps: u64::from(local_steps),
            accounting: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            )),
        };
        (handle, status_rx)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // A round restored full (the aggregator stopped between accepting
        // its last update and committing it) can take nothing more: commit
        // it now rather than at its deadline.
        if matches!(&self.phase, Phase::Collecting { round, .. } if round.is_full()) {
            self.commit().await;
            self.publish_status();
        }
        loop {
            let deadline = match &self.phase {
                Phase::Collecting { deadline, .. }
                | Phase::Initializing { deadline, .. }
                | Phase::Centring { deadline, .. } => Some(*deadline),
                Phase::Finished => None,
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.handle(cmd).await,
                    None => break,
                },
                () = sleep_until(deadline), if deadline.is_some() => self.on_deadline().await,
            }
            self.publish_status();
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Join {
                client,
                participant_key,
                outbox,
                reply,
            } => {
                let id = match self.participant_id(participant_key.as_deref()).await {
                    Ok(id) => id,
                    Err(r) => {
                        warn!(?client, code = r.code.as_str(), message = %r.message, "join refused");
                        let _ = reply.send(Err(r));
                        return;
                    }
                };
                let welcome = ServerMessage::Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    participant: id,
                    task: (*self.task).clone(),
                };
                let mut frames = vec![Bytes::from(welcome.encode())];
                frames.extend(self.frames_after_welcome(id));
                info!(participant = %id, ?client, keyed = participant_key.is_some(), "participant joined");
                self.peers.insert(id, Peer { client, outbox });
                for f in frames {
                    self.send_to(id, f);
                }
                self.metrics
                    .participants_connected
                    .set(self.peers.len() as i64);
                let _ = reply.send(Ok(id));
            }
            Command::PrivacyOf { participant, reply } => {
                let _ = reply.send(Ok(self.privacy.get(&participant).cloned()));
            }
            Command::Update {
                participant,
                update,
                frame_bytes,
                accounted,
                reply,
            } => {
                let result = self
                    .accept(participant, *update, frame_bytes, accounted)
                    .await;
                let accepted = result.is_ok();
                let _ = reply.send(result);
                if accepted {
                    self.maybe_commit().await;
                }
            }
            Command::InitGradient {
                participant,
                module,
                gradient,
                frame_bytes,
                reply,
            } => {
                let result = match &mut self.phase {
                    Phase::Initializing { collector, .. } => {
                        collector.gradient(participant, module, gradient, frame_bytes)
                    }
                    _ => Err(not_initializing()),
                };
                let _ = reply.send(result);
            }
            Command::InitDone {
                participant,
                num_samples,
                reply,
            } => {
                let result = match &mut self.phase {
                    Phase::Initializing { collector, .. } => {
                        collector.finish_participant(participant, num_samples)
                    }
                    _ => Err(not_initializing()),
                };
                let accepted = result.is_ok();
                if accepted {
                    info!(participant = %participant, num_samples, "initialization gradients accepted");
                }
                let _ = reply.send(result);
                if accepted {
                    self.maybe_commit().await;
                }
            }
            Command::CentreLogits {
                participant,
                logit_sums,
                num_samples,
                frame_bytes,
                reply,
            } => {
                let result = match &mut self.phase {
                    Phase::Centring { centring, .. } => {
                        centring
                            .collector
                            .add(participant, &logit_sums, num_samples, frame_bytes)
                    }
                    _ => Err(Rejection::new(
                        ErrorCode::NotInitializing,
                        "the task is not centring its initial head",
                    )),
                };
                let accepted = result.is_ok();
                if accepted {
                    info!(participant = %participant, num_samples, "logit sums for centring the head accepted");
                }
                let _ = reply.send(result);
                if accepted {
                    self.maybe_commit().await;
                }
            }
            Command::Leave { participant } => {
                if let Phase::Initializing { collector, .. } = &mut self.phase {
                    collector.leave(participant);
                }
                if let Some(p) = self.peers.remove(&participant) {
                    info!(participant = %participant, client = ?p.client, "participant left");
                }
                self.metrics
                    .participants_connected
                    .set(self.peers.len() as i64);
                self.maybe_commit().await;
            }
        }
    }

    /// What a participant gets after its `Welcome`, by phase: the
    /// initialization's request (or `InitAccepted` for a participant key
    /// whose gradients are in already: it waits for the adapter file); the
    /// centring's request (or `CentreAccepted`; the `Welcome` lists the
    /// adapter file, round 0 follows the centring); otherwise the global
    /// model, `UpdateAccepted` when the key's update for the collecting
    /// round is in already, and the round's announcement.
    fn frames_after_welcome(&self, id: ParticipantId) -> Vec<Bytes> {
        if let Some(request) = &self.init_request {
            return vec![match &self.phase {
                Phase::Initializing { collector, .. } => match collector.samples_of(id) {
                    Some(num_samples) => {
                        Bytes::from(ServerMessage::InitAccepted { num_samples }.encode())
                    }
                    None => request.clone(),
                },
                _ => request.clone(),
            }];
        }
        if let Phase::Centring { centring, .. } = &self.phase {
            return vec![match centring.collector.samples_of(id) {
                Some(num_samples) => {
                    Bytes::from(ServerMessage::CentreAccepted { num_samples }.encode())
                }
                None => centring.request.clone(),
            }];
        }
        let mut frames = vec![self.global_frame.clone()];
        if let Phase::Collecting { round, .. } = &self.phase {
            if round.has(id) {
                info!(participant = %id, round = %round.id,
                    "the participant's update for the collecting round is in already");
                let accepted = ServerMessage::UpdateAccepted { round: round.id };
                frames.push(Bytes::from(accepted.encode()));
            }
        }
        frames.push(Bytes::from(self.round_announcement().encode()));
        frames
    }

    /// The id of a joining participant: the one its key has (refused while
    /// another connection with the key is open), or a new one.
    async fn participant_id(&mut self, key: Option<&str>) -> Result<ParticipantId, Rejection> {
        let fresh = ParticipantId(self.next_participant);
        self.next_participant += 1;
        let Some(key) = key else {
            return Ok(fresh);
        };
        let (id, known) = self
            .store
            .participant_for_key(sha256_hex(key.as_bytes()), fresh, now_unix_ms())
            .await
            .map_err(|e| {
                error!(error = %e, "cannot look up a participant key");
                Rejection::new(
                    ErrorCode::Internal,
                    "the aggregator cannot look up the participant key; try again later",
                )
            })?;
        if self.peers.contains_key(&id) {
            return Err(Rejection::new(
                ErrorCode::AlreadyConnected,
                format!(
                    "participant {id} (this participant key) is connected already: the same data \
                     joined twice (another tab or process), or the previous connection is not \
                     closed yet; leave there first, or try again when it has timed out"
                ),
            ));
        }
        if known {
            info!(participant = %id, "a known participant key joins again");
        }
        Ok(id)
    }

    /// Accepts the store's pending updates into the round that was just
    /// opened, in their order, as they were accepted before the restart.
    fn restore_pending(&mut self, pending: Vec<PendingUpdate>) {
        let Phase::Collecting { round, .. } = &mut self.phase else {
            if !pending.is_empty() {
                error!(
                    updates = pending.len(),
                    "stored pending updates but no round collects them"
                );
            }
            return;
        };
        for p in pending {
            let report = p.update.privacy.clone();
            let participant = p.participant;
            match round.accept(
                p.participant,
                &p.client,
                p.update,
                p.frame_bytes,
                p.received_unix_ms,
            ) {
                Ok(()) => {
                    if let Some(r) = report {
                        record_privacy(&mut self.privacy, participant, &p.client, round.id.0, &r);
                    }
                    info!(participant = %participant, round = %round.id,
                        "restored an update accepted before the restart");
                }
                Err(r) => {
                    error!(participant = %participant, round = %round.id, reason = %r.message,
                    "a stored pending update does not fit the round; it is not counted")
                }
            }
        }
    }

    async fn accept(
        &mut self,
        participant: ParticipantId,
        update: ClientUpdate,
        frame_bytes: u64,
        accounted: Option<Accounted>,
    ) -> Result<RoundId, Rejection> {
        let client = self
            .peers
            .get(&participant)
            .map(|p| p.client.clone())
            .unwrap_or_default();
        match &mut self.phase {
            Phase::Initializing { .. } => Err(Rejection::new(
                ErrorCode::FutureRound,
                "the task is still collecting initialization gradients; round 1 is not open yet",
            )),
            Phase::Centring { .. } => Err(Rejection::new(
                ErrorCode::FutureRound,
                "the task is still centring its initial head; round 1 is not open yet",
            )),
            Phase::Finished => Err(Rejection::new(
                ErrorCode::TaskFinished,
                format!(
                    "the task finished after round {}; no round accepts updates",
                    self.global_round
                ),
            )),
            Phase::Collecting { round, .. } => {
                if let Some(policy) = &self.task.privacy {
                    check_report_against_policy(update.privacy.as_ref(), policy)?;
                }
                let report = update.privacy.clone();
                if let Some(r) = &report {
                    let local_steps = u64::from(self.config.task.local_steps);
                    check_report(r, self.task.privacy.as_ref(), local_steps)?;
                }
                round.check(participant, &update)?;
                let before = self.privacy.get(&participant);
                let accounted = match (&report, accounted) {
                    // Accounted on the connection's task against the
                    // entry as it still is.
                    (Some(_), Some(a)) if a.after_updates == before.map_or(0, |p| p.updates) => {
                        Some(a.epsilon)
                    }
                    // Not accounted, or the entry changed since (another
                    // update of this participant was accepted meanwhile).
                    (Some(r), _) => Some(
                        account_update(before, participant, r, self.task.privacy.as_ref()).await?,
                    ),
                    (None, _) => None,
                };
                // Durable before it counts and before the participant hears
                // that it does.
                let received = now_unix_ms();
                let pending = PendingUpdate {
                    participant,
                    client: client.clone(),
                    seq: round.len() as u64,
                    frame_bytes,
                    received_unix_ms: received,
                    update: update.clone(),
                };
                if let Err(e) = self.store.put_pending(round.id, pending).await {
                    error!(participant = %participant, round = %round.id, error = %e,
                        "cannot store an update; refusing it");
                    return Err(Rejection::new(
                        ErrorCode::Internal,
                        format!(
                            "the aggregator could not store the update for round {}; it does not \
                             count, send it again",
                            round.id
                        ),
                    ));
                }
                round.add(participant, &client, update, frame_bytes, received);
                if let Some(r) = report {
                    let entry =
                        record_privacy(&mut self.privacy, participant, &client, round.id.0, &r);
                    entry.epsilon_accounted = accounted.flatten();
                    entry.stale = false;
                    info!(
                        participant = %participant,
                        epsilon_spent = r.epsilon_spent,
                        epsilon_accounted = ?entry.epsilon_accounted,
                        delta = r.delta,
                        noise_multiplier = r.noise_multiplier,
                        "privacy report"
                    );
                }
                Ok(round.id)
            }
        }
    }

    /// Commits when the round is full, or has its quorum and nobody
    /// connected is still expected.
    async fn maybe_commit(&mut self) {
        if let Phase::Initializing { collector, .. } = &self.phase {
            let n = collector.contributors();
            let quorum = n >= self.config.task.min_participants as usize;
            let nobody_pending = self.peers.keys().all(|p| collector.has(*p));
            if n >= self.config.task.max_participants as usize || (quorum && nobody_pending) {
                self.finish_initialization().await;
            }
            return;
        }
        if let Phase::Centring { centring, .. } = &self.phase {
            let c = &centring.collector;
            let n = c.contributors();
            let nobody_pending = self.peers.keys().all(|p| c.samples_of(*p).is_some());
            if n >= self.config.task.max_participants as usize
                || (n >= centring.quorum && nobody_pending)
            {
                self.finish_centring().await;
            }
            return;
        }
        let Phase::Collecting { round, .. } = &self.phase else {
            return;
        };
        let quorum = round.len() >= self.config.task.min_participants as usize;
        let nobody_pending = self.peers.keys().all(|p| round.has(*p));
        if round.is_full() || (quorum && nobody_pending) {
            self.commit().await;
        }
    }

    async fn on_deadline(&mut self) {
        if let Phase::Initializing { collector, .. } = &self.phase {
            let n = collector.contributors();
            let quorum = n >= self.config.task.min_participants as usize;
            let take_available =
                self.config.task.on_quorum_missed == QuorumPolicy::AggregateAvailable && n > 0;
            if quorum || take_available {
                self.finish_initialization().await;
                return;
            }
            warn!(
                contributions = n,
                needed = self.config.task.min_participants,
                "initialization deadline passed without a quorum; extending it"
            );
            let length = self.round_length();
            if let Phase::Initializing { deadline, .. } = &mut self.phase {
                *deadline = deadline_after(length);
            }
            return;
        }
        if let Phase::Centring { centring, .. } = &self.phase {
            // Any participant's sums estimate the mean logits; without any
            // the head cannot be centred, and the task waits for them.
            if centring.collector.contributors() > 0 {
                self.finish_centring().await;
                return;
            }
            warn!("centring deadline passed without any participant's logit sums; extending it");
            self.extend_centring();
            return;
        }
        let Phase::Collecting { round, .. } = &self.phase else {
            return;
        };
        let quorum = round.len() >= self.config.task.min_participants as usize;
        let take_available = self.config.task.on_quorum_missed == QuorumPolicy::AggregateAvailable
            && !round.is_empty();
        if quorum || take_available {
            self.commit().await;
            return;
        }
        warn!(round = %round.id, updates = round.len(), needed = self.config.task.min_participants,
            "deadline passed without a quorum; extending the round");
        let length = self.round_length();
        if let Phase::Collecting { deadline, .. } = &mut self.phase {
            *deadline = deadline_after(length);
        }
        let open = Bytes::from(self.round_announcement().encode());
        self.broadcast(open);
    }

    async fn commit(&mut self) {
        let Phase::Collecting { round, .. } = std::mem::replace(&mut self.phase, Phase::Finished)
        else {
            return;
        };
        let started = Instant::now();
        let id = round.id;
        let opened = round.opened_unix_ms;
        // Keep the round until the write succeeded: no accepted update is lost.
        let step = self.config.task.server_step();
        let models = if step.is_mean() {
            Ok(None)
        } else {
            self.previous_global_models(id).await.map(Some)
        };
        let models = match models {
            Ok(m) => m,
            Err(e) => {
                error!(round = %id, error = %e, "cannot read the previous global models for the server's step; keeping the round's updates and retrying");
                self.phase = Phase::Collecting {
                    round,
                    deadline: deadline_after(Duration::from_secs(5)),
                };
                return;
            }
        };
        let aggregated = match &models {
            None => round.aggregate(),
            Some((previous, before)) => round.aggregate_step(step, previous, before.as_ref()),
        };
        let Some((state, mut contributions)) = aggregated else {
            self.phase = Phase::Collecting {
                round,
                deadline: deadline_after(self.round_length()),
            };
            return;
        };
        // Each participant has one update in the round, its latest: what
        // the aggregator accounts for it now is its ε with that update.
        for c in &mut contributions {
            if c.privacy.is_some() {
                c.epsilon_accounted = self
                    .privacy
                    .get(&c.participant)
                    .and_then(|p| p.epsilon_accounted);
            }
        }
        let total_samples: u64 = contributions.iter().map(|c| c.num_samples).sum();
        let frame = ServerMessage::GlobalModel {
            round: id,
            participants: contributions.len() as u32,
            total_samples,
            adapter: state,
        }
        .encode();
        let loss_weight: f64 = contributions
            .iter()
            .filter(|c| c.train_loss.is_some())
            .map(|c| c.num_samples as f64)
            .sum();
        let mean_train_loss = (loss_weight > 0.0).then(|| {
            contributions
                .iter()
                .filter_map(|c| c.train_loss.map(|l| f64::from(l) * c.num_samples as f64))
                .sum::<f64>()
                / loss_weight
        });
        let committed = now_unix_ms();
        let meta = RoundMeta {
            round: id.0,
            opened_unix_ms: opened,
            committed_unix_ms: committed,
            duration_ms: committed.saturating_sub(opened),
            aggregation_ms: started.elapsed().as_millis() as u64,
            participants: contributions.len() as u32,
            total_samples,
            bytes_in: contributions.iter().map(|c| c.frame_bytes).sum(),
            bytes_out: frame.len() as u64 * self.peers.len() as u64,
            mean_train_loss,
            global_sha256: sha256_hex(&frame),
        };
        if let Err(e) = self
            .store
            .commit_round(meta.clone(), frame.clone(), contributions)
            .await
        {
            error!(round = %id, error = %e, "cannot persist the round; keeping its updates and retrying at the next deadline");
            self.phase = Phase::Collecting {
                round,
                deadline: deadline_after(Duration::from_secs(5)),
            };
            return;
        }
        self.metrics
            .aggregation_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .round_duration
            .observe(meta.duration_ms as f64 / 1000.0);
        self.metrics.rounds_committed.inc();
        info!(round = %id, participants = meta.participants, samples = total_samples,
            sha256 = %meta.global_sha256, "round committed");
        self.global_round = id;
        self.global_frame = Bytes::from(frame);
        // The next round (or the finished task) is set before any participant
        // can hold the new global model (`broadcast` publishes the status).
        self.open_next_round();
        self.broadcast(self.global_frame.clone());
        let next = Bytes::from(self.round_announcement().encode());
        self.broadcast(next);
    }

    /// The global models the server's step of round `id` starts from: that
    /// of round `id − 1` (the one the round's updates trained from) and that
    /// of round `id − 2` (none for round 1), read back from the database
    /// (decoded and checked against their checksums), so a restart takes
    /// the same step.
    async fn previous_global_models(
        &self,
        id: RoundId,
    ) -> Result<(AdapterState, Option<AdapterState>), String> {
        let committed = |n: u64| async move {
            self.store
                .committed_round(RoundId(n))
                .await
                .map_err(|e| e.to_string())?
                .map(|c| c.adapter)
                .ok_or_else(|| format!("round {n} is not in the database"))
        };
        let previous = id.0.checked_sub(1).ok_or("round 0 is not aggregated")?;
        let prev = committed(previous).await?;
        let before = match previous.checked_sub(1) {
            None => None,
            Some(n) => Some(committed(n).await?),
        };
        Ok((prev, before))
    }

    fn start_initialization(&mut self, init: Box<FederatedInit>) {
        let request = ServerMessage::InitRequest {
            init_samples: self.config.adapter.init_samples,
            batch_size: self.config.task.batch_size,
            head_weight: Tensor {
                shape: vec![init.head.weight.rows as u32, init.head.weight.cols as u32],
                data: init.head.weight.data.clone(),
            },
            head_bias: Tensor {
                shape: vec![init.head.bias.len() as u32],
                data: init.head.bias.clone(),
            },
        };
        self.init_request = Some(Bytes::from(request.encode()));
        self.phase = Phase::Initializing {
            collector: Box::new(InitCollector::new(
                init.modules.shapes.clone(),
                self.config.adapter.init_samples,
                self.config.task.max_participants as usize,
            )),
            deadline: deadline_after(self.round_length()),
        };
        self.init = Some(init);
        info!(
            init_samples = self.config.adapter.init_samples,
            "federated LoRA-SB initialization: collecting the participants' gradients"
        );
    }

    /// Sums the gradients into A, B, R₀ (the adapter file), commits round 0,
    /// serves the file and opens round 1. On failure the gradients are kept
    /// and the initialization goes on collecting.
    async fn finish_initialization(&mut self) {
        let Phase::Initializing { collector, .. } =
            std::mem::replace(&mut self.phase, Phase::Finished)
        else {
            return;
        };
        let Some(init) = self.init.take() else {
            return;
        };
        let started = Instant::now();
        let opened = now_unix_ms();
        let config = self.config.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = build_adapter_file(&config, &init.modules, &collector, &init.head, &init.path)
                .map_err(|e| e.to_string())
                .and_then(|()| hash_file(&init.path).map_err(|e| e.to_string()));
            (r, init, collector)
        })
        .await;
        let (result, init, collector) = match result {
            Ok(x) => x,
            Err(e) => {
                error!("the initialization task panicked: {e}");
                return;
            }
        };
        let retry = |this: &mut Self, init, collector| {
            this.init = Some(init);
            this.phase = Phase::Initializing {
                collector,
                deadline: deadline_after(this.round_length()),
            };
        };
        let (sha256, size) = match result {
            Ok(x) => x,
            Err(e) => {
                error!("federated initialization failed: {e}");
                retry(self, init, collector);
                return;
            }
        };
        let mut with_file = (*self.config).clone();
        with_file.adapter.file = Some(init.path.clone());
        let adapter = match initial_adapter(&with_file) {
            Ok(a) => a,
            Err(e) => {
                error!("reading the new adapter file: {e}");
                retry(self, init, collector);
                return;
            }
        };
        if self.config.adapter.centre_head {
            self.start_centring(init, &collector, adapter, sha256, size, opened, started);
            return;
        }
        let frame = initial_frame(adapter);
        let now = now_unix_ms();
        let meta = RoundMeta {
            round: 0,
            opened_unix_ms: opened,
            committed_unix_ms: now,
            duration_ms: started.elapsed().as_millis() as u64,
            aggregation_ms: started.elapsed().as_millis() as u64,
            participants: collector.contributors() as u32,
            total_samples: collector.total_samples(),
            bytes_in: collector.bytes_in(),
            bytes_out: 0,
            mean_train_loss: None,
            global_sha256: sha256_hex(&frame),
        };
        if let Err(e) = self
            .store
            .commit_round(meta.clone(), frame.clone(), Vec::new())
            .await
        {
            error!("storing round 0 failed: {e}");
            retry(self, init, collector);
            return;
        }
        let file = self.serve_adapter_file(&init, sha256.clone(), size);
        info!(
            participants = collector.contributors(),
            samples = collector.total_samples(),
            %sha256,
            seconds = started.elapsed().as_secs_f64(),
            "federated initialization done: adapter file served, round 0 committed"
        );
        self.init_request = None;
        self.global_round = RoundId(0);
        self.global_frame = Bytes::from(frame);
        self.open_next_round();
        self.broadcast(Bytes::from(ServerMessage::AdapterReady { file }.encode()));
        self.broadcast(self.global_frame.clone());
        let next = Bytes::from(self.round_announcement().encode());
        self.broadcast(next);
    }

    /// Serves the federated initialization's adapter file and asks every
    /// participant for its logit sums under the initial model
    /// (`AdapterReady`, then `CentreRequest`); round 0 is committed once
    /// they are in ([`Self::finish_centring`]).
    #[allow(clippy::too_many_arguments)]
    fn start_centring(
        &mut self,
        init: Box<FederatedInit>,
        collector: &InitCollector,
        adapter: AdapterState,
        sha256: String,
        size: u64,
        opened_unix_ms: u64,
        started: Instant,
    ) {
        let file = self.serve_adapter_file(&init, sha256, size);
        let classes = adapter.head_bias.numel();
        let request = ServerMessage::CentreRequest {
            init_samples: self.config.adapter.init_samples,
            batch_size: self.config.task.batch_size,
            adapter: adapter.clone(),
        };
        let contributors = collector.contributors();
        let centring = Centring {
            collector: CentreCollector::new(classes, self.config.adapter.init_samples),
            adapter,
            request: Bytes::from(request.encode()),
            quorum: contributors.clamp(1, self.config.task.min_participants.max(1) as usize),
            init_participants: contributors as u32,
            init_samples: collector.total_samples(),
            init_bytes_in: collector.bytes_in(),
            opened_unix_ms,
            started,
        };
        let request = centring.request.clone();
        self.phase = Phase::Centring {
            centring: Box::new(centring),
            deadline: deadline_after(self.round_length()),
        };
        self.init_request = None;
        info!(
            participants = contributors,
            samples = collector.total_samples(),
            seconds = started.elapsed().as_secs_f64(),
            "federated initialization: adapter file served; centring the initial head"
        );
        self.broadcast(Bytes::from(ServerMessage::AdapterReady { file }.encode()));
        self.broadcast(request);
    }

    /// Moves the centring's deadline one round length from now.
    fn extend_centring(&mut self) {
        let length = self.round_length();
        if let Phase::Centring { deadline, .. } = &mut self.phase {
            *deadline = deadline_after(length);
        }
    }

    /// Adds the federated initialization's adapter file to the files served
    /// and to the task's file list.
    fn serve_adapter_file(&mut self, init: &FederatedInit, sha256: String, size: u64) -> FileRef {
        let file = FileRef {
            name: "adapter.safetensors".into(),
            sha256: sha256.clone(),
            size,
            url: format!("/files/{sha256}"),
        };
        if let Ok(mut files) = init.files.write() {
            files.insert(
                sha256.clone(),
                ServedFile {
                    name: file.name.clone(),
                    path: init.path.clone(),
                    sha256,
                    size,
                },
            );
        }
        let mut task = (*self.task).clone();
        task.files.push(file.clone());
        self.task = Arc::new(task);
        if let Ok(mut t) = init.shared_task.write() {
            *t = self.task.clone();
        }
        file
    }

    /// Centres round 0's head with the logit sums collected, commits round 0
    /// and opens round 1. When that fails, the sums are kept and the
    /// centring goes on collecting until its (extended) deadline.
    async fn finish_centring(&mut self) {
        let Phase::Centring { centring, .. } = &self.phase else {
            return;
        };
        let mut adapter = centring.adapter.clone();
        let means = match centring.collector.centre(&mut adapter.head_bias.data) {
            Ok(m) => m,
            Err(e) => {
                error!("cannot centre the initial head: {e}; the centring goes on collecting");
                self.extend_centring();
                return;
            }
        };
        let frame = initial_frame(adapter);
        let c = &centring.collector;
        let meta = RoundMeta {
            round: 0,
            opened_unix_ms: centring.opened_unix_ms,
            committed_unix_ms: now_unix_ms(),
            duration_ms: centring.started.elapsed().as_millis() as u64,
            aggregation_ms: centring.started.elapsed().as_millis() as u64,
            participants: centring.init_participants,
            total_samples: centring.init_samples,
            bytes_in: centring.init_bytes_in + c.bytes_in(),
            bytes_out: 0,
            mean_train_loss: None,
            global_sha256: sha256_hex(&frame),
        };
        let (contributors, samples) = (c.contributors(), c.total_samples());
        if let Err(e) = self
            .store
            .commit_round(meta, frame.clone(), Vec::new())
            .await
        {
            error!("storing round 0 failed: {e}; the centring goes on collecting");
            self.extend_centring();
            return;
        }
        info!(
            participants = contributors,
            samples,
            mean_logits = ?means,
            "initial head centred; round 0 committed"
        );
        self.global_round = RoundId(0);
        self.global_frame = Bytes::from(frame);
        self.open_next_round();
        self.broadcast(self.global_frame.clone());
        let next = Bytes::from(self.round_announcement().encode());
        self.broadcast(next);
    }

    /// Opens the round after the last committed one, or finishes the task.
    fn open_next_round(&mut self) {
        if self.global_round.0 >= self.config.task.rounds {
            self.phase = Phase::Finished;
            self.metrics.current_round.set(0);
            info!(rounds = self.global_round.0, "task finished");
            return;
        }
        let id = self.global_round.next();
        self.phase = Phase::Collecting {
            round: Round::new(
                id,
                self.task.shape,
                self.config.task.weighting,
                self.config.task.max_participants,
                u64::from(self.config.task.local_steps) * u64::from(self.config.task.batch_size),
                now_unix_ms(),
            ),
            deadline: deadline_after(self.round_length()),
        };
        self.metrics.current_round.set(id.0 as i64);
    }

    fn round_length(&self) -> Duration {
        Duration::from_secs(self.config.task.round_deadline_secs)
    }

    /// `RoundOpen` for the collecting round, or `TaskFinished`.
    fn round_announcement(&self) -> ServerMessage {
        match &self.phase {
            Phase::Collecting { round, deadline } => ServerMessage::RoundOpen {
                round: round.id,
                deadline_unix_ms: unix_ms_at(*deadline),
                local_steps: self.config.task.local_steps,
                learning_rate: self.config.task.round_learning_rate(round.id.0),
            },
            Phase::Finished | Phase::Initializing { .. } | Phase::Centring { .. } => {
                ServerMessage::TaskFinished {
                    rounds_committed: self.global_round.0,
                }
            }
        }
    }

    /// Sends `frame` to every participant, after publishing the status: no
    /// frame leaves before `/api/status` shows the state that sent it (a
    /// participant holding a round's global model reads the next round or
    /// the finished task; one told of an extended deadline reads it too).
    fn broadcast(&mut self, frame: Bytes) {
        self.publish_status();
        let ids: Vec<ParticipantId> = self.peers.keys().copied().collect();
        for id in ids {
            self.send_to(id, frame.clone());
        }
    }

    /// Queues a frame; a participant whose queue is full is dropped, and so
    /// is one whose connection has ended.
    fn send_to(&mut self, id: ParticipantId, frame: Bytes) {
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        match peer.outbox.frames.try_send(frame) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(participant = %id, "participant is not reading its frames; disconnecting it");
                peer.outbox.kick.notify_one();
            }
            // The connection ended and its `Leave` is on its way: a
            // participant that leaves (e.g. after `--max-rounds`) while a
            // round commits. Nothing is wrong.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                info!(participant = %id, client = ?peer.client, "participant left");
            }
        }
        self.peers.remove(&id);
        self.metrics
            .participants_connected
            .set(self.peers.len() as i64);
    }

    fn publish_status(&self) {
        let (state, round, updates, deadline) = match &self.phase {
            Phase::Collecting { round, deadline } => (
                "collecting",
                Some(round.id.0),
                round.len(),
                Some(unix_ms_at(*deadline)),
            ),
            Phase::Initializing {
                collector,
                deadline,
            } => (
                "initializing",
                None,
                collector.contributors(),
                Some(unix_ms_at(*deadline)),
            ),
            Phase::Centring { centring, deadline } => (
                "centring",
                None,
                centring.collector.contributors(),
                Some(unix_ms_at(*deadline)),
            ),
            Phase::Finished => ("finished", None, 0, None),
        };
        let s = Status {
            task_id: self.task.task_id.clone(),
            protocol_version: PROTOCOL_VERSION,
            state,
            round,
            last_committed_round: self.global_round.0,
            total_rounds: self.config.task.rounds,
            participants_connected: self.peers.len(),
            updates_in_round: updates,
            min_participants: self.config.task.min_participants,
            max_participants: self.config.task.max_participants,
            deadline_unix_ms: deadline,
            privacy: self
                .privacy
                .values()
                .map(|p| ParticipantPrivacy {
                    connected: self.peers.contains_key(&ParticipantId(p.participant)),
                    ..p.clone()
                })
                .collect(),
        };
        self.status.send_if_modified(|old| {
            let changed = *old != s;
            *old = s;
            changed
        });
    }
}

type PrivacyMap = std::collections::BTreeMap<ParticipantId, ParticipantPrivacy>;

/// The steps of `before` (what the aggregator accepted from `participant`
/// so far) and those of the update reporting `r`.
fn segments_with(
    before: Option<&ParticipantPrivacy>,
    r: &PrivacyReport,
) -> Option<Vec<TrainingSegment>> {
    let mut segments = match before {
        Some(p) => p.segments.clone()?,
        None => Vec::new(),
    };
    TrainingSegment::new(r.sample_rate, r.noise_multiplier, r.steps)
        .and_then(|s| append_segment(&mut segments, s))
        .ok()?;
    Some(segments)
}

/// The ε the aggregator accounts for `participant` once the update
/// reporting `r` is added to the updates it accepted from it (`before`),
/// computed off the async threads (a PLD takes tens of milliseconds).
///
/// A task with DP refuses an update that would take it beyond the task's
/// ε: the aggregator's own count, kept under the participant's key, holds
/// where the participant's ledger was lost or reset and it reports less.
/// A report of less ε than the aggregator accounts is logged.
async fn account_update(
    before: Option<&ParticipantPrivacy>,
    participant: ParticipantId,
    r: &PrivacyReport,
    policy: Option<&PrivacyPolicy>,
) -> Result<Option<f64>, Rejection> {
    let delta = r.delta;
    let refuse = |why: String| Err(Rejection::new(ErrorCode::InvalidPrivacyReport, why));
    if let Some(policy) = policy {
        // The PLD of a tiny σ can take a second and hundreds of MB, on the
        // coordinator's time: one step's exact δ (microseconds) refuses
        // first what no count of steps could fit, as the PLD would.
        let limit = policy.epsilon * (1.0 + ACCOUNTING_TOLERANCE);
        let one_step = single_step_delta(r.sample_rate, r.noise_multiplier, limit);
        if one_step.is_ok_and(|d| d > policy.delta * (1.0 + ACCOUNTING_TOLERANCE)) {
            return refuse(format!(
                "one DP-SGD step at q = {}, σ = {} alone spends more than the task's ε = {} \
                 at δ = {}",
                r.sample_rate, r.noise_multiplier, policy.epsilon, policy.delta
            ));
        }
    }
    let accounted = match segments_with(before, r) {
        Some(s) if policy.is_some() => {
            tokio::task::spawn_blocking(move || account_epsilon(&s, delta))
                .await
                .unwrap_or(None)
        }
        Some(s) => rdp_epsilon(&s, delta),
        None => None,
    };
    let reported_before = before.map_or(0.0, |p| p.epsilon_spent);
    // Only a participant with accepted updates can have lost a ledger.
    let reset = before.is_some()
        && (r.epsilon_spent < reported_before
            || accounted.is_some_and(|a| r.epsilon_spent < a * (1.0 - ACCOUNTING_TOLERANCE)));
    if reset {
        // Cumulative ε does not go down by itself, and a participant's
        // ledger holds at least the steps of its accepted updates: a lost
        // ledger restarts its count (or a tighter accountant gives less).
        warn!(participant = %participant, epsilon_spent = r.epsilon_spent,
            reported_before, epsilon_accounted = ?accounted,
            "a participant reports less ε spent than before or than the aggregator accounts: \
             its privacy ledger may have been reset");
    }
    let Some(policy) = policy else {
        return Ok(accounted);
    };
    let steps = before.map_or(0, |p| p.steps).saturating_add(r.steps);
    let updates = before.map_or(0, |p| p.updates) + 1;
    let why = match accounted {
        Some(a) if a <= policy.epsilon * (1.0 + ACCOUNTING_TOLERANCE) => return Ok(accounted),
        Some(a) => format!(
            "this update would bring the ε the aggregator accounts for participant {participant} \
             to {a:.4} (δ = {delta}; {steps} DP-SGD steps in {updates} updates), beyond the \
             task's ε = {}; the participant reports ε = {}",
            policy.epsilon, r.epsilon_spent
        ),
        None => format!(
            "the aggregator cannot bound the ε of participant {participant}'s {steps} DP-SGD \
             steps in {updates} updates; the task's ε is {}",
            policy.epsilon
        ),
    };
    let hint = if reset {
        ": its privacy ledger may have been reset or lost (the aggregator counts every update \
         it accepted under this participant's key)"
    } else {
        ""
    };
    refuse(format!("{why}{hint}"))
}

/// Adds one accepted update's report to its participant's entry: ε spent, δ,
/// σ, q and clip norm are the latest report's, steps are summed.
fn record_privacy<'m>(
    map: &'m mut PrivacyMap,
    participant: ParticipantId,
    client: &str,
    round: u64,
    r: &PrivacyReport,
) -> &'m mut ParticipantPrivacy {
    let entry = map
        .entry(participant)
        .or_insert_with(|| ParticipantPrivacy {
            participant: participant.0,
            client: client.to_owned(),
            epsilon_spent: 0.0,
            epsilon_accounted: Some(0.0),
            delta: r.delta,
            noise_multiplier: r.noise_multiplier,
            sample_rate: r.sample_rate,
            clip_norm: r.clip_norm,
            steps: 0,
            updates: 0,
            last_round: round,
            connected: true,
            segments: Some(Vec::new()),
            stale: false,
        });
    // ε spent is cumulative: a later, smaller report (a participant that
    // lost its ledger) never lowers what the status shows it has spent.
    entry.epsilon_spent = entry.epsilon_spent.max(r.epsilon_spent);
    entry.delta = r.delta;
    entry.noise_multiplier = r.noise_multiplier;
    entry.sample_rate = r.sample_rate;
    entry.clip_norm = r.clip_norm;
    entry.steps = entry.steps.saturating_add(r.steps);
    entry.updates += 1;
    entry.last_round = round;
    entry.segments = segments_with(Some(&*entry), r);
    // Whoever records a report sets the ε accounted with it.
    entry.stale = true;
    entry
}

/// Sets [`ParticipantPrivacy::epsilon_accounted`] from its steps for every
/// participant whose stored value is behind them (after a restart; live
/// updates are accounted as they come).
fn account_all(map: &mut PrivacyMap, dp_task: bool) -> usize {
    let mut accounted = 0;
    for p in map.values_mut().filter(|p| p.stale) {
        accounted += 1;
        p.stale = false;
        p.epsilon_accounted = p.segments.as_deref().and_then(|s| {
            if dp_task {
                account_epsilon(s, p.delta)
            } else {
                rdp_epsilon(s, p.delta)
            }
        });
    }
    accounted
}

/// The per-participant map as it stood after the last committed round,
/// rebuilt from the stored reports (oldest round first) by the same
/// [`record_privacy`] that built it live. Reports stored before δ and the
/// clip norm were (schema version 0) take the task's policy values, which a
/// DP task required them to equal.
fn restore_privacy(
    reports: Vec<StoredPrivacyReport>,
    policy: Option<&PrivacyPolicy>,
) -> PrivacyMap {
    let mut map = PrivacyMap::new();
    for s in reports {
        let report = PrivacyReport {
            noise_multiplier: s.noise_multiplier,
            sample_rate: s.sample_rate,
            steps: s.steps,
            clip_norm: s
                .clip_norm
                .or(policy.map(|p| p.clip_norm))
                .unwrap_or(f64::NAN),
            delta: s.delta.or(policy.map(|p| p.delta)).unwrap_or(f64::NAN),
            epsilon_spent: s.epsilon_spent,
        };
        let entry = record_privacy(&mut map, s.participant, &s.client, s.round, &report);
        // Stored with the update since schema version 6.
        entry.epsilon_accounted = s.epsilon_accounted;
        entry.stale = s.epsilon_accounted.is_none();
    }
    for p in map.values_mut() {
        p.connected = false;
    }
    map
}

/// The largest ε the aggregator accounts for any participant of the stored
/// `reports` (those of the rounds up to one: what the participants had
/// spent on that round's model), from the ε stored with each update, and
/// accounted again where it was not stored; `None` without reports, or
/// where one participant's steps have no bound (σ = 0 on a task without
/// DP). A DP task's exported rounds name it.
pub fn accounted_epsilon_max(
    reports: Vec<StoredPrivacyReport>,
    policy: Option<&PrivacyPolicy>,
) -> Option<f64> {
    let mut map = restore_privacy(reports, policy);
    account_all(&mut map, policy.is_some());
    map.values()
        .map(|p| p.epsilon_accounted)
        .try_fold(None::<f64>, |most, e| {
            e.map(|e| Some(most.map_or(e, |m| m.max(e))))
        })
        .flatten()
}

fn not_initializing() -> Rejection {
    Rejection::new(
        ErrorCode::NotInitializing,
        "the task is not collecting initialization gradients",
    )
}

/// The checks of a privacy report that need no round: the task's policy
/// ([`check_report_against_policy`]), the values' ranges, and at most the
/// `local_steps` a round has. [`CoordinatorHandle::update`] applies them
/// before accounting a report, the coordinator again before accepting it.
fn check_report(
    report: &PrivacyReport,
    policy: Option<&PrivacyPolicy>,
    local_steps: u64,
) -> Result<(), Rejection> {
    if let Some(policy) = policy {
        check_report_against_policy(Some(report), policy)?;
    }
    crate::round::check_privacy(report)?;
    if report.steps > local_steps {
        return Err(Rejection::new(
            ErrorCode::InvalidPrivacyReport,
            format!(
                "privacy report of {} DP-SGD steps, but a round of this task has {local_steps} local steps",
                report.steps
            ),
        ));
    }
    Ok(())
}

/// A task with differential privacy accepts only updates whose report says
/// they were trained under its policy: same clip norm and δ, noise, and ε
/// spent within the target. (`fedsb sim` applies the same check.)
pub fn check_report_against_policy(
    report: Option<&PrivacyReport>,
    policy: &PrivacyPolicy,
) -> Result<(), Rejection> {
    let reject = |why: String| Err(Rejection::new(ErrorCode::InvalidPrivacyReport, why));
    let Some(r) = report else {
        return reject(
            "this task uses differential privacy: every update must carry a privacy report".into(),
        );
    };
    if r.clip_norm != policy.clip_norm || r.delta != policy.delta {
        return reject(format!(
            "privacy report with clip norm {} and δ {}, but the task requires clip norm {} and δ {}",
            r.clip_norm, r.delta, policy.clip_norm, policy.delta
        ));
    }
    if r.noise_multiplier.is_nan() || r.noise_multiplier <= 0.0 {
        return reject(format!(
            "privacy report without noise (σ = {}): DP-SGD needs σ > 0",
            r.noise_multiplier
        ));
    }
    if r.steps == 0 {
        // No adapter is trained in zero DP-SGD steps: it would add a
        // trained update that no privacy account counts.
        return reject(
            "privacy report of 0 DP-SGD steps: an update is trained in at least one".into(),
        );
    }
    if r.epsilon_spent.is_nan() || r.epsilon_spent > policy.epsilon {
        return reject(format!(
            "privacy report spends ε = {} beyond the task's target ε = {}",
            r.epsilon_spent, policy.epsilon
        ));
    }
    Ok(())
}

/// `length` from now. A length beyond what `Instant` can hold (the
/// configuration refuses more than 30 days) gives a deadline a century
/// away instead of panicking.
fn deadline_after(length: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
    let now = Instant::now();
    now.checked_add(length)
        .or_else(|| now.checked_add(CENTURY))
        .unwrap_or(now)
}

fn unix_ms_at(t: Instant) -> u64 {
    let now = Instant::now();
    let now_ms = now_unix_ms();
    if t >= now {
        now_ms.saturating_add(u64::try_from((t - now).as_millis()).unwrap_or(u64::MAX))
    } else {
        now_ms.saturating_sub((now - t).as_millis() as u64)
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The initial global state (round 0) when none is stored.
pub fn initial_frame(adapter: AdapterState) -> Vec<u8> {
    ServerMessage::GlobalModel {
        round: RoundId(0),
        participants: 0,
        total_samples: 0,
        adapter,
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(
        round: u64,
        participant: u64,
        steps: u64,
        epsilon_spent: f64,
        clip_delta: Option<(f64, f64)>,
    ) -> StoredPrivacyReport {
        StoredPrivacyReport {
            round,
            participant: ParticipantId(participant),
            client: format!("c{participant}"),
            noise_multiplier: 1.0 + round as f64,
            sample_rate: 0.125,
            steps,
            clip_norm: clip_delta.map(|c| c.0),
            delta: clip_delta.map(|c| c.1),
            epsilon_spent,
            // As stored before schema version 6.
            epsilon_accounted: None,
        }
    }

    /// Round 1 restored from the store with `max_participants` updates
    /// (the aggregator stopped after accepting the last one, before the
    /// commit) commits at start, to the weighted mean of the restored
    /// updates, and its pending rows are gone.
    #[tokio::test]
    async fn a_round_restored_full_commits_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let (config, task) = tiny_task(dir.path());
        let config = Arc::new(config);
        let shape = task.shape;
        let state = |x: f32| {
            let r = shape.rank as usize;
            AdapterState {
                r: (0..shape.modules)
                    .map(|_| Tensor::new(vec![shape.rank, shape.rank], vec![x; r * r]).unwrap())
                    .collect(),
                head_weight: Tensor::new(
                    vec![shape.head_classes, shape.head_hidden],
                    vec![x; (shape.head_classes * shape.head_hidden) as usize],
                )
                .unwrap(),
                head_bias: Tensor::new(vec![shape.head_classes], vec![x; 2]).unwrap(),
            }
        };
        let store =
            Store::open(&dir.path().join("state"), "t", &config.identity_json(), 1).unwrap();
        let frame0 = initial_frame(state(0.0));
        let meta0 = RoundMeta::initial(&frame0, 1);
        store.commit_round(meta0, frame0, Vec::new()).await.unwrap();
        for (seq, (participant, samples, x)) in [(7, 3, 1.0), (9, 1, 2.0)].into_iter().enumerate() {
            let update = ClientUpdate {
                round: RoundId(1),
                num_samples: samples,
                train_loss: None,
                privacy: None,
                adapter: state(x),
            };
            let pending = PendingUpdate {
                participant: ParticipantId(participant),
                client: format!("p{participant}"),
                seq: seq as u64,
                frame_bytes: 100,
                received_unix_ms: 2,
                update,
            };
            store.put_pending(RoundId(1), pending).await.unwrap();
        }
        let last = store.last_round().await.unwrap().unwrap();
        let pending = store.pending_updates(RoundId(1)).await.unwrap();
        assert_eq!(pending.len(), 2);
        let (_handle, mut status) = Coordinator::start(
            config,
            task,
            store.clone(),
            Arc::new(Metrics::new()),
            Begin::Resume(Box::new(last)),
            Vec::new(),
            pending,
        );
        tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| s.last_committed_round == 1),
        )
        .await
        .expect("round 1 was not committed at start")
        .unwrap();
        let r1 = store.last_round().await.unwrap().unwrap();
        assert_eq!(
            (r1.meta.round, r1.meta.participants, r1.meta.total_samples),
            (1, 2, 4)
        );
        // (3·1 + 1·2) / 4 in every value.
        assert!(r1
            .adapter
            .named_tensors()
            .all(|(_, t)| t.data.iter().all(|&v| v == 1.25)));
        assert!(store.pending_updates(RoundId(1)).await.unwrap().is_empty());
    }

    /// A tiny task (quorum 2, rank 2, one layer) in `dir` with round 0
    /// committed: its configuration, task, store and last round.
    async fn task_at_round_0(
        dir: &std::path::Path,
    ) -> (Config, Arc<TaskInfo>, Store, CommittedRound) {
        let (config, task) = tiny_task(dir);
        let store = Store::open(&dir.join("state"), "t", &config.identity_json(), 1).unwrap();
        let frame0 = initial_frame(AdapterState::zeros(&task.shape));
        let meta0 = RoundMeta::initial(&frame0, 1);
        store.commit_round(meta0, frame0, Vec::new()).await.unwrap();
        let last = store.last_round().await.unwrap().unwrap();
        (config, task, store, last)
    }

    /// A coordinator resuming from `last` with nothing pending.
    fn resume(
        config: Config,
        task: Arc<TaskInfo>,
        store: Store,
        last: CommittedRound,
    ) -> (CoordinatorHandle, watch::Receiver<Status>) {
        Coordinator::start(
            Arc::new(config),
            task,
            store,
            Arc::new(Metrics::new()),
            Begin::Resume(Box::new(last)),
            Vec::new(),
            Vec::new(),
        )
    }

    /// A tiny task (quorum 2, rank 2, one layer) written to `dir`: its
    /// configuration and the task participants are told.
    fn tiny_task(dir: &std::path::Path) -> (Config, Arc<TaskInfo>) {
        let toml = "[task]\nid = \"t\"\nrounds = 3\nmin_participants = 2\nmax_participants = 2\n\
                    round_deadline_secs = 600\nlabels = [\"a\", \"b\"]\n\
                    [model]\nid = \"tiny\"\nhidden_size = 8\nnum_layers = 1\n[adapter]\nrank = 2\n";
        std::fs::write(dir.join("task.toml"), toml).unwrap();
        let config = crate::config::load_locked(&dir.join("task.toml")).unwrap();
        let shape = config.adapter_shape();
        let task = Arc::new(TaskInfo {
            task_id: "t".into(),
            model_id: "tiny".into(),
            model_sha256: String::new(),
            module_names: config.module_names(),
            shape,
            labels: config.task.labels.clone(),
            local_steps: 1,
            batch_size: 1,
            learning_rate: 0.01,
            head_learning_rate: 0.01,
            max_seq_len: 8,
            total_rounds: 3,
            files: Vec::new(),
            privacy: None,
        });
        (config, task)
    }

    /// A deadline beyond what `Instant` holds (`round_deadline_secs =
    /// 9223372036854775807` once panicked "overflow when adding duration to
    /// instant" in `open_next_round`) is a deadline far away. The
    /// configuration refuses such values; the coordinator must not panic
    /// on them anyway.
    #[tokio::test]
    async fn a_round_deadline_beyond_instant_does_not_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, task, store, last) = task_at_round_0(dir.path()).await;
        config.task.round_deadline_secs = u64::MAX;
        let (_handle, status) = resume(config, task, store, last);
        let s = status.borrow().clone();
        assert_eq!((s.state, s.round), ("collecting", Some(1)));
        let year_ms = 365 * 24 * 60 * 60 * 1000;
        assert!(
            s.deadline_unix_ms.unwrap() > now_unix_ms() + 50 * year_ms,
            "{s:?}"
        );
        let fifty_years = Duration::from_secs(50 * 365 * 24 * 60 * 60);
        assert!(deadline_after(Duration::MAX) > Instant::now() + fifty_years);
    }

    /// Log lines written while the returned guard is held on this thread
    /// (a current-thread runtime runs the coordinator's task here too).
    fn capture_logs() -> (
        Arc<std::sync::Mutex<Vec<u8>>>,
        tracing::subscriber::DefaultGuard,
    ) {
        #[derive(Clone)]
        struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Sink(logs.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    /// A participant whose connection has ended (its frame queue is
    /// closed; its `Leave` is still on its way, as when it leaves while a
    /// round commits) is dropped without the warning meant for one that
    /// does not read its frames (a full queue), which is still given and
    /// still kicks the connection.
    #[tokio::test]
    async fn a_departed_participant_is_dropped_without_a_warning() {
        const STALLED: &str = "participant is not reading its frames";
        let dir = tempfile::tempdir().unwrap();
        let (config, task, store, last) = task_at_round_0(dir.path()).await;
        let (logs, _guard) = capture_logs();
        let (handle, mut status) = resume(config, task, store, last);
        let text = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();

        let (frames, closed) = mpsc::channel(OUTBOX_FRAMES);
        drop(closed);
        let gone = Outbox {
            frames,
            kick: Arc::new(Notify::new()),
        };
        handle.join("gone".into(), None, gone).await.unwrap();
        status.changed().await.unwrap();
        assert_eq!(status.borrow().participants_connected, 0);
        let t = text();
        assert!(!t.contains(STALLED), "{t}");
        assert!(t.contains("participant left"), "{t}");

        let (frames, _full) = mpsc::channel(1);
        frames.try_send(Bytes::from_static(b"unread")).unwrap();
        let kick = Arc::new(Notify::new());
        let stalled = Outbox {
            frames,
            kick: kick.clone(),
        };
        handle.join("stalled".into(), None, stalled).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), kick.notified())
            .await
            .expect("the stalled participant's connection was not kicked");
        let t = text();
        assert_eq!(t.matches(STALLED).count(), 1, "{t}");
    }

    /// The aggregator's own ε: what a participant's ledger of the same
    /// steps says, grown by every accepted update; an update taking it
    /// beyond the task's ε is refused even when the participant reports
    /// less (a lost ledger).
    #[tokio::test]
    async fn the_aggregator_accounts_each_participants_epsilon_itself() {
        let policy = PrivacyPolicy {
            epsilon: 1.5,
            delta: 1e-5,
            clip_norm: 1.0,
        };
        let report = |steps, epsilon_spent| PrivacyReport {
            noise_multiplier: 1.5,
            sample_rate: 0.1,
            steps,
            clip_norm: 1.0,
            delta: 1e-5,
            epsilon_spent,
        };
        let ledger_after = |rounds: u64| {
            let s = TrainingSegment::new(0.1, 1.5, 4 * rounds).unwrap();
            epsilon_spent(AccountantKind::Pld, &[s], 1e-5).unwrap()
        };
        let id = ParticipantId(7);
        let mut map = PrivacyMap::new();
        let mut rounds = 0;
        loop {
            let r = report(4, ledger_after(rounds + 1));
            match account_update(map.get(&id), id, &r, Some(&policy)).await {
                Ok(accounted) => {
                    rounds += 1;
                    // The participant's ledger holds the same steps.
                    assert_eq!(accounted, Some(r.epsilon_spent), "round {rounds}");
                    let entry = record_privacy(&mut map, id, "c", rounds, &r);
                    entry.epsilon_accounted = accounted;
                }
                Err(e) => {
                    // Refused exactly where the participant's own check
                    // would have stopped it.
                    assert!(r.epsilon_spent > policy.epsilon, "{}", e.message);
                    assert_eq!(e.code, ErrorCode::InvalidPrivacyReport);
                    assert!(
                        e.message.contains("beyond the task's ε = 1.5"),
                        "{}",
                        e.message
                    );
                    assert!(!e.message.contains("reset"), "{}", e.message);
                    break;
                }
            }
            assert!(rounds < 100, "never refused");
        }
        assert!(rounds >= 2, "{rounds}");
        let spent = map[&id].epsilon_accounted.unwrap();
        assert!(
            spent <= policy.epsilon && spent > 0.5 * policy.epsilon,
            "{spent}"
        );

        // The same participant after losing its ledger: it reports a fresh
        // count, the aggregator refuses the update its own count forbids.
        let fresh = report(4, ledger_after(1));
        let e = account_update(map.get(&id), id, &fresh, Some(&policy))
            .await
            .unwrap_err();
        assert!(
            e.message.contains("may have been reset")
                && e.message.contains(&format!(
                    "{} DP-SGD steps in {} updates",
                    4 * (rounds + 1),
                    rounds + 1
                )),
            "{}",
            e.message
        );
        // Another participant with the same report is within its budget.
        let other = account_update(None, ParticipantId(8), &fresh, Some(&policy)).await;
        assert_eq!(other.unwrap(), Some(fresh.epsilon_spent));

        // Within the tolerance for a browser's rounding: accepted.
        let tight = PrivacyPolicy {
            epsilon: ledger_after(1) * (1.0 - 0.5 * ACCOUNTING_TOLERANCE),
            ..policy
        };
        account_update(None, id, &fresh, Some(&tight))
            .await
            .unwrap();
        let tighter = PrivacyPolicy {
            epsilon: ledger_after(1) * (1.0 - 2.0 * ACCOUNTING_TOLERANCE),
            ..policy
        };
        account_update(None, id, &fresh, Some(&tighter))
            .await
            .unwrap_err();

        // Without noise (a task without DP), nothing bounds it; the task
        // takes the update.
        let noiseless = PrivacyReport {
            noise_multiplier: 0.0,
            ..fresh.clone()
        };
        assert_eq!(
            account_update(None, id, &noiseless, None).await.unwrap(),
            None
        );
        // A σ so small that one step spends the whole budget: refused by
        // one step's exact δ, before any PLD (whose grid for σ = 0.15 at
        // q = 0.5 takes a second and 400 MB); a first update gets no hint
        // of a lost ledger.
        let tiny = PrivacyReport {
            noise_multiplier: 0.15,
            sample_rate: 0.5,
            steps: 20,
            epsilon_spent: 0.5,
            ..fresh.clone()
        };
        let e = account_update(None, ParticipantId(9), &tiny, Some(&policy))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidPrivacyReport);
        assert!(
            e.message
                .contains("one DP-SGD step at q = 0.5, σ = 0.15 alone spends more")
                && !e.message.contains("reset"),
            "{}",
            e.message
        );
        // Many steps, each within the budget alone: the PLD decides, and a
        // first update still gets no hint of a lost ledger.
        let many = PrivacyReport {
            steps: 400,
            epsilon_spent: 0.5,
            ..fresh.clone()
        };
        let e = account_update(None, ParticipantId(10), &many, Some(&policy))
            .await
            .unwrap_err();
        assert!(
            e.message.contains("400 DP-SGD steps in 1 updates") && !e.message.contains("reset"),
            "{}",
            e.message
        );
        // A task without DP shows the RDP bound (no PLD, any σ).
        let rdp = epsilon_spent(
            AccountantKind::Rdp,
            &[TrainingSegment::new(0.5, 0.15, 20).unwrap()],
            1e-5,
        )
        .unwrap();
        assert_eq!(
            account_update(None, id, &tiny, None).await.unwrap(),
            Some(rdp)
        );
        // Steps too many for the PLD's grid: the RDP bound.
        let long = TrainingSegment::new(0.1, 1.5, 10_000_000).unwrap();
        let rdp = epsilon_spent(AccountantKind::Rdp, &[long], 1e-5).unwrap();
        assert_eq!(account_epsilon(&[long], 1e-5), Some(rdp));
    }

    #[test]
    fn restored_privacy_is_what_the_live_reports_built() {
        let policy = PrivacyPolicy {
            epsilon: 8.0,
            delta: 1e-5,
            clip_norm: 0.5,
        };
        // Participant 1: a report from before schema version 1 (δ and C
        // unknown), then a newer one; participant 2: one report.
        let mut map = restore_privacy(
            vec![
                stored(1, 1, 4, 0.5, None),
                stored(1, 2, 3, 0.25, Some((0.5, 1e-5))),
                stored(2, 1, 6, 1.5, Some((0.5, 1e-5))),
            ],
            Some(&policy),
        );
        account_all(&mut map, true);
        // The aggregator's ε is what a participant's ledger holding the
        // same steps says.
        let ledger_epsilon = |steps: &[(f64, u64)]| {
            let mut ledger = fedsb_privacy::PrivacyLedger::new(
                fedsb_privacy::PrivacyBudget::new(8.0, 1e-5).unwrap(),
                AccountantKind::Pld,
            )
            .unwrap();
            for &(sigma, n) in steps {
                ledger
                    .record(TrainingSegment::new(0.125, sigma, n).unwrap())
                    .unwrap();
            }
            (ledger.segments().to_vec(), ledger.epsilon_spent().unwrap())
        };
        let (segments_1, epsilon_1) = ledger_epsilon(&[(2.0, 4), (3.0, 6)]);
        let (segments_2, epsilon_2) = ledger_epsilon(&[(2.0, 3)]);
        assert!(epsilon_1 > epsilon_2 && epsilon_2 > 0.0);
        let entry = |participant: u64, client: &str, sigma, steps, updates, last_round, eps| {
            let (segments, accounted) = if participant == 1 {
                (segments_1.clone(), epsilon_1)
            } else {
                (segments_2.clone(), epsilon_2)
            };
            ParticipantPrivacy {
                participant,
                client: client.into(),
                epsilon_spent: eps,
                epsilon_accounted: Some(accounted),
                segments: Some(segments),
                delta: 1e-5,
                noise_multiplier: sigma,
                sample_rate: 0.125,
                clip_norm: 0.5,
                steps,
                updates,
                last_round,
                connected: false,
                stale: false,
            }
        };
        assert_eq!(
            map.into_values().collect::<Vec<_>>(),
            vec![
                entry(1, "c1", 3.0, 10, 2, 2, 1.5),
                entry(2, "c2", 2.0, 3, 1, 1, 0.25),
            ]
        );
        // A smaller ε after a larger one: the largest stands.
        let map = restore_privacy(
            vec![
                stored(1, 1, 4, 2.0, Some((0.5, 1e-5))),
                stored(2, 1, 4, 0.5, Some((0.5, 1e-5))),
            ],
            Some(&policy),
        );
        let p = &map[&ParticipantId(1)];
        assert_eq!((p.epsilon_spent, p.steps, p.updates), (2.0, 8, 2));
        // An old report on a task without a policy: δ and C stay unknown.
        let map = restore_privacy(vec![stored(1, 3, 4, 0.5, None)], None);
        let p = &map[&ParticipantId(3)];
        assert!(p.delta.is_nan() && p.clip_norm.is_nan(), "{p:?}");
        assert_eq!((p.epsilon_spent, p.steps, p.updates), (0.5, 4, 1));
    }

    #[test]
    fn the_epsilon_stored_with_an_update_is_read_back_not_accounted_again() {
        let policy = PrivacyPolicy {
            epsilon: 8.0,
            delta: 1e-5,
            clip_norm: 0.5,
        };
        let with = |mut s: StoredPrivacyReport, accounted| {
            s.epsilon_accounted = accounted;
            s
        };
        // (round, participant): σ is 1 + round. Participant 1: a row from
        // before version 6, then one holding the aggregator's ε (a value no
        // accountant gives for these steps, so a recount would show);
        // participant 2: one row without it; participant 3: one row with it.
        let reports = vec![
            with(stored(1, 1, 4, 0.5, Some((0.5, 1e-5))), None),
            with(stored(1, 2, 4, 0.5, Some((0.5, 1e-5))), None),
            with(stored(1, 3, 4, 0.5, Some((0.5, 1e-5))), Some(0.2345)),
            with(stored(2, 1, 4, 0.75, Some((0.5, 1e-5))), Some(0.1234)),
        ];
        let recount = |steps: &[(u64, f64)]| {
            let mut segments = Vec::new();
            for &(n, sigma) in steps {
                fedsb_privacy::append_segment(
                    &mut segments,
                    TrainingSegment::new(0.125, sigma, n).unwrap(),
                )
                .unwrap();
            }
            account_epsilon(&segments, 1e-5).unwrap()
        };
        let mut map = restore_privacy(reports.clone(), Some(&policy));
        assert_eq!(account_all(&mut map, true), 1);
        assert_eq!(map[&ParticipantId(1)].epsilon_accounted, Some(0.1234));
        assert_eq!(
            map[&ParticipantId(2)].epsilon_accounted,
            Some(recount(&[(4, 2.0)]))
        );
        assert_eq!(map[&ParticipantId(3)].epsilon_accounted, Some(0.2345));
        // A pending update restored after the committed rounds: its
        // participant's ε is accounted again with it; the others stay.
        let pending = PrivacyReport {
            noise_multiplier: 4.0,
            sample_rate: 0.125,
            steps: 4,
            clip_norm: 0.5,
            delta: 1e-5,
            epsilon_spent: 0.9,
        };
        let mut map = restore_privacy(reports.clone(), Some(&policy));
        record_privacy(&mut map, ParticipantId(3), "c3", 4, &pending);
        assert_eq!(account_all(&mut map, true), 2);
        assert_eq!(map[&ParticipantId(1)].epsilon_accounted, Some(0.1234));
        assert_eq!(
            map[&ParticipantId(3)].epsilon_accounted,
            Some(recount(&[(4, 2.0), (4, 4.0)]))
        );
        assert_eq!(account_all(&mut map, true), 0, "accounted once");

        // An export's ε: the largest over the participants, as stored or
        // accounted again.
        let most = recount(&[(4, 2.0)]).max(0.2345);
        assert_eq!(
            accounted_epsilon_max(reports.clone(), Some(&policy)),
            Some(most)
        );
        assert_eq!(accounted_epsilon_max(Vec::new(), Some(&policy)), None);
        // σ = 0 on a task without DP: no bound, none named.
        let mut unbounded = stored(1, 4, 4, 0.0, Some((0.5, 1e-5)));
        unbounded.noise_multiplier = 0.0;
        assert_eq!(accounted_epsilon_max(vec![unbounded], None), None);
    }
}
