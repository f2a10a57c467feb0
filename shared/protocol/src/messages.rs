//! Message types of both directions and their frame layouts.

use serde::{Deserialize, Serialize};

use crate::codec::{DecodeError, Reader, Writer};
use crate::{MAX_LIST_LEN, MAX_MODULES, MAX_RANK};

/// Number of a federated round. Round 0 is the initial model; training rounds
/// count from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RoundId(pub u64);

impl RoundId {
    /// The round after this one.
    pub fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl std::fmt::Display for RoundId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Identifier the server gives a connection at the handshake; unique for the
/// life of one server process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ParticipantId(pub u64);

impl std::fmt::Display for ParticipantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A dense f32 tensor in row-major order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    pub shape: Vec<u32>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// A tensor of zeros.
    pub fn zeros(shape: &[u32]) -> Self {
        let n = shape.iter().map(|&d| d as usize).product();
        Self {
            shape: shape.to_vec(),
            data: vec![0.0; n],
        }
    }

    /// A tensor from its shape and data; `None` when they disagree.
    pub fn new(shape: Vec<u32>, data: Vec<f32>) -> Option<Self> {
        let n: usize = shape.iter().map(|&d| d as usize).product();
        (n == data.len() && !shape.is_empty()).then_some(Self { shape, data })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// The shape of everything a participant trains and sends: one r×r matrix per
/// adapted module, and the classification head (weight `classes×hidden`,
/// bias `classes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdapterShape {
    pub rank: u32,
    pub modules: u32,
    pub head_classes: u32,
    pub head_hidden: u32,
}

impl AdapterShape {
    /// Number of f32 values in one adapter state.
    pub fn num_floats(&self) -> usize {
        let r = self.rank as usize;
        self.modules as usize * r * r
            + self.head_classes as usize * self.head_hidden as usize
            + self.head_classes as usize
    }

    /// The bytes an adapter state of this shape takes in a frame: the
    /// module count, each tensor's rank and dimensions, 4 bytes per value.
    pub fn encoded_bytes(&self) -> u64 {
        let r = u64::from(self.rank);
        let (classes, hidden) = (u64::from(self.head_classes), u64::from(self.head_hidden));
        4 + u64::from(self.modules) * (1 + 2 * 4 + r * r * 4)
            + (1 + 2 * 4 + classes * hidden * 4)
            + (1 + 4 + classes * 4)
    }

    /// An upper bound of the largest frame that carries an adapter state of
    /// this shape (an `Update` with its privacy report, a `GlobalModel`, a
    /// `CentreRequest`): [`Self::encoded_bytes`] plus
    /// [`ADAPTER_FRAME_OVERHEAD`]. A task whose bound exceeds
    /// [`crate::MAX_FRAME_BYTES`] could not send its model.
    pub fn max_frame_bytes(&self) -> u64 {
        self.encoded_bytes() + ADAPTER_FRAME_OVERHEAD
    }

    /// Why an adapter state of this shape cannot travel in one frame, if
    /// it cannot (see [`Self::max_frame_bytes`]).
    pub fn frame_limit_error(&self) -> Option<String> {
        let bytes = self.max_frame_bytes();
        (bytes > crate::MAX_FRAME_BYTES as u64).then(|| {
            format!(
                "the adapter is too large to send: {} modules of rank {} and a {}×{} head take \
                 up to {bytes} bytes in a frame, above the protocol's {}-byte frame limit",
                self.modules,
                self.rank,
                self.head_classes,
                self.head_hidden,
                crate::MAX_FRAME_BYTES
            )
        })
    }
}

/// What the messages that carry an adapter state add to it: magic, kind,
/// round, counts, loss and privacy report (75 bytes in the largest today).
pub const ADAPTER_FRAME_OVERHEAD: u64 = 256;

/// Why an adapter state does not fit a task.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ContentError {
    /// Number of R matrices differs from the task's adapted modules.
    #[error("expected {expected} R matrices (one per adapted module), found {found}")]
    ModuleCount { expected: u32, found: usize },
    /// A tensor has the wrong shape.
    #[error("tensor {tensor} has shape {found:?}, expected {expected:?}")]
    Shape {
        tensor: String,
        expected: Vec<u32>,
        found: Vec<u32>,
    },
    /// A value is NaN or infinite.
    #[error("tensor {tensor} holds a non-finite value ({value}) at index {index}")]
    NonFinite {
        tensor: String,
        index: usize,
        value: f32,
    },
}

/// What a participant trains: R of every adapted module and the head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterState {
    /// One r×r matrix per adapted module, in the task's module order.
    pub r: Vec<Tensor>,
    /// Classification head weight, `classes × hidden`.
    pub head_weight: Tensor,
    /// Classification head bias, `classes`.
    pub head_bias: Tensor,
}

