//! Task configuration: a TOML file, overridden by `FEDSB_<SECTION>__<KEY>`
//! environment variables and then by command-line flags.
//!
//! `configs/sst2-demo.toml` is the commented reference of every key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fedsb_engine::model::AdaptedLinear;
use fedsb_protocol::{
    AdapterShape, PolicyField, PrivacyPolicy, MAX_LIST_LEN, MAX_MODULES, MAX_RANK, MAX_STRING_BYTES,
};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::round::ServerStep;

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// figment's error is shown in the message (keys as written in the
    /// file, see [`describe_figment_error`]), not chained as a source, so
    /// that an error chain prints it once.
    #[error("cannot read configuration {path}: {}", describe_figment_error(.error))]
    Load {
        path: PathBuf,
        error: Box<figment::Error>,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("cannot read model config {path}: {message}")]
    ModelConfig { path: PathBuf, message: String },
    #[error("adapter.file {path}: {message}")]
    AdapterFile { path: PathBuf, message: String },
}

/// figment's error (every error of its chain, `; `-separated) with the key
/// as written in the TOML file (`task.rounds`, not figment's
/// `default.task.rounds`) or the environment variable that set it. A TOML
/// syntax error keeps its line and column.
pub fn describe_figment_error(error: &figment::Error) -> String {
    use std::fmt::Write as _;
    let mut parts = Vec::new();
    for e in error.clone() {
        let mut s = match &e.kind {
            // (figment's own wording quotes the list as a whole, inside
            // backticks of its own: "expected `one of `a`, `b``".)
            figment::error::Kind::UnknownField(found, expected) => format!(
                "unknown field: found `{found}`, expected one of {}",
                expected
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            kind => kind.to_string(),
        };
        let from_env = e
            .metadata
            .as_ref()
            .is_some_and(|md| md.name.contains("environment variable"));
        if !e.path.is_empty() {
            let _ = write!(s, " for key {}", e.path.join("."));
            if from_env {
                let var: Vec<String> = e.path.iter().map(|k| k.to_ascii_uppercase()).collect();
                // Every override has a section and a key: a path of one is an
                // unknown section, whose variable went on past it.
                let more = if e.path.len() == 1 { "__…" } else { "" };
                let _ = write!(s, " (environment variable FEDSB_{}{more})", var.join("__"));
            }
        } else if from_env {
            s.push_str(" in a FEDSB_<SECTION>__<KEY> environment variable");
        }
        parts.push(s);
    }
    parts.join("; ")
}

/// How the updates of one round are weighted in the average.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// Weight each update by the number of samples it was trained on.
    Samples,
    /// Every update counts the same.
    Uniform,
}

/// What happens when a round's deadline passes with fewer than
/// `min_participants` updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuorumPolicy {
    /// Keep the updates already accepted and extend the deadline by another
    /// `round_deadline_secs` (announced with a new `RoundOpen`).
    Extend,
    /// Commit with the updates that arrived if there is at least one;
    /// otherwise extend.
    AggregateAvailable,
}

/// The whole configuration file.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub task: TaskSection,
    pub model: ModelSection,
    pub adapter: AdapterSection,
    #[serde(default)]
    pub privacy: PrivacySection,
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub demo: DemoSection,
}

/// `[demo]`: public labelled data the aggregator hands out in shards to
/// volunteers who have no data of their own (the page's "Use a demo shard").
/// Not part of the task identity.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemoSection {
    /// CSV, TSV or JSONL file with a header line (JSONL: one object per
    /// line); no demo shards without it.
    #[serde(default)]
    pub data: Option<PathBuf>,
    /// Rows per shard (default 200).
    #[serde(default)]
    pub shard_rows: Option<usize>,
}

/// `[task]`: the federated training schedule.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSection {
    /// Name of the task; also the key of the state directory's database.
    pub id: String,
    /// Number of training rounds.
    pub rounds: u64,
    /// Quorum: updates needed before a round may be committed.
    #[serde(default = "one")]
    pub min_participants: u32,
    /// Most updates accepted in one round; the round commits when reached.
    #[serde(default = "default_max_participants")]
    pub max_participants: u32,
    /// Seconds a round collects updates before its deadline.
    #[serde(default = "default_deadline")]
    pub round_deadline_secs: u64,
    /// What happens when the deadline passes without a quorum.
    #[serde(default = "default_quorum_policy")]
    pub on_quorum_missed: QuorumPolicy,
    /// Local optimizer steps each participant takes per round.
    #[serde(default = "default_local_steps")]
    pub local_steps: u32,
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// The participants' AdamW learning rate in round 1.
    #[serde(default = "default_lr")]
    pub learning_rate: f32,
    /// Per-round decay of the learning rate: round n trains at
    /// `learning_rate · lr_decay^(n−1)` (announced in every `RoundOpen`).
    /// 1 (the default) keeps it constant, and leaves the task's identity
    /// what it was before this key existed.
    #[serde(default = "default_lr_decay", skip_serializing_if = "is_constant")]
    pub lr_decay: f64,
    /// Linear warm-up: rounds 1..=W train at n/(W+1) of the scheduled rate
    /// (round W+1 reaches it), so the first rounds' fresh AdamW steps move
    /// less. 0 (the default) has none and leaves the task's identity what
    /// it was before this key existed.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    pub lr_warmup_rounds: u32,
    /// The classification head's learning rate in round 1 (default: the
    /// `learning_rate`); it follows `lr_decay` too, keeping the ratio of the
    /// two rates. Announced in `TaskInfo`. Unset, it leaves the task's
    /// identity what it was before this key existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_learning_rate: Option<f32>,
    /// The server's learning rate η, in (0, 2]: each round's global model
    /// moves η of the way from the previous one to the mean of the updates
    /// (plus the momentum below; FedAvgM). 1 (the default) takes the mean
    /// and leaves the task's identity what it was before this key existed.
    #[serde(default = "default_server_lr", skip_serializing_if = "is_constant")]
    pub server_learning_rate: f64,
    /// The server's momentum β, in [0, 1): each round's global model also
    /// moves β times the previous round's move. 0 (the default) keeps none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub server_momentum: f64,
    #[serde(default = "default_seq")]
    pub max_seq_len: u32,
    /// Aggregation weights.
    #[serde(default = "default_weighting")]
    pub weighting: Weighting,
    /// Class names in head order; their count is the head's output size.
    pub labels: Vec<String>,
}

/// `[model]`: the frozen base model.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Model name shown to participants.
    pub id: String,
    /// Hugging Face directory with config.json, model.safetensors and
    /// tokenizer.json, served to participants. Optional for tests.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Expected SHA-256 of model.safetensors; checked at start when set.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Hidden size; read from `dir/config.json` when `dir` is set.
    #[serde(default)]
    pub hidden_size: Option<u32>,
    /// Number of encoder layers; read from `dir/config.json` when `dir` is set.
    #[serde(default)]
    pub num_layers: Option<u32>,
    /// Width of the feed-forward layer (`intermediate.dense`'s output,
    /// `output.dense`'s input), from `dir/config.json`; not a key of the
    /// file (unknown without `dir`).
    #[serde(skip)]
    pub intermediate_size: Option<u32>,
    /// Longest input the model's position embeddings cover, from
    /// `dir/config.json`; not a key of the file (unknown without `dir`).
    #[serde(skip)]
    pub max_position_embeddings: Option<u32>,
}

/// `[adapter]`: LoRA-SB adapters.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSection {
    /// Rank r of every adapter (R is r×r).
    pub rank: u32,
    /// Adapted linear layers inside each encoder layer.
    #[serde(default = "default_modules")]
    pub modules: Vec<String>,
    /// Optional safetensors file with the frozen A and B (and initial R and
    /// head) produced by LoRA-SB initialization; served to participants.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Where A, B and R₀ come from: `"file"` (the default: `file` above,
    /// written by `fedsb init`, or R = 0 without one) or `"federated"` (the
    /// participants send their summed gradients before round 1 and the
    /// aggregator computes the adapter file; see README "Federated
    /// initialization").
    #[serde(default)]
    pub init: AdapterInit,
    /// Federated initialization: examples per participant (its first N).
    #[serde(default = "default_init_samples")]
    pub init_samples: u64,
    /// Federated initialization: η of `ΔW = −η·sign(G)` (default: the task's
    /// learning rate).
    #[serde(default)]
    pub init_learning_rate: Option<f64>,
    /// Federated initialization: seed of the initial classification head
    /// (the same head as `fedsb init --seed`).
    #[serde(default)]
    pub init_seed: u64,
    /// Federated initialization: centre the initial head before round 1.
    /// After the adapter file is served, every participant sends the
    /// per-class sums of its initialization examples' logits under the
    /// initial model, and the aggregator shifts the head's bias so that
    /// every class has the same mean logit (README "Centring the initial
    /// head"). For an adapter file, `fedsb init --centre-head` does it.
    #[serde(default)]
    pub centre_head: bool,
}