impl AdapterState {
    /// All zeros in the given shape.
    pub fn zeros(shape: &AdapterShape) -> Self {
        Self {
            r: (0..shape.modules)
                .map(|_| Tensor::zeros(&[shape.rank, shape.rank]))
                .collect(),
            head_weight: Tensor::zeros(&[shape.head_classes, shape.head_hidden]),
            head_bias: Tensor::zeros(&[shape.head_classes]),
        }
    }

    /// Every tensor with its name (`r.<i>`, `head.weight`, `head.bias`).
    pub fn named_tensors(&self) -> impl Iterator<Item = (String, &Tensor)> {
        self.r
            .iter()
            .enumerate()
            .map(|(i, t)| (format!("r.{i}"), t))
            .chain([
                ("head.weight".to_owned(), &self.head_weight),
                ("head.bias".to_owned(), &self.head_bias),
            ])
    }

    /// Mutable access to every tensor, in the same order as [`Self::named_tensors`].
    pub fn tensors_mut(&mut self) -> impl Iterator<Item = &mut Tensor> {
        self.r
            .iter_mut()
            .chain([&mut self.head_weight, &mut self.head_bias])
    }

    /// Total number of f32 values.
    pub fn num_floats(&self) -> usize {
        self.named_tensors().map(|(_, t)| t.numel()).sum()
    }

    /// Checks the state against a task's shape and that every value is finite.
    pub fn validate(&self, shape: &AdapterShape) -> Result<(), ContentError> {
        if self.r.len() != shape.modules as usize {
            return Err(ContentError::ModuleCount {
                expected: shape.modules,
                found: self.r.len(),
            });
        }
        let expected = |name: &str| -> Vec<u32> {
            match name {
                "head.weight" => vec![shape.head_classes, shape.head_hidden],
                "head.bias" => vec![shape.head_classes],
                _ => vec![shape.rank, shape.rank],
            }
        };
        for (name, t) in self.named_tensors() {
            let want = expected(&name);
            if t.shape != want {
                return Err(ContentError::Shape {
                    tensor: name,
                    expected: want,
                    found: t.shape.clone(),
                });
            }
        }
        for (name, t) in self.named_tensors() {
            if let Some((index, &value)) = t.data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
                return Err(ContentError::NonFinite {
                    tensor: name,
                    index,
                    value,
                });
            }
        }
        Ok(())
    }

    fn write(&self, w: &mut Writer) {
        w.len(self.r.len());
        for t in &self.r {
            w.tensor(t);
        }
        w.tensor(&self.head_weight);
        w.tensor(&self.head_bias);
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        // Each tensor takes at least 1 (ndim) + 4 (one dim) bytes.
        let n = r.len("adapter.r count", MAX_MODULES as usize, 5)?;
        let mut mats = Vec::with_capacity(n);
        for _ in 0..n {
            let t = r.tensor("adapter.r")?;
            if let Some(&d) = t.shape.iter().find(|&&d| d > MAX_RANK) {
                return Err(DecodeError::LimitExceeded {
                    field: "adapter.r dimension (rank)",
                    value: u64::from(d),
                    max: u64::from(MAX_RANK),
                });
            }
            mats.push(t);
        }
        Ok(Self {
            r: mats,
            head_weight: r.tensor("adapter.head_weight")?,
            head_bias: r.tensor("adapter.head_bias")?,
        })
    }
}

/// The differential-privacy parameters a participant trained one update with,
/// so that the aggregator can show what each participant has spent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyReport {
    /// Noise multiplier σ (noise std = σ·C).
    pub noise_multiplier: f64,
    /// Poisson sampling rate q.
    pub sample_rate: f64,
    /// DP-SGD steps taken for this update.
    pub steps: u64,
    /// Per-sample clipping norm C.
    pub clip_norm: f64,
    /// δ used for the ε below.
    pub delta: f64,
    /// ε spent by this participant over all its updates so far.
    pub epsilon_spent: f64,
}

impl PrivacyReport {
    fn write(&self, w: &mut Writer) {
        w.f64(self.noise_multiplier)
            .f64(self.sample_rate)
            .u64(self.steps)
            .f64(self.clip_norm)
            .f64(self.delta)
            .f64(self.epsilon_spent);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            noise_multiplier: r.f64("privacy.noise_multiplier")?,
            sample_rate: r.f64("privacy.sample_rate")?,
            steps: r.u64("privacy.steps")?,
            clip_norm: r.f64("privacy.clip_norm")?,
            delta: r.f64("privacy.delta")?,
            epsilon_spent: r.f64("privacy.epsilon_spent")?,
        })
    }
}

/// One participant's result for one round.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    /// The round this update was trained for (from `RoundOpen`).
    pub round: RoundId,
    /// Training samples used this round; the aggregation weight. Must be > 0.
    pub num_samples: u64,
    /// Mean local training loss over the round, if the participant reports it.
    pub train_loss: Option<f32>,
    /// DP-SGD parameters, when the task uses differential privacy.
    pub privacy: Option<PrivacyReport>,
    /// The trained R matrices and head.
    pub adapter: AdapterState,
}

/// Messages a participant sends to the aggregator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message of every connection.
    Hello {
        /// Must equal the server's [`crate::PROTOCOL_VERSION`].
        protocol_version: u16,
        /// Free-form description of the participant (e.g. "browser/Chrome 131").
        client: String,
        /// A secret the participant chose at random and keeps with its data
        /// (see [`crate::check_participant_key`]): the server gives the same
        /// [`ParticipantId`] to every connection that presents it, before and
        /// after a restart of either side, so an update accepted before a
        /// reconnect is recognized and counted once. `None`: a new
        /// participant on every connection.
        participant_key: Option<String>,
    },
    /// The participant's trained state for one round.
    Update(ClientUpdate),
    /// The participant leaves; the server closes the connection.
    Leave { reason: String },
    /// Federated LoRA-SB initialization: the participant's summed gradient
    /// `G = Σ_batches ∂L_batch/∂W0` of one adapted module (index into the
    /// task's `module_names`, shape `out × in` of that linear), over its
    /// first `init_samples` examples. Only after an
    /// [`ServerMessage::InitRequest`]; one frame per module, then
    /// [`ClientMessage::InitDone`].
    InitGradient { module: u32, gradient: Tensor },
    /// Every module's [`ClientMessage::InitGradient`] has been sent; the
    /// gradients were summed over `num_samples` examples. The server answers
    /// [`ServerMessage::InitAccepted`] (the contribution counts) or an error
    /// (none of it counts).
    InitDone { num_samples: u64 },
    /// Answer to a [`ServerMessage::CentreRequest`] (version 5): the sums,
    /// per class (`[classes]`, the task's label order), of the logits of the
    /// initial model over the participant's `num_samples` initialization
    /// examples. The server answers [`ServerMessage::CentreAccepted`] or an
    /// error.
    CentreLogits {
        logit_sums: Tensor,
        num_samples: u64,
    },
}

/// Kind bytes of participant → server frames.
mod client_kind {
    pub const HELLO: u8 = 0x01;
    pub const UPDATE: u8 = 0x02;
    pub const LEAVE: u8 = 0x03;
    pub const INIT_GRADIENT: u8 = 0x04;
    pub const INIT_DONE: u8 = 0x05;
    pub const CENTRE_LOGITS: u8 = 0x06;
}