/// `[adapter] init`: how the LoRA-SB adapters are initialized.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterInit {
    /// From `[adapter] file` (or R = 0 without one).
    #[default]
    File,
    /// From the participants' gradients, before round 1.
    Federated,
}

fn default_init_samples() -> u64 {
    256
}

/// `[privacy]`: sample-level DP-SGD at each participant. An absent section
/// is the documented defaults: off, ε 3, δ 1e-5, C 0.1.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySection {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    #[serde(default = "default_delta")]
    pub delta: f64,
    #[serde(default = "default_clip")]
    pub clip_norm: f64,
}

/// `[eval]`: evaluation of every committed global model on a labelled file
/// with the native engine, on the aggregator's GPU adapter. Not part of the
/// task identity: it can be turned on, off or changed between restarts, and
/// rounds without an evaluation are evaluated after a restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSection {
    /// Labelled CSV, TSV or JSONL file; no evaluation without it.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Evaluate on the first N rows only (0: all).
    #[serde(default)]
    pub limit: usize,
    /// Evaluation batch size.
    #[serde(default = "default_eval_batch")]
    pub batch_size: usize,
    /// Text, second text and label columns (detected when not given).
    #[serde(default)]
    pub text_column: Option<String>,
    #[serde(default)]
    pub text_pair_column: Option<String>,
    #[serde(default)]
    pub label_column: Option<String>,
    /// Use the GPU adapter whose name contains this (case-insensitive).
    #[serde(default)]
    pub gpu_adapter: Option<String>,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            file: None,
            limit: 0,
            batch_size: default_eval_batch(),
            text_column: None,
            text_pair_column: None,
            label_column: None,
            gpu_adapter: None,
        }
    }
}

fn default_eval_batch() -> usize {
    32
}

/// `[server]`: where and how the aggregator runs. Not part of the task
/// identity: changing it between restarts is fine.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    #[serde(default = "default_bind")]
    pub bind: IpAddr,
    /// TCP port; 0 picks a free one (printed at start).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Directory of the SQLite database.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Directory of the web page.
    #[serde(default = "default_www")]
    pub www_dir: PathBuf,
    /// Seconds between WebSocket pings to each participant.
    #[serde(default = "default_ping")]
    pub ping_interval_secs: u64,
    /// A participant that sends nothing (not even a pong) for this long is
    /// disconnected.
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
    /// An HTTP connection that has not sent a whole request head (request
    /// line and headers) this long after it opened, or after its last
    /// response, is closed: a client that trickles its headers cannot hold
    /// a connection open.
    #[serde(default = "default_header_read")]
    pub header_read_timeout_secs: u64,
    /// A connection whose writes make no progress this long (the client
    /// stopped reading a file, the event stream or its WebSocket) is
    /// closed: a client that asks for the model and never reads it cannot
    /// hold a connection open.
    #[serde(default = "default_write_stall")]
    pub write_timeout_secs: u64,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            bind: default_bind(),
            port: default_port(),
            state_dir: default_state_dir(),
            www_dir: default_www(),
            ping_interval_secs: default_ping(),
            idle_timeout_secs: default_idle(),
            header_read_timeout_secs: default_header_read(),
            write_timeout_secs: default_write_stall(),
        }
    }
}

fn one() -> u32 {
    1
}
fn default_max_participants() -> u32 {
    100
}
fn default_deadline() -> u64 {
    300
}
fn default_quorum_policy() -> QuorumPolicy {
    QuorumPolicy::Extend
}
fn default_lr_decay() -> f64 {
    1.0
}

impl TaskSection {
    /// The head's learning rate in round 1: `head_learning_rate`, else
    /// `learning_rate`.
    pub fn head_learning_rate(&self) -> f32 {
        self.head_learning_rate.unwrap_or(self.learning_rate)
    }

    /// The participants' learning rate in round `round` (see
    /// [`round_learning_rate`]).
    pub fn round_learning_rate(&self, round: u64) -> f32 {
        round_learning_rate(
            self.learning_rate,
            self.lr_decay,
            self.lr_warmup_rounds,
            round,
        )
    }

    /// The server's step from `server_learning_rate` and `server_momentum`.
    pub fn server_step(&self) -> ServerStep {
        ServerStep {
            learning_rate: self.server_learning_rate,
            momentum: self.server_momentum,
        }
    }
}

fn default_server_lr() -> f64 {
    1.0
}