impl ClientMessage {
    /// Encodes the message as one binary frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Hello {
                protocol_version,
                client,
                participant_key,
            } => {
                let mut w = Writer::frame(client_kind::HELLO);
                w.u16(*protocol_version).string(client);
                match participant_key {
                    Some(k) => w.u8(1).string(k),
                    None => w.u8(0),
                };
                w.finish()
            }
            Self::Update(u) => {
                let mut w = Writer::frame_with_capacity(
                    client_kind::UPDATE,
                    u.adapter.num_floats() * 4 + 128,
                );
                w.u64(u.round.0).u64(u.num_samples);
                match u.train_loss {
                    Some(l) => w.u8(1).f32(l),
                    None => w.u8(0),
                };
                match &u.privacy {
                    Some(p) => {
                        w.u8(1);
                        p.write(&mut w);
                    }
                    None => {
                        w.u8(0);
                    }
                }
                u.adapter.write(&mut w);
                w.finish()
            }
            Self::Leave { reason } => {
                let mut w = Writer::frame(client_kind::LEAVE);
                w.string(reason);
                w.finish()
            }
            Self::InitGradient { module, gradient } => {
                let mut w = Writer::frame_with_capacity(
                    client_kind::INIT_GRADIENT,
                    gradient.numel() * 4 + 32,
                );
                w.u32(*module).tensor(gradient);
                w.finish()
            }
            Self::InitDone { num_samples } => {
                let mut w = Writer::frame(client_kind::INIT_DONE);
                w.u64(*num_samples);
                w.finish()
            }
            Self::CentreLogits {
                logit_sums,
                num_samples,
            } => {
                let mut w = Writer::frame(client_kind::CENTRE_LOGITS);
                w.tensor(logit_sums).u64(*num_samples);
                w.finish()
            }
        }
    }

    /// Decodes one frame. Never panics; errors name what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, mut r) = Reader::frame(bytes)?;
        let msg = match kind {
            client_kind::HELLO => {
                let protocol_version = r.u16("hello.protocol_version")?;
                let client = r.string("hello.client")?;
                let participant_key = if r.bool("hello.participant_key present")? {
                    let key = r.string("hello.participant_key")?;
                    crate::check_participant_key(&key)?;
                    Some(key)
                } else {
                    None
                };
                Self::Hello {
                    protocol_version,
                    client,
                    participant_key,
                }
            }
            client_kind::UPDATE => {
                let round = RoundId(r.u64("update.round")?);
                let num_samples = r.u64("update.num_samples")?;
                let train_loss = if r.bool("update.train_loss present")? {
                    Some(r.f32("update.train_loss")?)
                } else {
                    None
                };
                let privacy = if r.bool("update.privacy present")? {
                    Some(PrivacyReport::read(&mut r)?)
                } else {
                    None
                };
                let adapter = AdapterState::read(&mut r)?;
                Self::Update(ClientUpdate {
                    round,
                    num_samples,
                    train_loss,
                    privacy,
                    adapter,
                })
            }
            client_kind::LEAVE => Self::Leave {
                reason: r.string("leave.reason")?,
            },
            client_kind::INIT_GRADIENT => Self::InitGradient {
                module: r.u32("init_gradient.module")?,
                gradient: r.tensor("init_gradient.gradient")?,
            },
            client_kind::INIT_DONE => Self::InitDone {
                num_samples: r.u64("init_done.num_samples")?,
            },
            client_kind::CENTRE_LOGITS => Self::CentreLogits {
                logit_sums: r.tensor("centre_logits.logit_sums")?,
                num_samples: r.u64("centre_logits.num_samples")?,
            },
            kind => {
                return Err(DecodeError::UnknownKind {
                    direction: "participant",
                    kind,
                })
            }
        };
        r.finish()?;
        Ok(msg)
    }

    /// The protocol version of a frame if it is a `Hello`, even when the rest
    /// of it does not decode (so that a future version is told it is
    /// unsupported rather than that its frame is malformed).
    pub fn peek_hello_version(bytes: &[u8]) -> Option<u16> {
        let (kind, mut r) = Reader::frame(bytes).ok()?;
        (kind == client_kind::HELLO)
            .then(|| r.u16("hello.protocol_version").ok())
            .flatten()
    }
}

/// A file participants download once and cache by content hash.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// File name in the model directory (e.g. `model.safetensors`).
    pub name: String,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Path on the aggregator's HTTP server, e.g. `/files/<sha256>`.
    pub url: String,
}

impl FileRef {
    fn write(&self, w: &mut Writer) {
        w.string(&self.name)
            .string(&self.sha256)
            .u64(self.size)
            .string(&self.url);
    }
    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.string("file.name")?,
            sha256: r.string("file.sha256")?,
            size: r.u64("file.size")?,
            url: r.string("file.url")?,
        })
    }
}

/// The task's differential-privacy policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PrivacyPolicy {
    /// Target ε each participant may spend over the whole task.
    pub epsilon: f64,
    /// δ of the guarantee.
    pub delta: f64,
    /// Per-sample clipping norm C.
    pub clip_norm: f64,
}

/// A field of a [`PrivacyPolicy`] outside its range.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PolicyField {
    /// ε must be finite and > 0.
    Epsilon,
    /// δ must be in (0, 1).
    Delta,
    /// C must be finite and > 0.
    ClipNorm,
}

impl PolicyField {
    /// The range the field must be in, in words.
    pub fn expected(self) -> &'static str {
        match self {
            Self::Epsilon | Self::ClipNorm => "a finite number > 0",
            Self::Delta => "in (0, 1)",
        }
    }
}

impl PrivacyPolicy {
    /// Checks ε, δ and C against their ranges (ε and C finite and > 0, δ in
    /// (0, 1)); the first one outside is returned with its value, so each
    /// caller can name it in its own terms (a config key, a flag).
    pub fn check(&self) -> Result<(), (PolicyField, f64)> {
        if !(self.epsilon > 0.0 && self.epsilon.is_finite()) {
            return Err((PolicyField::Epsilon, self.epsilon));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err((PolicyField::Delta, self.delta));
        }
        if !(self.clip_norm > 0.0 && self.clip_norm.is_finite()) {
            return Err((PolicyField::ClipNorm, self.clip_norm));
        }
        Ok(())
    }
}

/// What a participant needs to know to train for a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    pub task_id: String,
    /// Model name, e.g. `sentence-transformers/all-MiniLM-L6-v2`.
    pub model_id: String,
    /// SHA-256 of the model's weight file.
    pub model_sha256: String,
    /// Adapted modules in the order of [`AdapterState::r`].
    pub module_names: Vec<String>,
    pub shape: AdapterShape,
    /// Names of the classes, in head row order.
    pub labels: Vec<String>,
    /// Local optimizer steps per round.
    pub local_steps: u32,
    pub batch_size: u32,
    /// The task's base AdamW learning rate: round 1's without a warm-up
    /// (each round's is in its [`ServerMessage::RoundOpen`]).
    pub learning_rate: f32,
    /// The classification head's base learning rate (version 4); a round's
    /// head rate is its `RoundOpen` rate times `head_learning_rate /
    /// learning_rate`. Equal to `learning_rate` unless the task sets it.
    pub head_learning_rate: f32,
    pub max_seq_len: u32,
    /// Number of training rounds of the task.
    pub total_rounds: u64,
    /// Files to download (model, tokenizer, adapter matrices).
    pub files: Vec<FileRef>,
    /// Differential privacy, when the task uses it.
    pub privacy: Option<PrivacyPolicy>,
}

impl TaskInfo {
    fn write(&self, w: &mut Writer) {
        w.string(&self.task_id)
            .string(&self.model_id)
            .string(&self.model_sha256);
        w.len(self.module_names.len());
        for m in &self.module_names {
            w.string(m);
        }
        w.u32(self.shape.rank)
            .u32(self.shape.modules)
            .u32(self.shape.head_classes)
            .u32(self.shape.head_hidden);
        w.len(self.labels.len());
        for l in &self.labels {
            w.string(l);
        }
        w.u32(self.local_steps)
            .u32(self.batch_size)
            .f32(self.learning_rate)
            .f32(self.head_learning_rate)
            .u32(self.max_seq_len)
            .u64(self.total_rounds);
        w.len(self.files.len());
        for f in &self.files {
            f.write(w);
        }
        match &self.privacy {
            Some(p) => {
                w.u8(1).f64(p.epsilon).f64(p.delta).f64(p.clip_norm);
            }
            None => {
                w.u8(0);
            }
        }
    }

    fn read(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let task_id = r.string("task.task_id")?;
        let model_id = r.string("task.model_id")?;
        let model_sha256 = r.string("task.model_sha256")?;
        let n = r.len("task.module_names count", MAX_MODULES as usize, 4)?;
        let module_names = (0..n)
            .map(|_| r.string("task.module_names"))
            .collect::<Result<_, _>>()?;
        let shape = AdapterShape {
            rank: r.u32("task.rank")?,
            modules: r.u32("task.modules")?,
            head_classes: r.u32("task.head_classes")?,
            head_hidden: r.u32("task.head_hidden")?,
        };
        let n = r.len("task.labels count", MAX_LIST_LEN, 4)?;
        let labels = (0..n)
            .map(|_| r.string("task.labels"))
            .collect::<Result<_, _>>()?;
        let local_steps = r.u32("task.local_steps")?;
        let batch_size = r.u32("task.batch_size")?;
        let learning_rate = r.f32("task.learning_rate")?;
        let head_learning_rate = r.f32("task.head_learning_rate")?;
        let max_seq_len = r.u32("task.max_seq_len")?;
        let total_rounds = r.u64("task.total_rounds")?;
        let n = r.len("task.files count", MAX_LIST_LEN, 20)?;
        let files = (0..n).map(|_| FileRef::read(r)).collect::<Result<_, _>>()?;
        let privacy = if r.bool("task.privacy present")? {
            Some(PrivacyPolicy {
                epsilon: r.f64("task.privacy.epsilon")?,
                delta: r.f64("task.privacy.delta")?,
                clip_norm: r.f64("task.privacy.clip_norm")?,
            })
        } else {
            None
        };
        Ok(Self {
            task_id,
            model_id,
            model_sha256,
            module_names,
            shape,
            labels,
            local_steps,
            batch_size,
            learning_rate,
            head_learning_rate,
            max_seq_len,
            total_rounds,
            files,
            privacy,
        })
    }
}