fn is_constant(decay: &f64) -> bool {
    *decay == 1.0
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_zero_u32(x: &u32) -> bool {
    *x == 0
}

/// The learning rate of round `round` (1-based) under a per-round decay
/// and a linear warm-up of `warmup` rounds:
/// `base · decay^(round − 1) · min(1, round / (warmup + 1))`, computed in
/// f64. The aggregator announces it in `RoundOpen` and `fedsb sim` uses
/// it, so both schedules are one. Round 0 (the initial model, never
/// trained) maps to round 1.
pub fn round_learning_rate(base: f32, decay: f64, warmup: u32, round: u64) -> f32 {
    let round = round.max(1);
    let exponent = i32::try_from(round - 1).unwrap_or(i32::MAX);
    let warm = (round as f64 / (f64::from(warmup) + 1.0)).min(1.0);
    (f64::from(base) * decay.powi(exponent) * warm) as f32
}

fn default_local_steps() -> u32 {
    20
}
fn default_batch() -> u32 {
    32
}
fn default_lr() -> f32 {
    1e-3
}
fn default_seq() -> u32 {
    128
}
fn default_weighting() -> Weighting {
    Weighting::Samples
}
fn default_modules() -> Vec<String> {
    [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ]
    .map(String::from)
    .to_vec()
}

impl Default for PrivacySection {
    fn default() -> Self {
        Self {
            enabled: false,
            epsilon: default_epsilon(),
            delta: default_delta(),
            clip_norm: default_clip(),
        }
    }
}

impl PrivacySection {
    /// The section in the task's identity: with DP off its ε, δ and C do
    /// nothing, so they are left out (as zeros: what an absent section was
    /// stored as before this rule, so those states still resume), and an
    /// absent section, `enabled = false` alone and `enabled = false` with
    /// any values are one task.
    fn identity(&self) -> serde_json::Value {
        if self.enabled {
            serde_json::json!(self)
        } else {
            PRIVACY_OFF_IDENTITY.clone()
        }
    }
}

/// [`PrivacySection::identity`] of every task with DP off.
static PRIVACY_OFF_IDENTITY: std::sync::LazyLock<serde_json::Value> = std::sync::LazyLock::new(
    || serde_json::json!({"enabled": false, "epsilon": 0.0, "delta": 0.0, "clip_norm": 0.0}),
);

/// A stored identity (`Config::identity_json` of the task's first start) as
/// this version writes it: an identity stored with DP off and the section's
/// values in it (before DP-off values were left out) has them replaced as
/// [`PrivacySection::identity`] replaces them. Anything that does not parse
/// is returned as it is.
pub fn canonical_identity(stored: &str) -> String {
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(stored) else {
        return stored.to_owned();
    };
    if let Some(privacy) = v.get_mut("privacy") {
        if privacy.get("enabled") == Some(&serde_json::Value::Bool(false)) {
            *privacy = PRIVACY_OFF_IDENTITY.clone();
        }
    }
    v.to_string()
}

fn default_epsilon() -> f64 {
    3.0
}
fn default_delta() -> f64 {
    1e-5
}
fn default_clip() -> f64 {
    0.1
}
fn default_bind() -> IpAddr {
    IpAddr::from([127, 0, 0, 1])
}
fn default_port() -> u16 {
    8080
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_www() -> PathBuf {
    PathBuf::from("www")
}
fn default_ping() -> u64 {
    10
}
fn default_idle() -> u64 {
    45
}
fn default_header_read() -> u64 {
    30
}
fn default_write_stall() -> u64 {
    60
}

/// Refuses `secs` of timing `key` outside 1..=[`MAX_TIMING_SECS`].
fn check_secs(key: &str, secs: u64) -> Result<(), ConfigError> {
    if (1..=MAX_TIMING_SECS).contains(&secs) {
        return Ok(());
    }
    Err(ConfigError::Invalid(format!(
        "{key} {secs} must be in 1..={MAX_TIMING_SECS} (at most 30 days)"
    )))
}

/// The parts of a Hugging Face config.json the aggregator needs.
#[derive(Deserialize)]
struct HfConfig {
    hidden_size: u32,
    num_hidden_layers: u32,
    #[serde(default)]
    intermediate_size: Option<u32>,
    #[serde(default)]
    max_position_embeddings: Option<u32>,
}

/// The longest `round_deadline_secs`, `ping_interval_secs` and
/// `idle_timeout_secs`: 30 days.
pub const MAX_TIMING_SECS: u64 = 30 * 24 * 60 * 60;

/// The names `[adapter] modules` may list: the adapted linear layers of an
/// encoder layer, as in the checkpoint (and PEFT's `target_modules`).
pub fn known_modules() -> [&'static str; 6] {
    AdaptedLinear::ALL.map(AdaptedLinear::checkpoint_name)
}

/// `labels` of an adapter file's `__metadata__` (a JSON list); `None` when
/// it has none.
fn adapter_file_labels(path: &Path) -> Result<Option<Vec<String>>, String> {
    let bytes = std::fs::read(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => "there is no such file (make it with `fedsb init`, \
            or use adapter.init = \"federated\" without adapter.file)"
            .to_owned(),
        _ => e.to_string(),
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| format!("not a safetensors file: {e}"))?;
    header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("labels"))
        .map(|json| {
            serde_json::from_str(json)
                .map_err(|e| format!("labels metadata {json:?} is not a JSON list of strings: {e}"))
        })
        .transpose()
}

impl Config {
    /// Reads `path`, applies `FEDSB_<SECTION>__<KEY>` environment overrides
    /// (e.g. `FEDSB_SERVER__PORT=9000`), resolves relative paths against the
    /// file's directory and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = Figment::new()
            .merge(Toml::file_exact(path))
            // Only `FEDSB_<SECTION>__<KEY>` variables: other FEDSB_* variables
            // (FEDSB_MODEL_DIR, FEDSB_BIN of the tests…) are not config keys.
            .merge(
                Env::prefixed("FEDSB_")
                    .filter(|key| key.as_str().contains("__"))
                    .split("__"),
            )
            .extract()
            .map_err(|e| ConfigError::Load {
                path: path.to_owned(),
                error: Box::new(e),
            })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(dir) = config.model.dir.as_mut() {
            resolve(dir);
        }
        if let Some(file) = config.adapter.file.as_mut() {
            resolve(file);
        }
        if let Some(file) = config.eval.file.as_mut() {
            resolve(file);
        }
        if let Some(file) = config.demo.data.as_mut() {
            resolve(file);
        }
        resolve(&mut config.server.state_dir);
        resolve(&mut config.server.www_dir);
        config.fill_from_model_dir()?;
        config.validate()?;
        config.check_adapter_file_labels()?;
        for warning in config.warnings() {
            tracing::warn!("{warning}");
        }
        Ok(config)
    }

    /// Refuses `task.labels` other than the `labels` metadata of
    /// `[adapter] file` (when it has some): the head's rows are the
    /// classes, in order.
    fn check_adapter_file_labels(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.adapter.file else {
            return Ok(());
        };
        let labels = adapter_file_labels(path).map_err(|message| ConfigError::AdapterFile {
            path: path.clone(),
            message,
        })?;
        match labels {
            Some(labels) if labels != self.task.labels => Err(ConfigError::Invalid(format!(
                "task.labels {:?} differ from the labels {labels:?} of adapter.file {}: \
                the head's rows are these classes in this order; list them as the file does \
                (or make the file with `fedsb init --labels {}`)",
                self.task.labels,
                path.display(),
                self.task.labels.join(",")
            ))),
            _ => Ok(()),
        }
    }

    /// What the configuration allows but probably does not mean; logged as
    /// warnings by [`Config::load`].
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        // A task with a model but without A and B: R = 0 and no real
        // participant can train (`fedsb join` refuses it). Model-less tasks
        // (tests with synthetic participants) are not warned about.
        if self.model.dir.is_some()
            && self.adapter.init == AdapterInit::File
            && self.adapter.file.is_none()
        {
            out.push(
                "adapter.file is not set and adapter.init is \"file\": there are no A and B, \
                so participants cannot train this task; run `fedsb init` and set adapter.file, \
                or use adapter.init = \"federated\""
                    .to_owned(),
            );
        }
        out
    }

    fn fill_from_model_dir(&mut self) -> Result<(), ConfigError> {
        let Some(dir) = &self.model.dir else {
            return Ok(());
        };
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::ModelConfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| ConfigError::ModelConfig {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for (name, given, found) in [
            ("hidden_size", &mut self.model.hidden_size, hf.hidden_size),
            (
                "num_layers",
                &mut self.model.num_layers,
                hf.num_hidden_layers,
            ),
        ] {
            match given {
                Some(g) if *g != found => {
                    return Err(ConfigError::Invalid(format!(
                        "model.{name} = {g} but {} says {found}",
                        path.display()
                    )))
                }
                _ => *given = Some(found),
            }
        }
        self.model.intermediate_size = hf.intermediate_size;
        self.model.max_position_embeddings = hf.max_position_embeddings;
        Ok(())
    }

    /// Checks every value against its allowed range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let t = &self.task;
        if t.id.is_empty()
            || !t
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return bad(format!(
                "task.id {:?} must be non-empty and use only letters, digits, '-', '_' and '.'",
                t.id
            ));
        }
        if t.id.starts_with('.') {
            // It names the state files: ".." would make "...sqlite3", hidden.
            return bad(format!(
                "task.id {:?} must not start with '.' (it names the task's state files)",
                t.id
            ));
        }
        if t.rounds == 0 {
            return bad("task.rounds must be at least 1".into());
        }
        if t.min_participants == 0 {
            return bad("task.min_participants must be at least 1".into());
        }
        if t.max_participants < t.min_participants {
            return bad(format!(
                "task.max_participants ({}) is below task.min_participants ({})",
                t.max_participants, t.min_participants
            ));
        }
        check_secs("task.round_deadline_secs", t.round_deadline_secs)?;
        if t.labels.len() < 2 {
            return bad("task.labels must name at least two classes".into());
        }
        if t.labels.len() > MAX_LIST_LEN {
            return bad(format!(
                "task.labels names {} classes; the protocol carries at most {MAX_LIST_LEN}",
                t.labels.len()
            ));
        }
        // Sent to every participant in the task description: the protocol
        // carries strings of at most MAX_STRING_BYTES, so a longer one would
        // reach participants cut short.
        for (key, value) in std::iter::once(("model.id", &self.model.id))
            .chain(t.labels.iter().map(|l| ("task.labels", l)))
        {
            if value.len() > MAX_STRING_BYTES {
                let start: String = value.chars().take(40).collect();
                return bad(format!(
                    "{key}: {start:?}... is {} bytes long; the protocol carries at most {MAX_STRING_BYTES} bytes per name",
                    value.len()
                ));
            }
        }
        for (i, label) in t.labels.iter().enumerate() {
            if label.trim().is_empty() {
                return bad(format!(
                    "task.labels {:?}: class {i} has a blank name {label:?}; every class needs a name",
                    t.labels
                ));
            }
            if t.labels[..i].contains(label) {
                return bad(format!(
                    "task.labels {:?} names {label:?} twice; every class needs a name of its own",
                    t.labels
                ));
            }
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad(format!(
                "task.learning_rate {} must be positive",
                t.learning_rate
            ));
        }
        if let Some(h) = t.head_learning_rate {
            if !(h.is_finite() && h > 0.0) {
                return bad(format!("task.head_learning_rate {h} must be positive"));
            }
        }
        if !(t.lr_decay > 0.0 && t.lr_decay <= 1.0) {
            return bad(format!(
                "task.lr_decay {} must be in (0, 1] (1 keeps the learning rate constant)",
                t.lr_decay
            ));
        }
        if u64::from(t.lr_warmup_rounds) >= t.rounds {
            return bad(format!(
                "task.lr_warmup_rounds {} must be below task.rounds {} (round {} would be the first at the full rate)",
                t.lr_warmup_rounds,
                t.rounds,
                u64::from(t.lr_warmup_rounds) + 1
            ));
        }
        if let Err(e) = (ServerStep {
            learning_rate: t.server_learning_rate,
            momentum: 0.0,
        })
        .check()
        {
            return bad(format!("task.server_learning_rate: {e}"));
        }
        if let Err(e) = t.server_step().check() {
            return bad(format!("task.server_momentum: {e}"));
        }
        if t.batch_size == 0 || t.local_steps == 0 {
            return bad("task.batch_size and task.local_steps must be at least 1".into());
        }
        if t.max_seq_len < 3 {
            return bad(format!(
                "task.max_seq_len {} must be at least 3 ([CLS] and [SEP] take 2, and the text needs room)",
                t.max_seq_len
            ));
        }
        if let Some(max) = self.model.max_position_embeddings {
            if t.max_seq_len > max {
                return bad(format!(
                    "task.max_seq_len {} exceeds the model's max_position_embeddings {max} \
                    (model.dir's config.json): it has no position embedding beyond token {max}",
                    t.max_seq_len
                ));
            }
        }
        let a = &self.adapter;
        if a.rank == 0 || a.rank > MAX_RANK {
            return bad(format!("adapter.rank {} must be in 1..={MAX_RANK}", a.rank));
        }
        if a.modules.is_empty() {
            return bad("adapter.modules must name at least one module".into());
        }
        let mut linears: Vec<AdaptedLinear> = Vec::with_capacity(a.modules.len());
        for m in &a.modules {
            let Some(which) = AdaptedLinear::ALL
                .into_iter()
                .find(|w| w.checkpoint_name() == m)
            else {
                return bad(format!(
                    "adapter.modules: unknown module {m:?} (known: {})",
                    known_modules().join(", ")
                ));
            };
            if linears.contains(&which) {
                return bad(format!("adapter.modules lists {m:?} twice"));
            }
            linears.push(which);
        }
        let Some(hidden) = self.model.hidden_size else {
            return bad("model.hidden_size is required when model.dir is not set".into());
        };
        let Some(layers) = self.model.num_layers else {
            return bad("model.num_layers is required when model.dir is not set".into());
        };
        if hidden == 0 || layers == 0 {
            return bad("model.hidden_size and model.num_layers must be at least 1".into());
        }
        // R is r×r between A (r×in) and B (out×r): r ≤ min(out, in) of every
        // adapted linear. Without config.json only the hidden size is known,
        // which bounds every module's smaller side.
        for (m, which) in a.modules.iter().zip(&linears) {
            let (out, input) = match (which, self.model.intermediate_size) {
                (AdaptedLinear::Intermediate, Some(i)) => (i, hidden),
                (AdaptedLinear::Output, Some(i)) => (hidden, i),
                (AdaptedLinear::Intermediate | AdaptedLinear::Output, None) => {
                    if a.rank > hidden {
                        return bad(format!(
                            "adapter.rank {} exceeds model.hidden_size {hidden}, a side of {m}: \
                            the rank must be at most the smaller side (out, in) of every adapted module",
                            a.rank
                        ));
                    }
                    continue;
                }
                _ => (hidden, hidden),
            };
            if a.rank > out.min(input) {
                let source = if self.model.dir.is_some() {
                    "model.dir's config.json"
                } else {
                    "model.hidden_size"
                };
                return bad(format!(
                    "adapter.rank {} exceeds {}, the smaller side of {m} ({out} out × {input} in, \
                    from {source}): the rank must be at most min(out, in) of every adapted module",
                    a.rank,
                    out.min(input)
                ));
            }
        }
        if u64::from(layers) * a.modules.len() as u64 > u64::from(MAX_MODULES) {
            return bad(format!(
                "{} adapted modules exceed the protocol limit of {MAX_MODULES}",
                u64::from(layers) * a.modules.len() as u64
            ));
        }
        // Every round's model travels in one frame: updates, global models.
        if let Some(e) = self.adapter_shape().frame_limit_error() {
            return bad(format!(
                "{e}; lower adapter.rank or adapt fewer adapter.modules"
            ));
        }
        if let Some(h) = &self.model.sha256 {
            if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                return bad(format!("model.sha256 {h:?} is not 64 hex digits"));
            }
        }
        if self.demo.shard_rows == Some(0) {
            return bad("demo.shard_rows must be at least 1".into());
        }
        if self.eval.file.is_some() {
            if self.model.dir.is_none() {
                return bad(
                    "eval.file needs model.dir: the aggregator evaluates with the model's weights"
                        .into(),
                );
            }
            if self.eval.batch_size == 0 {
                return bad("eval.batch_size must be at least 1".into());
            }
        }
        if a.init == AdapterInit::Federated {
            if self.privacy.enabled {
                return bad("adapter.init = \"federated\" cannot be combined with privacy.enabled = true: \
                    the initialization gradients are not covered by DP-SGD; initialize from public seed data with \
                    `fedsb init` and adapter.file instead".into());
            }
            if a.file.is_some() {
                return bad("adapter.init = \"federated\" computes the adapter file: remove adapter.file (or use init = \"file\")".into());
            }
            if self.model.dir.is_none() {
                return bad("adapter.init = \"federated\" needs model.dir (the layer shapes come from its config.json)".into());
            }
            if a.init_samples == 0 {
                return bad("adapter.init_samples must be at least 1".into());
            }
            if let Some(lr) = a.init_learning_rate {
                if !(lr.is_finite() && lr > 0.0) {
                    return bad(format!("adapter.init_learning_rate {lr} must be positive"));
                }
            }
        } else if a.centre_head {
            return bad(
                "adapter.centre_head centres the head of a federated initialization \
                (init = \"federated\"); an adapter file's head is centred when the file is made: \
                `fedsb init --centre-head`"
                    .into(),
            );
        }
        let server = &self.server;
        check_secs("server.ping_interval_secs", server.ping_interval_secs)?;
        check_secs("server.idle_timeout_secs", server.idle_timeout_secs)?;
        check_secs(
            "server.header_read_timeout_secs",
            server.header_read_timeout_secs,
        )?;
        check_secs("server.write_timeout_secs", server.write_timeout_secs)?;
        if server.idle_timeout_secs <= server.ping_interval_secs {
            return bad(format!(
                "server.idle_timeout_secs {} must exceed server.ping_interval_secs {}: \
                a participant answers the pings, and is dropped after idle_timeout_secs without any frame",
                server.idle_timeout_secs, server.ping_interval_secs
            ));
        }
        if let Some(policy) = self.privacy_policy() {
            if let Err((field, value)) = policy.check() {
                let key = match field {
                    PolicyField::Epsilon => "epsilon",
                    PolicyField::Delta => "delta",
                    PolicyField::ClipNorm => "clip_norm",
                };
                return bad(format!(
                    "privacy.{key} must be {}, got {value}",
                    field.expected()
                ));
            }
        }
        Ok(())
    }

    /// Names of the adapted modules, in the order of `AdapterState::r`:
    /// `encoder.layer.<i>.<module>` for each layer, then each module.
    pub fn module_names(&self) -> Vec<String> {
        let layers = self.model.num_layers.unwrap_or(0);
        (0..layers)
            .flat_map(|l| {
                self.adapter
                    .modules
                    .iter()
                    .map(move |m| format!("encoder.layer.{l}.{m}"))
            })
            .collect()
    }

    /// Shape of the state participants train and send.
    pub fn adapter_shape(&self) -> AdapterShape {
        AdapterShape {
            rank: self.adapter.rank,
            modules: self.module_names().len() as u32,
            head_classes: self.task.labels.len() as u32,
            head_hidden: self.model.hidden_size.unwrap_or(0),
        }
    }

    /// The privacy policy sent to participants, if DP is on.
    pub fn privacy_policy(&self) -> Option<PrivacyPolicy> {
        self.privacy.enabled.then_some(PrivacyPolicy {
            epsilon: self.privacy.epsilon,
            delta: self.privacy.delta,
            clip_norm: self.privacy.clip_norm,
        })
    }

    /// Where a federated initialization writes the task's adapter file:
    /// `<state_dir>/<task id>.adapter.safetensors`.
    pub fn federated_adapter_path(&self) -> PathBuf {
        self.server
            .state_dir
            .join(format!("{}.adapter.safetensors", self.task.id))
    }

    /// The adapter file with the task's A and B: `[adapter] file`, or the
    /// federated initialization's once it has written it; `None` before.
    pub fn adapter_file_path(&self) -> Option<PathBuf> {
        match (&self.adapter.file, self.adapter.init) {
            (Some(f), _) => Some(f.clone()),
            (None, AdapterInit::Federated) => {
                Some(self.federated_adapter_path()).filter(|p| p.is_file())
            }
            (None, AdapterInit::File) => None,
        }
    }

    /// η of the federated initialization.
    pub fn init_learning_rate(&self) -> f64 {
        self.adapter
            .init_learning_rate
            .unwrap_or(f64::from(self.task.learning_rate))
    }

    /// `[adapter]` in the identity; the initialization keys only for
    /// federated initialization, so the identity of other tasks is unchanged.
    fn adapter_identity(&self) -> serde_json::Value {
        let a = &self.adapter;
        match a.init {
            AdapterInit::File => serde_json::json!({ "rank": a.rank, "modules": a.modules }),
            AdapterInit::Federated => {
                let mut id = serde_json::json!({
                    "rank": a.rank,
                    "modules": a.modules,
                    "init": "federated",
                    "init_samples": a.init_samples,
                    "init_learning_rate": self.init_learning_rate(),
                    "init_seed": a.init_seed,
                });
                // Only when on, so that the identity of tasks from before
                // the option is unchanged.
                if a.centre_head {
                    id["centre_head"] = true.into();
                }
                id
            }
        }
    }

    /// The task's identity: everything but `[server]`, as canonical JSON. A
    /// state directory refuses to resume under a different identity.
    pub fn identity_json(&self) -> String {
        serde_json::json!({
            "task": self.task,
            "model": {
                "id": self.model.id,
                "sha256": self.model.sha256,
                "hidden_size": self.model.hidden_size,
                "num_layers": self.model.num_layers,
            },
            "adapter": self.adapter_identity(),
            "privacy": self.privacy.identity(),
        })
        .to_string()
    }
}