/// Typed reason of a [`ServerMessage::Error`]. The numeric codes are stable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// `Hello` carried a protocol version this server does not speak. The
    /// connection is closed after this error.
    VersionMismatch,
    /// The frame could not be decoded (bad magic, truncated, unknown kind, a
    /// limit exceeded, an invalid participant key…), or it was a text frame.
    Malformed,
    /// The frame exceeded [`crate::MAX_FRAME_BYTES`].
    FrameTooLarge,
    /// A message other than `Hello` arrived before the handshake.
    NotHandshaken,
    /// A second `Hello` on the same connection.
    DuplicateHello,
    /// Wrong number of R matrices or a tensor of the wrong shape.
    ShapeMismatch,
    /// NaN or infinite values in an update, an `InitGradient` or a
    /// `CentreLogits`; also an update value, or a `CentreLogits` sum's mean
    /// per sample, beyond ±[`crate::MAX_UPDATE_ABS`].
    NonFinite,
    /// Update for a round that is already closed.
    StaleRound,
    /// Update for a round that is not open yet.
    FutureRound,
    /// A second update from the same participant in the same round; also a
    /// second `InitGradient` of one module, anything of the initialization
    /// after the participant's accepted `InitDone`, or a `CentreLogits`
    /// after its accepted one.
    DuplicateUpdate,
    /// `num_samples` is zero, or more than the participant could have used:
    /// for an `Update`, `local_steps × batch_size`; for `InitDone` and
    /// `CentreLogits`, the task's `init_samples`.
    InvalidSampleCount,
    /// The round already has `max_participants` updates; or an
    /// `InitGradient` from one participant more than the `max_participants`
    /// whose gradients the initialization holds or has summed.
    RoundFull,
    /// The task has finished all its rounds.
    TaskFinished,
    /// An invalid privacy report (non-finite or out-of-range values).
    InvalidPrivacyReport,
    /// The server failed; the message says nothing more to the participant.
    /// In answer to `Hello` (the participant key could not be looked up, or
    /// the server is shutting down) the connection is closed after it.
    Internal,
    /// An initialization message (`InitGradient`, `InitDone`) while the task
    /// is not collecting initialization gradients, an `InitDone` without
    /// every module's gradient, or a `CentreLogits` while the task is not
    /// centring its initial head.
    NotInitializing,
    /// `Hello` presented a participant key that another open connection
    /// presented too (the same data joined twice). The connection is closed
    /// after this error; the other one is not affected.
    AlreadyConnected,
    /// A code from a newer protocol revision.
    Other(u16),
}

impl ErrorCode {
    /// The stable numeric code.
    pub fn code(self) -> u16 {
        match self {
            Self::VersionMismatch => 1,
            Self::Malformed => 2,
            Self::FrameTooLarge => 3,
            Self::NotHandshaken => 4,
            Self::DuplicateHello => 5,
            Self::ShapeMismatch => 6,
            Self::NonFinite => 7,
            Self::StaleRound => 8,
            Self::FutureRound => 9,
            Self::DuplicateUpdate => 10,
            Self::InvalidSampleCount => 11,
            Self::RoundFull => 12,
            Self::TaskFinished => 13,
            Self::InvalidPrivacyReport => 14,
            Self::Internal => 15,
            Self::NotInitializing => 16,
            Self::AlreadyConnected => 17,
            Self::Other(c) => c,
        }
    }

    /// The code for a number.
    pub fn from_code(code: u16) -> Self {
        match code {
            1 => Self::VersionMismatch,
            2 => Self::Malformed,
            3 => Self::FrameTooLarge,
            4 => Self::NotHandshaken,
            5 => Self::DuplicateHello,
            6 => Self::ShapeMismatch,
            7 => Self::NonFinite,
            8 => Self::StaleRound,
            9 => Self::FutureRound,
            10 => Self::DuplicateUpdate,
            11 => Self::InvalidSampleCount,
            12 => Self::RoundFull,
            13 => Self::TaskFinished,
            14 => Self::InvalidPrivacyReport,
            15 => Self::Internal,
            16 => Self::NotInitializing,
            17 => Self::AlreadyConnected,
            c => Self::Other(c),
        }
    }

    /// A short snake_case name, used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::VersionMismatch => "version_mismatch",
            Self::Malformed => "malformed",
            Self::FrameTooLarge => "frame_too_large",
            Self::NotHandshaken => "not_handshaken",
            Self::DuplicateHello => "duplicate_hello",
            Self::ShapeMismatch => "shape_mismatch",
            Self::NonFinite => "non_finite",
            Self::StaleRound => "stale_round",
            Self::FutureRound => "future_round",
            Self::DuplicateUpdate => "duplicate_update",
            Self::InvalidSampleCount => "invalid_sample_count",
            Self::RoundFull => "round_full",
            Self::TaskFinished => "task_finished",
            Self::InvalidPrivacyReport => "invalid_privacy_report",
            Self::Internal => "internal",
            Self::NotInitializing => "not_initializing",
            Self::AlreadyConnected => "already_connected",
            Self::Other(_) => "other",
        }
    }
}

/// Messages the aggregator sends to a participant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Answer to a compatible `Hello`.
    Welcome {
        protocol_version: u16,
        participant: ParticipantId,
        task: TaskInfo,
    },
    /// The global adapter state after `round` was committed (round 0: the
    /// initial state). Sent to every participant on commit and to each new
    /// participant after `Welcome`.
    GlobalModel {
        round: RoundId,
        /// Participants whose updates were averaged into this state.
        participants: u32,
        /// Sum of their sample counts.
        total_samples: u64,
        adapter: AdapterState,
    },
    /// Round `round` accepts updates until the deadline (Unix milliseconds).
    /// Sent again with a later deadline when the round is extended.
    /// `local_steps` (0: the task's) and `learning_rate` are what the
    /// participant trains this round with; the learning rate follows the
    /// task's per-round schedule (version 3).
    RoundOpen {
        round: RoundId,
        deadline_unix_ms: u64,
        local_steps: u32,
        learning_rate: f32,
    },
    /// The participant's update for `round` was accepted.
    UpdateAccepted { round: RoundId },
    /// Something the participant sent was rejected; nothing it sent changed
    /// any round's result.
    Error { code: ErrorCode, message: String },
    /// All rounds are committed; no more rounds will open.
    TaskFinished { rounds_committed: u64 },
    /// The task starts with a federated LoRA-SB initialization (sent after
    /// `Welcome` instead of `GlobalModel` while it collects gradients): run
    /// the plain encoder with this classification head on the first
    /// `init_samples` examples in batches of `batch_size` and send the summed
    /// gradients ([`ClientMessage::InitGradient`], [`ClientMessage::InitDone`]).
    InitRequest {
        init_samples: u64,
        batch_size: u32,
        head_weight: Tensor,
        head_bias: Tensor,
    },
    /// The participant's initialization gradients were accepted.
    InitAccepted { num_samples: u64 },
    /// The initialization is done: the adapter file (A, B, R₀ and the head)
    /// can be downloaded by hash; `GlobalModel` of round 0 and `RoundOpen`
    /// follow.
    AdapterReady { file: FileRef },
    /// The task centres its initial head (`[adapter] centre_head`, version
    /// 5; after `AdapterReady`, and after `Welcome` to a participant that
    /// joins meanwhile): compute the logits of the initial model (the
    /// adapter file's A and B with this state's `R`s and head) over the
    /// first `init_samples` local examples, drawn as for the
    /// initialization in batches of `batch_size`, and send their per-class
    /// sums ([`ClientMessage::CentreLogits`]). The server then shifts the
    /// head's bias so that every class has the same mean logit over all the
    /// samples reported, and commits round 0 with it.
    CentreRequest {
        init_samples: u64,
        batch_size: u32,
        adapter: AdapterState,
    },
    /// The participant's logit sums were accepted.
    CentreAccepted { num_samples: u64 },
}

/// Kind bytes of server → participant frames.
mod server_kind {
    pub const WELCOME: u8 = 0x81;
    pub const GLOBAL_MODEL: u8 = 0x82;
    pub const ROUND_OPEN: u8 = 0x83;
    pub const UPDATE_ACCEPTED: u8 = 0x84;
    pub const ERROR: u8 = 0x85;
    pub const TASK_FINISHED: u8 = 0x86;
    pub const INIT_REQUEST: u8 = 0x87;
    pub const INIT_ACCEPTED: u8 = 0x88;
    pub const ADAPTER_READY: u8 = 0x89;
    pub const CENTRE_REQUEST: u8 = 0x8a;
    pub const CENTRE_ACCEPTED: u8 = 0x8b;
}