/// [`Config::load`] while holding figment's `Jail` lock (tests only): the
/// environment-override test sets `FEDSB_*` variables for the whole process
/// while it holds that lock, and a load in another test thread at that
/// moment would see them.
#[cfg(test)]
// figment's Jail API fixes the closure's error type to figment::Error.
#[allow(clippy::result_large_err)]
pub(crate) fn load_locked(path: &Path) -> Result<Config, ConfigError> {
    let mut out = None;
    figment::Jail::expect_with(|_| {
        out = Some(Config::load(path));
        Ok(())
    });
    out.expect("the jail ran the closure")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("task.toml");
        std::fs::write(&p, text).unwrap();
        p
    }

    /// Writes `text` as `dir/task.toml` and loads it ([`load_locked`]).
    fn load(dir: &Path, text: &str) -> Result<Config, ConfigError> {
        load_locked(&write(dir, text))
    }

    const MINIMAL: &str = r#"
[task]
id = "t1"
rounds = 3
labels = ["neg", "pos"]
[model]
id = "tiny"
hidden_size = 8
num_layers = 2
[adapter]
rank = 4
"#;

    #[test]
    fn minimal_config_gets_defaults_and_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let c = load(dir.path(), MINIMAL).unwrap();
        assert_eq!(c.module_names().len(), 12);
        assert_eq!(c.module_names()[7], "encoder.layer.1.attention.self.key");
        assert_eq!(
            c.adapter_shape(),
            AdapterShape {
                rank: 4,
                modules: 12,
                head_classes: 2,
                head_hidden: 8
            }
        );
        assert_eq!(c.task.weighting, Weighting::Samples);
        assert_eq!(c.server.state_dir, dir.path().join("state"));
    }

    #[test]
    fn privacy_settings_are_part_of_the_identity_only_with_dp_on() {
        let dir = tempfile::tempdir().unwrap();
        let absent = load(dir.path(), MINIMAL).unwrap();
        // An absent section is the documented defaults.
        assert!(!absent.privacy.enabled);
        assert_eq!(
            (
                absent.privacy.epsilon,
                absent.privacy.delta,
                absent.privacy.clip_norm
            ),
            (3.0, 1e-5, 0.1)
        );
        let with = |section: &str| load(dir.path(), &format!("{MINIMAL}[privacy]\n{section}\n"));
        // With DP off the values do nothing: one task however it is written.
        for off in [
            "enabled = false",
            "enabled = false\nepsilon = 3.0\ndelta = 1e-5\nclip_norm = 0.1",
            "epsilon = 8.0\nclip_norm = 1.0",
        ] {
            assert_eq!(
                with(off).unwrap().identity_json(),
                absent.identity_json(),
                "{off}"
            );
        }
        // With DP on they are the task's.
        let on = with("enabled = true").unwrap().identity_json();
        assert_ne!(on, absent.identity_json());
        assert_ne!(
            on,
            with("enabled = true\nepsilon = 5.0")
                .unwrap()
                .identity_json()
        );
        // Identities stored before DP-off values were left out: an absent
        // section's zeros and an explicit one's values both compare equal
        // to this version's; a DP-on one is left as it was.
        let now: serde_json::Value = serde_json::from_str(&absent.identity_json()).unwrap();
        for stored_privacy in [
            serde_json::json!({"enabled": false, "epsilon": 0.0, "delta": 0.0, "clip_norm": 0.0}),
            serde_json::json!({"enabled": false, "epsilon": 3.0, "delta": 1e-5, "clip_norm": 0.1}),
        ] {
            let mut stored = now.clone();
            stored["privacy"] = stored_privacy;
            assert_eq!(
                canonical_identity(&stored.to_string()),
                absent.identity_json()
            );
        }
        assert_eq!(canonical_identity(&on), on);
        assert_eq!(canonical_identity("not json"), "not json");
    }

    #[test]
    fn federated_init_is_checked_and_only_it_changes_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let plain = load(dir.path(), MINIMAL).unwrap();
        assert_eq!(plain.adapter.init, AdapterInit::File);
        let explicit = MINIMAL.replace("rank = 4", "rank = 4\ninit = \"file\"");
        let explicit = load(dir.path(), &explicit).unwrap();
        assert_eq!(plain.identity_json(), explicit.identity_json());
        // DP tasks cannot initialize federatedly: the gradients are not DP.
        let text = MINIMAL.replace("rank = 4", "rank = 4\ninit = \"federated\"")
            + "[privacy]\nenabled = true\n";
        let e = load(dir.path(), &text).unwrap_err();
        assert!(e.to_string().contains("not covered by DP-SGD"), "{e}");
        // It computes the adapter file, so it cannot also be given one.
        let text = MINIMAL.replace(
            "rank = 4",
            "rank = 4\ninit = \"federated\"\nfile = \"a.safetensors\"",
        );
        let e = load(dir.path(), &text).unwrap_err();
        assert!(e.to_string().contains("remove adapter.file"), "{e}");
        // And it needs the model's config.json for the layer shapes.
        let text = MINIMAL.replace("rank = 4", "rank = 4\ninit = \"federated\"");
        let e = load(dir.path(), &text).unwrap_err();
        assert!(e.to_string().contains("needs model.dir"), "{e}");
        let text = MINIMAL.replace("rank = 4", "rank = 4\ninit = \"bogus\"");
        assert!(load(dir.path(), &text).is_err());
        // Centring the head belongs to the federated initialization.
        let text = MINIMAL.replace("rank = 4", "rank = 4\ncentre_head = true");
        let e = load(dir.path(), &text).unwrap_err();
        assert!(e.to_string().contains("fedsb init --centre-head"), "{e}");
    }

    #[test]
    fn lr_decay_schedules_rounds_and_only_a_decay_changes_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let plain = load(dir.path(), MINIMAL).unwrap();
        assert_eq!(plain.task.lr_decay, 1.0);
        let explicit = MINIMAL.replace("rounds = 3", "rounds = 3\nlr_decay = 1.0");
        let explicit = load(dir.path(), &explicit).unwrap();
        assert_eq!(plain.identity_json(), explicit.identity_json());
        let decayed = MINIMAL.replace("rounds = 3", "rounds = 3\nlr_decay = 0.8");
        let decayed = load(dir.path(), &decayed).unwrap();
        assert_eq!(decayed.task.lr_decay, 0.8);
        assert_ne!(plain.identity_json(), decayed.identity_json());
        for bad in ["0.0", "-0.5", "1.25", "nan"] {
            let text = MINIMAL.replace("rounds = 3", &format!("rounds = 3\nlr_decay = {bad}"));
            let e = load(dir.path(), &text).unwrap_err();
            assert!(e.to_string().contains("task.lr_decay"), "{bad}: {e}");
        }
        // Round n trains at learning_rate · lr_decay^(n−1).
        assert_eq!(round_learning_rate(1e-2, 1.0, 0, 1), 1e-2);
        assert_eq!(round_learning_rate(1e-2, 1.0, 0, 10), 1e-2);
        assert_eq!(round_learning_rate(1e-2, 0.5, 0, 1), 1e-2);
        assert_eq!(round_learning_rate(1e-2, 0.5, 0, 3), 1e-2 / 4.0);
        let r3 = f64::from(decayed.task.round_learning_rate(3));
        let want = f64::from(decayed.task.learning_rate) * 0.64;
        assert!((r3 - want).abs() <= 1e-7 * want, "{r3}");
        let r10 = round_learning_rate(1e-2, 0.85, 0, 10);
        assert!(
            (f64::from(r10) - 1e-2 * 0.85f64.powi(9)).abs() < 1e-9,
            "{r10}"
        );
        // Round 0 (the initial model) is not trained; it maps to round 1.
        assert_eq!(round_learning_rate(1e-2, 0.5, 0, 0), 1e-2);
    }

    #[test]
    fn lr_warmup_rounds_ramp_the_first_rounds_and_only_a_warmup_changes_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let plain = load(dir.path(), MINIMAL).unwrap();
        assert_eq!(plain.task.lr_warmup_rounds, 0);
        let explicit = MINIMAL.replace("rounds = 3", "rounds = 3\nlr_warmup_rounds = 0");
        let explicit = load(dir.path(), &explicit).unwrap();
        assert_eq!(plain.identity_json(), explicit.identity_json());
        let warm = MINIMAL.replace("rounds = 3", "rounds = 3\nlr_warmup_rounds = 2");
        let warm = load(dir.path(), &warm).unwrap();
        assert_eq!(warm.task.lr_warmup_rounds, 2);
        assert_ne!(plain.identity_json(), warm.identity_json());
        // Rounds 1 and 2 at a third and two thirds, round 3 at the full rate.
        let lr = f64::from(warm.task.learning_rate);
        let rates: Vec<f64> = (1..=3)
            .map(|n| f64::from(warm.task.round_learning_rate(n)))
            .collect();
        for (got, want) in rates.iter().zip([lr / 3.0, 2.0 * lr / 3.0, lr]) {
            assert!((got - want).abs() <= 1e-7 * want, "{rates:?}");
        }
        // With a decay: the warm-up multiplies the decayed rate.
        let both = round_learning_rate(1e-2, 0.5, 1, 1);
        assert!((f64::from(both) - 5e-3).abs() < 1e-9, "{both}");
        assert_eq!(round_learning_rate(1e-2, 0.5, 1, 2), 5e-3);
        assert_eq!(round_learning_rate(1e-2, 0.5, 1, 3), 2.5e-3);
        // Round 0 maps to round 1.
        assert_eq!(
            round_learning_rate(1e-2, 1.0, 2, 0),
            round_learning_rate(1e-2, 1.0, 2, 1)
        );
        // A warm-up as long as the task leaves no round at the full rate.
        for bad in ["3", "7"] {
            let text = MINIMAL.replace(
                "rounds = 3",
                &format!("rounds = 3\nlr_warmup_rounds = {bad}"),
            );
            let e = load(dir.path(), &text).unwrap_err();
            assert!(
                e.to_string().contains("task.lr_warmup_rounds"),
                "{bad}: {e}"
            );
        }
        let e = load(
            dir.path(),
            &MINIMAL.replace("rounds = 3", "rounds = 3\nlr_warmup_rounds = -1"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("lr_warmup_rounds"), "{e}");
    }

    #[test]
    fn head_learning_rate_defaults_to_the_learning_rate_and_only_a_set_one_changes_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let plain = load(dir.path(), MINIMAL).unwrap();
        assert_eq!(plain.task.head_learning_rate, None);
        assert_eq!(plain.task.head_learning_rate(), plain.task.learning_rate);
        let set = MINIMAL.replace("rounds = 3", "rounds = 3\nhead_learning_rate = 2.5e-4");
        let set = load(dir.path(), &set).unwrap();
        assert_eq!(set.task.head_learning_rate(), 2.5e-4);
        assert_ne!(plain.identity_json(), set.identity_json());
        for bad in ["0.0", "-1e-3", "nan", "inf"] {
            let text = MINIMAL.replace(
                "rounds = 3",
                &format!("rounds = 3\nhead_learning_rate = {bad}"),
            );
            let e = load(dir.path(), &text).unwrap_err();
            assert!(
                e.to_string().contains("task.head_learning_rate"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_server_step_is_checked_and_only_a_non_default_one_changes_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let plain = load(dir.path(), MINIMAL).unwrap();
        assert!(plain.task.server_step().is_mean());
        let explicit = MINIMAL.replace(
            "rounds = 3",
            "rounds = 3\nserver_learning_rate = 1.0\nserver_momentum = 0.0",
        );
        let explicit = load(dir.path(), &explicit).unwrap();
        assert_eq!(plain.identity_json(), explicit.identity_json());
        let m = MINIMAL.replace(
            "rounds = 3",
            "rounds = 3\nserver_learning_rate = 0.5\nserver_momentum = 0.9",
        );
        let m = load(dir.path(), &m).unwrap();
        assert_eq!(
            m.task.server_step(),
            ServerStep {
                learning_rate: 0.5,
                momentum: 0.9
            }
        );
        assert_ne!(plain.identity_json(), m.identity_json());
        for (key, bad) in [
            ("server_learning_rate", "0.0"),
            ("server_learning_rate", "-1.0"),
            ("server_learning_rate", "2.5"),
            ("server_learning_rate", "nan"),
            ("server_momentum", "1.0"),
            ("server_momentum", "-0.5"),
            ("server_momentum", "nan"),
        ] {
            let text = MINIMAL.replace("rounds = 3", &format!("rounds = 3\n{key} = {bad}"));
            let e = load(dir.path(), &text).unwrap_err().to_string();
            assert!(e.contains(&format!("task.{key}")), "{key} = {bad}: {e}");
        }
    }

    #[test]
    fn invalid_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = MINIMAL.replace("rank = 4", "rank = 0");
        let e = load(dir.path(), &text).unwrap_err();
        assert!(e.to_string().contains("adapter.rank 0"), "{e}");
        let text = MINIMAL.replace(
            "rounds = 3",
            "rounds = 3\nmin_participants = 5\nmax_participants = 2",
        );
        let e = load(dir.path(), &text).unwrap_err();
        assert!(e.to_string().contains("max_participants (2)"), "{e}");
        let text = MINIMAL.replace("rounds = 3", "rounds = 3\nbogus = 1");
        let e = load(dir.path(), &text).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        for (privacy, message) in [
            (
                "epsilon = 0.0",
                "privacy.epsilon must be a finite number > 0, got 0",
            ),
            ("delta = 1.0", "privacy.delta must be in (0, 1), got 1"),
            (
                "clip_norm = -0.5",
                "privacy.clip_norm must be a finite number > 0, got -0.5",
            ),
        ] {
            let text = format!("{MINIMAL}[privacy]\nenabled = true\n{privacy}\n");
            let e = load(dir.path(), &text).unwrap_err();
            assert!(e.to_string().contains(message), "{privacy}: {e}");
            // Out-of-range values of a disabled section are not used.
            let text = format!("{MINIMAL}[privacy]\nenabled = false\n{privacy}\n");
            if let Err(e) = load(dir.path(), &text) {
                panic!("{privacy} with privacy disabled: {e}");
            }
        }
    }

    #[test]
    // figment's Jail API fixes the closure's error type to figment::Error.
    #[allow(clippy::result_large_err)]
    fn section_variables_override_and_other_fedsb_variables_are_ignored() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("task.toml", MINIMAL)?;
            jail.set_env("FEDSB_SERVER__PORT", "9123");
            jail.set_env("FEDSB_TASK__MIN_PARTICIPANTS", "1");
            jail.set_env("FEDSB_MODEL_DIR", "/somewhere/else");
            let c = Config::load(&jail.directory().join("task.toml")).map_err(|e| e.to_string())?;
            assert_eq!(c.server.port, 9123);
            assert_eq!(c.task.min_participants, 1);
            assert_eq!(c.model.dir, None);
            jail.set_env("FEDSB_TASK__ROUNDS", "zero");
            let e = Config::load(&jail.directory().join("task.toml")).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains("for key task.rounds")
                    && msg.contains("environment variable FEDSB_TASK__ROUNDS")
                    && !msg.contains("default."),
                "{msg}"
            );
            jail.set_env("FEDSB_TASK__ROUNDS", "3");
            // An unknown section: its variable goes on past the name shown.
            jail.set_env("FEDSB_TASKS__ROUNDS", "3");
            let msg = Config::load(&jail.directory().join("task.toml"))
                .unwrap_err()
                .to_string();
            assert!(
                msg.contains("found `tasks`")
                    && msg.contains("(environment variable FEDSB_TASKS__…)"),
                "{msg}"
            );
            Ok(())
        });
    }

    /// A model directory with only the config.json the configuration reads.
    fn model_dir(dir: &Path, hidden: u32, intermediate: u32, max_positions: u32) {
        let model = dir.join("model");
        std::fs::create_dir_all(&model).unwrap();
        let json = serde_json::json!({
            "hidden_size": hidden,
            "num_hidden_layers": 2,
            "intermediate_size": intermediate,
            "max_position_embeddings": max_positions,
        });
        std::fs::write(model.join("config.json"), json.to_string()).unwrap();
    }

    /// [`MINIMAL`] on `model_dir`'s model instead of a given shape.
    fn with_model_dir(text: &str) -> String {
        text.replace("hidden_size = 8\nnum_layers = 2", "dir = \"model\"")
    }

    #[test]
    fn the_rank_must_fit_every_adapted_module() {
        let dir = tempfile::tempdir().unwrap();
        // all-MiniLM-L6-v2's shape: the attention's linears are 384×384.
        model_dir(dir.path(), 384, 1536, 512);
        let text = with_model_dir(MINIMAL);
        let c = load(dir.path(), &text.replace("rank = 4", "rank = 384")).unwrap();
        assert_eq!(c.model.intermediate_size, Some(1536));
        let e = load(dir.path(), &text.replace("rank = 4", "rank = 400"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adapter.rank 400 exceeds 384")
                && e.contains(
                    "attention.self.query (384 out × 384 in, from model.dir's config.json)"
                ),
            "{e}"
        );
        // The feed-forward linears: min(out, in) is the hidden size when
        // the intermediate one is wider, and the intermediate size when not.
        model_dir(dir.path(), 64, 32, 512);
        let text = with_model_dir(MINIMAL).replace(
            "rank = 4",
            "rank = 48\nmodules = [\"attention.self.query\", \"output.dense\"]",
        );
        let e = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            e.contains("adapter.rank 48 exceeds 32") && e.contains("output.dense (64 out × 32 in,"),
            "{e}"
        );
        assert!(load(dir.path(), &text.replace("rank = 48", "rank = 32")).is_ok());
        // Without config.json only the hidden size is known: it bounds the
        // smaller side of every module.
        for modules in ["\"attention.self.key\"", "\"intermediate.dense\""] {
            let text = MINIMAL.replace("rank = 4", &format!("rank = 9\nmodules = [{modules}]"));
            let e = load(dir.path(), &text).unwrap_err().to_string();
            assert!(
                e.contains("adapter.rank 9 exceeds") && e.contains("model.hidden_size"),
                "{modules}: {e}"
            );
            assert!(load(dir.path(), &text.replace("rank = 9", "rank = 8")).is_ok());
        }
    }

    #[test]
    fn max_seq_len_must_fit_the_position_embeddings() {
        let dir = tempfile::tempdir().unwrap();
        model_dir(dir.path(), 16, 32, 512);
        let text = with_model_dir(MINIMAL);
        for (len, ok) in [
            ("512", true),
            ("3", true),
            ("513", false),
            ("100000", false),
        ] {
            let t = text.replace("rounds = 3", &format!("rounds = 3\nmax_seq_len = {len}"));
            match load(dir.path(), &t) {
                Ok(c) => assert!(ok, "{len} accepted ({:?})", c.model.max_position_embeddings),
                Err(e) => {
                    assert!(!ok, "{len}: {e}");
                    let e = e.to_string();
                    assert!(
                        e.contains(&format!("task.max_seq_len {len}"))
                            && e.contains("max_position_embeddings 512"),
                        "{e}"
                    );
                }
            }
        }
        // Without the model's config.json the limit is unknown; [CLS] and
        // [SEP] take two tokens in any case, and the text needs one.
        let long = MINIMAL.replace("rounds = 3", "rounds = 3\nmax_seq_len = 100000");
        assert!(load(dir.path(), &long).is_ok());
        for len in ["0", "1", "2"] {
            let t = MINIMAL.replace("rounds = 3", &format!("rounds = 3\nmax_seq_len = {len}"));
            let e = load(dir.path(), &t).unwrap_err().to_string();
            assert!(
                e.contains(&format!("task.max_seq_len {len} must be at least 3")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_task_with_a_model_but_no_adapter_file_is_warned_about() {
        let dir = tempfile::tempdir().unwrap();
        model_dir(dir.path(), 16, 32, 512);
        let c = load(dir.path(), &with_model_dir(MINIMAL)).unwrap();
        let w = c.warnings();
        assert!(
            w.len() == 1 && w[0].contains("fedsb init") && w[0].contains("federated"),
            "{w:?}"
        );
        // Model-less tasks (synthetic participants in tests) and federated
        // initializations are fine.
        assert!(load(dir.path(), MINIMAL).unwrap().warnings().is_empty());
        let federated =
            with_model_dir(MINIMAL).replace("rank = 4", "rank = 4\ninit = \"federated\"");
        assert!(load(dir.path(), &federated).unwrap().warnings().is_empty());
    }

    #[test]
    fn adapter_modules_must_be_known_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let modules =
            |list: &str| MINIMAL.replace("rank = 4", &format!("rank = 4\nmodules = [{list}]"));
        let c = load(
            dir.path(),
            &modules("\"output.dense\", \"attention.self.query\""),
        )
        .unwrap();
        assert_eq!(c.module_names()[0], "encoder.layer.0.output.dense");
        let e = load(
            dir.path(),
            &modules("\"attention.self.query\", \"attention.query\""),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("adapter.modules: unknown module \"attention.query\"")
                && e.contains("intermediate.dense"),
            "{e}"
        );
        let e = load(dir.path(), &modules("\"output.dense\", \"output.dense\""))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("adapter.modules lists \"output.dense\" twice"),
            "{e}"
        );
    }

    /// An adapter file holding one tensor and `metadata`.
    fn adapter_file(path: &Path, metadata: Option<&[(&str, &str)]>) {
        let data = [0u8; 4];
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &data).unwrap();
        let metadata = metadata.map(|m| {
            m.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        });
        let bytes = safetensors::serialize([("x", view)], metadata).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn task_labels_must_be_the_adapter_files() {
        let dir = tempfile::tempdir().unwrap();
        let text = MINIMAL.replace("rank = 4", "rank = 4\nfile = \"a.safetensors\"");
        let file = dir.path().join("a.safetensors");
        adapter_file(
            &file,
            Some(&[("labels", r#"["neg","pos"]"#), ("rank", "4")]),
        );
        assert!(load(dir.path(), &text).is_ok());
        // The order is the head's row order.
        adapter_file(&file, Some(&[("labels", r#"["pos","neg"]"#)]));
        let e = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            e.contains(r#"task.labels ["neg", "pos"] differ from the labels ["pos", "neg"]"#)
                && e.contains("a.safetensors"),
            "{e}"
        );
        adapter_file(&file, Some(&[("labels", r#"["neg","pos","neutral"]"#)]));
        assert!(load(dir.path(), &text).is_err());
        // A file without labels metadata is not checked.
        adapter_file(&file, None);
        assert!(load(dir.path(), &text).is_ok());
        adapter_file(&file, Some(&[("labels", "neg,pos")]));
        let e = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            e.contains("adapter.file") && e.contains("labels metadata"),
            "{e}"
        );
        std::fs::write(&file, [1, 2, 3]).unwrap();
        let e = load(dir.path(), &text).unwrap_err().to_string();
        assert!(e.contains("adapter.file") && e.contains("header"), "{e}");
        std::fs::remove_file(&file).unwrap();
        let e = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            e.contains("adapter.file") && e.contains("fedsb init"),
            "{e}"
        );
    }

    #[test]
    fn timings_are_bounded_and_the_idle_timeout_exceeds_the_ping_interval() {
        let dir = tempfile::tempdir().unwrap();
        let server = |lines: &str| format!("{MINIMAL}[server]\n{lines}\n");
        for (text, key) in [
            (
                MINIMAL.replace("rounds = 3", "rounds = 3\nround_deadline_secs = 0"),
                "task.round_deadline_secs 0",
            ),
            (
                MINIMAL.replace(
                    "rounds = 3",
                    "rounds = 3\nround_deadline_secs = 9223372036854775807",
                ),
                "task.round_deadline_secs 9223372036854775807",
            ),
            (
                server("ping_interval_secs = 0"),
                "server.ping_interval_secs 0",
            ),
            (
                server("ping_interval_secs = 9223372036854775807"),
                "server.ping_interval_secs 9223372036854775807",
            ),
            (
                server("idle_timeout_secs = 0"),
                "server.idle_timeout_secs 0",
            ),
            (
                server("idle_timeout_secs = 9223372036854775807"),
                "server.idle_timeout_secs 9223372036854775807",
            ),
            (
                server("ping_interval_secs = 30\nidle_timeout_secs = 30"),
                "server.idle_timeout_secs 30 must exceed server.ping_interval_secs 30",
            ),
            (
                server("idle_timeout_secs = 5"),
                "server.idle_timeout_secs 5 must exceed server.ping_interval_secs 10",
            ),
        ] {
            let e = load(dir.path(), &text).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let c = load(
            dir.path(),
            &server(&format!(
                "ping_interval_secs = 1\nidle_timeout_secs = {MAX_TIMING_SECS}"
            )),
        )
        .unwrap();
        assert_eq!(c.server.idle_timeout_secs, MAX_TIMING_SECS);
        // The defaults, and the end-to-end tests' 1 and 5.
        let c = load(dir.path(), MINIMAL).unwrap();
        assert_eq!(
            (c.server.ping_interval_secs, c.server.idle_timeout_secs),
            (10, 45)
        );
        assert!(load(
            dir.path(),
            &server("ping_interval_secs = 1\nidle_timeout_secs = 5")
        )
        .is_ok());
    }

    #[test]
    fn labels_must_be_distinct_and_named() {
        let dir = tempfile::tempdir().unwrap();
        for (labels, rule) in [
            (r#"["positive", "positive"]"#, "names \"positive\" twice"),
            (r#"["", " "]"#, "class 0 has a blank name \"\""),
            (r#"["neg", " "]"#, "class 1 has a blank name \" \""),
        ] {
            let text = MINIMAL.replace(r#"labels = ["neg", "pos"]"#, &format!("labels = {labels}"));
            let e = load(dir.path(), &text).unwrap_err().to_string();
            assert!(
                e.contains("task.labels") && e.contains(rule),
                "{labels}: {e}"
            );
        }
    }

    #[test]
    fn task_ids_name_plain_visible_files() {
        let dir = tempfile::tempdir().unwrap();
        for (id, rule) in [
            ("..", "must not start with '.'"),
            (".hidden", "must not start with '.'"),
            ("a/b", "use only letters"),
            ("", "must be non-empty"),
        ] {
            let text = MINIMAL.replace(r#"id = "t1""#, &format!("id = {id:?}"));
            let e = load(dir.path(), &text).unwrap_err().to_string();
            assert!(e.contains("task.id") && e.contains(rule), "{id}: {e}");
        }
        let text = MINIMAL.replace(r#"id = "t1""#, r#"id = "sst2.v2""#);
        assert_eq!(load(dir.path(), &text).unwrap().task.id, "sst2.v2");
    }

    #[test]
    fn names_sent_to_participants_fit_the_protocol() {
        let dir = tempfile::tempdir().unwrap();
        let longest = "é".repeat(MAX_STRING_BYTES / 2);
        let too_long = format!("{longest}x");
        // At the limit (2,048 two-byte characters): accepted.
        let text = MINIMAL.replace(r#""pos""#, &format!("{longest:?}"));
        let c = load(dir.path(), &text).unwrap();
        assert_eq!(c.task.labels[1], longest);
        for (key, text) in [
            (
                "task.labels",
                MINIMAL.replace(r#""pos""#, &format!("{too_long:?}")),
            ),
            (
                "model.id",
                MINIMAL.replace(r#"id = "tiny""#, &format!("id = {too_long:?}")),
            ),
        ] {
            let e = load(dir.path(), &text).unwrap_err().to_string();
            assert!(
                e.contains(key) && e.contains("4097 bytes long") && e.contains("at most 4096"),
                "{key}: {e}"
            );
        }
        let many: Vec<String> = (0..=MAX_LIST_LEN).map(|i| format!("c{i}")).collect();
        let text = MINIMAL.replace(r#"["neg", "pos"]"#, &format!("{many:?}"));
        let e = load(dir.path(), &text).unwrap_err().to_string();
        assert!(e.contains("task.labels names 4097 classes"), "{e}");
    }

    #[test]
    fn load_errors_name_keys_as_written_and_show_their_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let text = MINIMAL.replace("rounds = 3", "rounds = 3\nmin_participant = 2");
        let e = load(dir.path(), &text).unwrap_err();
        let shown = e.to_string();
        assert!(!shown.contains("default."), "{shown}");
        assert!(
            shown.contains("unknown field: found `min_participant`, expected one of `id`, ")
                && shown.contains("task")
                && !shown.contains("``"),
            "{shown}"
        );
        // As the binary prints it: the error and its chain.
        let chain = format!("{:?}", anyhow::Error::from(e));
        assert_eq!(chain.matches("unknown field").count(), 1, "{chain}");
        let text = MINIMAL.replace("rounds = 3", "rounds = \"three\"");
        let shown = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            shown.contains("for key task.rounds") && !shown.contains("default."),
            "{shown}"
        );
        // A syntax error keeps its line and column.
        let text = MINIMAL.replace("rounds = 3", "rounds = [3");
        let shown = load(dir.path(), &text).unwrap_err().to_string();
        assert!(
            shown.contains("line") && shown.contains("column"),
            "{shown}"
        );
    }

    #[test]
    fn identity_ignores_the_server_section() {
        let dir = tempfile::tempdir().unwrap();
        let a = load(dir.path(), MINIMAL).unwrap();
        let b = load(dir.path(), &format!("{MINIMAL}[server]\nport = 1234\n")).unwrap();
        assert_eq!(a.identity_json(), b.identity_json());
        let c = load(dir.path(), &MINIMAL.replace("rank = 4", "rank = 5")).unwrap();
        assert_ne!(a.identity_json(), c.identity_json());
    }

    /// A task whose model could not travel in one frame is refused at load,
    /// naming the sizes (BERT-base at rank 384: 42 MB per update).
    #[test]
    fn an_adapter_above_the_frame_limit_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bert = |rank: u32| {
            MINIMAL
                .replace("hidden_size = 8", "hidden_size = 768")
                .replace("num_layers = 2", "num_layers = 12")
                .replace("rank = 4", &format!("rank = {rank}"))
        };
        let e = load(dir.path(), &bert(384)).unwrap_err().to_string();
        assert!(
            e.contains("72 modules of rank 384")
                && e.contains("up to 42474402 bytes")
                && e.contains("33554432-byte frame limit"),
            "{e}"
        );
        load(dir.path(), &bert(256)).unwrap();
    }

    /// The keys of `[section]`, as serde names them when an unknown one is
    /// given (the sections deny unknown fields).
    fn keys_of(section: &str) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let text = if MINIMAL.contains(&format!("[{section}]\n")) {
            MINIMAL.replace(
                &format!("[{section}]\n"),
                &format!("[{section}]\nzzz_not_a_key = 1\n"),
            )
        } else {
            format!("{MINIMAL}[{section}]\nzzz_not_a_key = 1\n")
        };
        let message = load(dir.path(), &text).unwrap_err().to_string();
        let expected = message
            .split_once("expected")
            .unwrap_or_else(|| panic!("[{section}]: {message}"))
            .1;
        let keys: Vec<String> = expected
            .split('`')
            .map(str::trim)
            .filter(|w| {
                !w.is_empty()
                    && w.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            })
            .filter(|w| !["one", "of", "or", "for", "key"].contains(w) && !w.contains("zzz"))
            .map(str::to_owned)
            .collect();
        assert!(keys.len() >= 2, "[{section}]: no keys in {message}");
        keys
    }

    /// `configs/sst2-demo.toml` is the commented reference of every key,
    /// and the README's Configuration table names every key: a key added
    /// without its documentation fails here.
    #[test]
    fn every_key_is_in_the_demo_configuration_and_the_readme() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let demo = std::fs::read_to_string(root.join("configs/sst2-demo.toml")).unwrap();
        let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
        let word = |text: &str, key: &str| {
            text.match_indices(key).any(|(i, _)| {
                let before = text[..i].chars().next_back();
                let after = text[i + key.len()..].chars().next();
                let outside =
                    |c: Option<char>| !c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
                outside(before) && outside(after)
            })
        };
        let mut missing = Vec::new();
        for section in [
            "task", "model", "adapter", "privacy", "eval", "demo", "server",
        ] {
            let header = format!("[{section}]");
            let start = demo
                .lines()
                .position(|l| l.trim() == header)
                .unwrap_or_else(|| panic!("configs/sst2-demo.toml has no {header}"));
            let body: Vec<&str> = demo
                .lines()
                .skip(start + 1)
                .take_while(|l| !l.starts_with('['))
                .collect();
            let body = body.join("\n");
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{header}` |")))
                .unwrap_or_else(|| panic!("README's Configuration table has no {header} row"));
            for key in keys_of(section) {
                if !word(&body, &key) {
                    missing.push(format!(
                        "configs/sst2-demo.toml {header} does not name {key}"
                    ));
                }
                if !row.contains(&format!("`{key}`")) {
                    missing.push(format!("README's {header} row does not name `{key}`"));
                }
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