impl ServerMessage {
    /// The message's `type` tag in its serde form (`"global_model"`, …: what
    /// the wasm bindings hand JavaScript; the wire itself is binary, with no
    /// JSON), for messages about it that should not print its tensors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Welcome { .. } => "welcome",
            Self::GlobalModel { .. } => "global_model",
            Self::RoundOpen { .. } => "round_open",
            Self::UpdateAccepted { .. } => "update_accepted",
            Self::Error { .. } => "error",
            Self::TaskFinished { .. } => "task_finished",
            Self::InitRequest { .. } => "init_request",
            Self::InitAccepted { .. } => "init_accepted",
            Self::AdapterReady { .. } => "adapter_ready",
            Self::CentreRequest { .. } => "centre_request",
            Self::CentreAccepted { .. } => "centre_accepted",
        }
    }

    /// Encodes the message as one binary frame.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Welcome {
                protocol_version,
                participant,
                task,
            } => {
                let mut w = Writer::frame(server_kind::WELCOME);
                w.u16(*protocol_version).u64(participant.0);
                task.write(&mut w);
                w.finish()
            }
            Self::GlobalModel {
                round,
                participants,
                total_samples,
                adapter,
            } => {
                let mut w = Writer::frame_with_capacity(
                    server_kind::GLOBAL_MODEL,
                    adapter.num_floats() * 4 + 64,
                );
                w.u64(round.0).u32(*participants).u64(*total_samples);
                adapter.write(&mut w);
                w.finish()
            }
            Self::RoundOpen {
                round,
                deadline_unix_ms,
                local_steps,
                learning_rate,
            } => {
                let mut w = Writer::frame(server_kind::ROUND_OPEN);
                w.u64(round.0)
                    .u64(*deadline_unix_ms)
                    .u32(*local_steps)
                    .f32(*learning_rate);
                w.finish()
            }
            Self::UpdateAccepted { round } => {
                let mut w = Writer::frame(server_kind::UPDATE_ACCEPTED);
                w.u64(round.0);
                w.finish()
            }
            Self::Error { code, message } => {
                let mut w = Writer::frame(server_kind::ERROR);
                w.u16(code.code()).string(message);
                w.finish()
            }
            Self::TaskFinished { rounds_committed } => {
                let mut w = Writer::frame(server_kind::TASK_FINISHED);
                w.u64(*rounds_committed);
                w.finish()
            }
            Self::InitRequest {
                init_samples,
                batch_size,
                head_weight,
                head_bias,
            } => {
                let mut w = Writer::frame_with_capacity(
                    server_kind::INIT_REQUEST,
                    (head_weight.numel() + head_bias.numel()) * 4 + 64,
                );
                w.u64(*init_samples)
                    .u32(*batch_size)
                    .tensor(head_weight)
                    .tensor(head_bias);
                w.finish()
            }
            Self::InitAccepted { num_samples } => {
                let mut w = Writer::frame(server_kind::INIT_ACCEPTED);
                w.u64(*num_samples);
                w.finish()
            }
            Self::AdapterReady { file } => {
                let mut w = Writer::frame(server_kind::ADAPTER_READY);
                file.write(&mut w);
                w.finish()
            }
            Self::CentreRequest {
                init_samples,
                batch_size,
                adapter,
            } => {
                let mut w = Writer::frame_with_capacity(
                    server_kind::CENTRE_REQUEST,
                    adapter.num_floats() * 4 + 64,
                );
                w.u64(*init_samples).u32(*batch_size);
                adapter.write(&mut w);
                w.finish()
            }
            Self::CentreAccepted { num_samples } => {
                let mut w = Writer::frame(server_kind::CENTRE_ACCEPTED);
                w.u64(*num_samples);
                w.finish()
            }
        }
    }

    /// Decodes one frame. Never panics; errors name what was wrong.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let (kind, mut r) = Reader::frame(bytes)?;
        let msg = match kind {
            server_kind::WELCOME => Self::Welcome {
                protocol_version: r.u16("welcome.protocol_version")?,
                participant: ParticipantId(r.u64("welcome.participant")?),
                task: TaskInfo::read(&mut r)?,
            },
            server_kind::GLOBAL_MODEL => Self::GlobalModel {
                round: RoundId(r.u64("global.round")?),
                participants: r.u32("global.participants")?,
                total_samples: r.u64("global.total_samples")?,
                adapter: AdapterState::read(&mut r)?,
            },
            server_kind::ROUND_OPEN => Self::RoundOpen {
                round: RoundId(r.u64("round_open.round")?),
                deadline_unix_ms: r.u64("round_open.deadline_unix_ms")?,
                local_steps: r.u32("round_open.local_steps")?,
                learning_rate: r.f32("round_open.learning_rate")?,
            },
            server_kind::UPDATE_ACCEPTED => Self::UpdateAccepted {
                round: RoundId(r.u64("accepted.round")?),
            },
            server_kind::ERROR => Self::Error {
                code: ErrorCode::from_code(r.u16("error.code")?),
                message: r.string("error.message")?,
            },
            server_kind::TASK_FINISHED => Self::TaskFinished {
                rounds_committed: r.u64("finished.rounds_committed")?,
            },
            server_kind::INIT_REQUEST => Self::InitRequest {
                init_samples: r.u64("init_request.init_samples")?,
                batch_size: r.u32("init_request.batch_size")?,
                head_weight: r.tensor("init_request.head_weight")?,
                head_bias: r.tensor("init_request.head_bias")?,
            },
            server_kind::INIT_ACCEPTED => Self::InitAccepted {
                num_samples: r.u64("init_accepted.num_samples")?,
            },
            server_kind::ADAPTER_READY => Self::AdapterReady {
                file: FileRef::read(&mut r)?,
            },
            server_kind::CENTRE_REQUEST => Self::CentreRequest {
                init_samples: r.u64("centre_request.init_samples")?,
                batch_size: r.u32("centre_request.batch_size")?,
                adapter: AdapterState::read(&mut r)?,
            },
            server_kind::CENTRE_ACCEPTED => Self::CentreAccepted {
                num_samples: r.u64("centre_accepted.num_samples")?,
            },
            kind => {
                return Err(DecodeError::UnknownKind {
                    direction: "server",
                    kind,
                })
            }
        };
        r.finish()?;
        Ok(msg)
    }
}
