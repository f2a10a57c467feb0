//! `fedsb sim`: a whole federated Fed-SB run in one process on one GPU.
//!
//! ```text
//! fedsb sim --model models/all-MiniLM-L6-v2 --train data/sst2/train.tsv \
//!     --eval data/sst2/dev.tsv --clients 3 --rounds 5 --split dirichlet:0.5 --json
//! ```
//!
//! N simulated participants share one [`GpuContext`] and one [`GpuEncoder`];
//! each client's turn sets the encoder's trainable state to the global `R`s
//! and head ([`GpuEncoder::set_trainable`], which also resets the AdamW
//! moments; with `--keep-moments` the client's own moments from its previous
//! round are set again, [`LocalOptimizer`]), trains, and reads the result
//! back. The aggregation is the aggregator's own [`Round`] (`accept` +
//! `aggregate`: the f64 weighted mean, weights = samples), fed with updates
//! that went through the wire encoding.
//!
//! Every client round is exactly what `fedsb join` does for a round: the same
//! AdamW (weight decay 0.01, moments reset every round unless both keep
//! them), `local_steps` batches of `batch` from a [`BatchSampler`] over its
//! own shard that keeps its state across rounds (seeded with the client's
//! batch seed, see [`client_seed`]), `num_samples` = samples used,
//! `train_loss` = their mean loss. So a
//! simulation equals the same run over WebSockets when the joiners get the
//! shard files and seeds that `--write-shards` writes (`tests/tests/sim.rs`
//! checks that).
//!
//! With `--dp-epsilon E --clip C` every client trains as `fedsb join` does
//! on a task with `[privacy]`: σ calibrated once (by `--accountant`) so that
//! its `rounds × local_steps` DP-SGD steps at q = batch / its shard size
//! spend at most ε at `--dp-delta`, Poisson-sampled batches, per-sample
//! gradients clipped jointly to C, Gaussian noise from the OS's CSPRNG
//! (`fedsb_participant::train_round_dp`, the code of `fedsb join` and the
//! browser tab), the update weighted by its expected samples and sent with
//! its privacy report, which the aggregator's own policy check accepts
//! ([`check_report_against_policy`]). DP-SGD does not cover the LoRA-SB
//! initialization, so a DP simulation starts from `--init` (a file `fedsb
//! init` made from public seed data). Each round reports the largest ε any
//! client has spent. The noise is not seeded, so DP runs do not repeat bit
//! for bit.
//!
//! The initial model comes from `--init FILE`, from a LoRA-SB
//! initialization on `--init-samples` pooled training examples (what an
//! operator's `fedsb init` makes), or with `--federated-init N` from the
//! federated initialization a task with `[adapter] init = "federated"` runs
//! before round 1: every client's `InitGradient` frames over N of its own
//! examples, summed and signed by the aggregator's [`InitCollector`] (and
//! with `--centre-head` the head centred over the clients' `CentreLogits`
//! by a [`CentreCollector`]).
//! The head of an `--init` file keeps its classes: when the file names
//! them (its `labels` metadata) the training and evaluation data are read
//! with them, in the head's order, and `--labels` must agree, as with
//! `fedsb train --init`.
//! The adapter files the simulator writes (`--output`, `--write-shards`'s
//! initial model) record the base model (`base_model_sha256`, the SHA-256
//! of `--model`'s `model.safetensors`) and the `max_seq_len` of the run,
//! and an `--init` file recording another base model is refused.
//!
//! Splits ([`split_iid`], [`split_dirichlet`]) are seeded and documented on
//! the functions. Byte counts are the sizes of the real protocol frames: per
//! round, `bytes_up` = Σ of the clients' encoded `Update` frames and
//! `bytes_down` = clients × the encoded `GlobalModel` frame they started the
//! round from; with `--federated-init`, round 0's are the initialization's
//! frames (`bytes_up` as the aggregator counts its round 0's `bytes_in`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_aggregator::config::{round_learning_rate, Weighting};
use fedsb_aggregator::coordinator::check_report_against_policy;
use fedsb_aggregator::init_round::{CentreCollector, InitCollector, InitModules};
use fedsb_aggregator::round::{Round, ServerStep};
use fedsb_engine::data::{Dataset, Example};
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::{GpuEncoder, GradientMode};
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{AdaptedLinear, BertTokenizer, BertWeights};
use fedsb_engine::reference::{
    ClassifierHead, LoraSbAdapters, LoraSbInitOptions, Matrix, TrainableGradients,
};
use fedsb_engine::train::{
    centre_head_bias, encode_examples, evaluate, gpu_lora_sb_init, init_batches, BatchSampler,
};
use fedsb_participant::LocalOptimizer;
use fedsb_privacy::AccountantKind;
use fedsb_protocol::{
    AdapterShape, AdapterState, ClientMessage, ClientUpdate, ParticipantId, PolicyField,
    PrivacyPolicy, RoundId, ServerMessage, TaskInfo, Tensor,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::checks::{
    check_classes, check_output_dir, check_output_file, load_base_model, resolve_file_max_seq_len,
    resolve_max_seq_len, training_inputs, BaseModel, InitFile, DEFAULT_MAX_SEQ_LEN, DEFAULT_RANK,
};
use crate::data_args::{head_classes, read_eval_set, read_training_set, DataColumns};
use crate::dp_training::DpTraining;
use crate::participant::{
    engine_to_state, layered_modules, read_adapter_file, read_head, state_to_engine,
    write_adapter_file, write_file_atomically, ModuleRef, MAX_SEQ_LEN,
};
use crate::privacy_cmd::AccountantArg;

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Training data (.csv, .tsv or .jsonl), split among the clients.
    #[arg(long)]
    train: PathBuf,
    /// Evaluation data (same columns as --train); the global model is
    /// evaluated on it after every round.
    #[arg(long)]
    eval: PathBuf,
    /// Number of simulated participants.
    #[arg(long)]
    clients: usize,
    /// Number of federated rounds.
    #[arg(long)]
    rounds: u64,
    /// How the training data is split: `iid` or `dirichlet:ALPHA` (label skew,
    /// smaller ALPHA = more skew).
    #[arg(long, default_value = "iid")]
    split: String,
    /// Seed of the split, the clients' batch order and the LoRA-SB init.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// AdamW steps per client per round (default: one epoch of an average
    /// shard, ⌈train rows / clients / batch⌉, the same for every client).
    #[arg(long)]
    local_steps: Option<u32>,
    /// LoRA-SB rank r [default: 32, or the rank of the --init file].
    #[arg(long)]
    rank: Option<usize>,
    /// Batch size (training, LoRA-SB init and evaluation).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// The clients' AdamW learning rate (in round 1, with --lr-decay).
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Per-round decay of the clients' learning rate: round n trains at
    /// lr · decay^(n−1), as a task with `[task] lr_decay` announces it to
    /// its participants. 1 keeps it constant.
    #[arg(long, default_value_t = 1.0)]
    lr_decay: f64,
    /// Linear warm-up of the clients' learning rate: rounds 1..=W train at
    /// n/(W+1) of it (round W+1 at the full rate), as `[task]
    /// lr_warmup_rounds`. 0 has none.
    #[arg(long, default_value_t = 0)]
    lr_warmup_rounds: u32,
    /// The clients' AdamW learning rate of the classification head (default:
    /// --lr), as `[task] head_learning_rate`. With --lr-decay it decays with
    /// --lr, keeping their ratio.
    #[arg(long)]
    head_lr: Option<f32>,
    /// The server's learning rate η: the global model moves η of the way
    /// from the previous one to the clients' mean (with --server-momentum,
    /// FedAvgM), as `[task] server_learning_rate`. 1 takes the mean.
    #[arg(long, default_value_t = 1.0)]
    server_lr: f64,
    /// The server's momentum β (FedAvgM): the global model also moves β
    /// times its previous move, as `[task] server_momentum`. 0 keeps none.
    #[arg(long, default_value_t = 0.0)]
    server_momentum: f64,
    /// η of the LoRA-SB initialization, ΔW = −η·sign(G), which scales R₀
    /// (default: --lr; a task's `[adapter] init_learning_rate`). Set it to
    /// vary the clients' learning rate from the same initialization. Not with
    /// --init, whose file already holds R₀.
    #[arg(long)]
    init_lr: Option<f32>,
    /// Truncate sequences to this many tokens (special tokens included).
    /// [default: the --init file's max_seq_len metadata; without it 128, or
    /// the model's max_position_embeddings if fewer]
    #[arg(long, value_name = "N")]
    max_seq_len: Option<usize>,
    /// Training samples (a seeded choice from all of --train) whose gradients
    /// initialize A, B and R₀, as `fedsb init` does. Not with --init, which
    /// skips the initialization; --federated-init gives the clients' own
    /// instead.
    #[arg(long, default_value_t = 256, conflicts_with = "init")]
    init_samples: usize,
    /// Start from this adapter file (written by `fedsb init`) instead of
    /// initializing: its A, B, R₀ and head. Its head's classes are its
    /// `labels` metadata, in order, when it has one (as `fedsb train
    /// --init`): the data are read with them and --labels must agree.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Initialize federatedly, as a task with `[adapter] init = "federated"`
    /// and `init_samples = N` does over WebSockets: every client sums the
    /// initialization gradients of N of its own examples (drawn with its
    /// batch seed, as `fedsb join --seed` draws them), the aggregator adds
    /// them up and makes A, B and R₀ from their signs; with --centre-head the
    /// clients then send their logit sums under the initial model and the
    /// head is centred over them. Round 0 reports the initialization's
    /// frames. Not with --init or --init-samples (the pooled initialization).
    #[arg(long, value_name = "N", conflicts_with_all = ["init", "init_samples"])]
    federated_init: Option<u64>,
    /// Adapted linears in each layer, comma-separated (attention.self.query,
    /// attention.self.key, attention.self.value, attention.output.dense,
    /// intermediate.dense, output.dense); default: those of the --init file,
    /// else all six. With --init, they must be the file's.
    #[arg(long, value_delimiter = ',')]
    modules: Vec<String>,
    /// Class names in head order, comma-separated (the task's `[task]
    /// labels`); default: those of the --init file's head, else the classes
    /// of --train.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Train only the head; every R stays at its initial value (a baseline
    /// that shows what the adapters add).
    #[arg(long)]
    head_only: bool,
    /// Centre the initial head: after the LoRA-SB initialization, shift the
    /// head's bias so that every class has the same mean logit over the
    /// initialization's samples under the initial model (as `fedsb init
    /// --centre-head` and `fedsb train --centre-head`). Not with --init,
    /// whose file's head is used as it is (make it with `fedsb init
    /// --centre-head`).
    #[arg(long, conflicts_with = "init")]
    centre_head: bool,
    /// Every client carries its AdamW moments from one round into the next
    /// (`fedsb join --keep-moments`) instead of resetting them at the start
    /// of every round.
    #[arg(long)]
    keep_moments: bool,
    /// Evaluate on the first N evaluation examples only (0: all).
    #[arg(long, default_value_t = 0)]
    eval_limit: usize,
    /// Write one CSV row per round here, with the fields of the --json
    /// lines but the confusion matrix, in their order.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw the evaluation accuracy per round as a PNG here.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Write every client's shard (`client-<i>.jsonl`) and `shards.json`
    /// (sizes, label counts, batch seeds, the task's settings and the
    /// `fedsb join` flags that reproduce this run over WebSockets) into this
    /// directory; without --init also the initial model as the adapter file
    /// `init.safetensors` (what `fedsb init` would write, with the same
    /// settings) for the task's `[adapter] file`.
    #[arg(long)]
    write_shards: Option<PathBuf>,
    /// Write the global state of every round as the exact `GlobalModel`
    /// frame the aggregator would store (`round-<n>.bin`) into this directory.
    #[arg(long)]
    write_globals: Option<PathBuf>,
    /// Write the final global model (A, B, the last round's R of every
    /// module and the head) to this adapter file, in the layout of `fedsb
    /// train --output` (`fedsb eval` and `fedsb merge` read it).
    #[arg(long)]
    output: Option<PathBuf>,
    /// One JSON line per round on stdout (the summary table then goes to stderr).
    #[arg(long)]
    json: bool,
    /// Differential privacy: every client trains with DP-SGD, σ calibrated
    /// so that its rounds × local steps spend at most this ε (as `fedsb join`
    /// on a task with `[privacy]`). Needs --clip and --init.
    #[arg(long)]
    dp_epsilon: Option<f64>,
    /// δ of the DP guarantee.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Differential privacy: per-sample clipping norm C (joint L2 norm over
    /// every R and the head).
    #[arg(long)]
    clip: Option<f64>,
    /// Privacy accountant for calibration and the ε reported.
    #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
    accountant: AccountantArg,
    #[command(flatten)]
    columns: DataColumns,
    /// Use the GPU adapter whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
}

impl SimArgs {
    /// The rank (set from the `--init` file by `run` when not given).
    fn rank(&self) -> usize {
        self.rank.unwrap_or(DEFAULT_RANK)
    }

    /// The sequence length (set from the model by `run` when not given).
    fn seq_len(&self) -> usize {
        self.max_seq_len.unwrap_or(DEFAULT_MAX_SEQ_LEN)
    }

    /// The head's learning rate in round 1: --head-lr, else --lr.
    fn head_lr(&self) -> f32 {
        self.head_lr.unwrap_or(self.lr)
    }

    /// η of the LoRA-SB initialization: --init-lr, else --lr.
    fn init_lr(&self) -> f32 {
        self.init_lr.unwrap_or(self.lr)
    }

    /// The server's step from --server-lr and --server-momentum.
    fn server_step(&self) -> ServerStep {
        ServerStep {
            learning_rate: self.server_lr,
            momentum: self.server_momentum,
        }
    }
}

/// How the training data is divided among the clients.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    Iid,
    Dirichlet(f64),
}

impl std::str::FromStr for Split {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("iid") {
            return Ok(Self::Iid);
        }
        if let Some(a) = s.strip_prefix("dirichlet:") {
            let alpha: f64 = a
                .trim()
                .parse()
                .map_err(|_| format!("--split {s}: ALPHA {a:?} is not a number"))?;
            if !(alpha > 0.0 && alpha.is_finite()) {
                return Err(format!("--split {s}: ALPHA must be positive and finite"));
            }
            return Ok(Self::Dirichlet(alpha));
        }
        Err(format!(
            "unknown --split {s:?}: expected `iid` or `dirichlet:ALPHA` (e.g. dirichlet:0.5)"
        ))
    }
}

/// SplitMix64, the seeded generator of the splits.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Gamma(shape, 1) by Marsaglia and Tsang (2000); shape < 1 through
    /// Gamma(shape + 1)·U^(1/shape).
    fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = self.uniform();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.uniform();
            if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
                return d * v;
            }
        }
    }

    /// Fisher–Yates shuffle.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The batch-order seed of client `i` (0-based): `seed + 1 + i`. `fedsb join
/// --seed` with this value draws the same batches from the same shard file.
pub fn client_seed(seed: u64, i: usize) -> u64 {
    seed.wrapping_add(1 + i as u64)
}

fn check_clients(n: usize, clients: usize) -> anyhow::Result<()> {
    if clients == 0 {
        bail!("--clients must be at least 1");
    }
    if clients > n {
        bail!("--clients {clients} is more than the {n} training examples: every client needs at least one");
    }
    Ok(())
}

/// IID split: the indices `0..n` shuffled (Fisher–Yates, SplitMix64 seeded
/// with `seed`) and cut into `clients` contiguous shards whose sizes differ by
/// at most one (the first `n mod clients` shards get the extra example).
/// Each shard is returned in ascending index order (its file keeps the
/// data's order; batches are shuffled by the client anyway).
pub fn split_iid(n: usize, clients: usize, seed: u64) -> anyhow::Result<Vec<Vec<usize>>> {
    check_clients(n, clients)?;
    let mut order: Vec<usize> = (0..n).collect();
    Rng(seed).shuffle(&mut order);
    let (base, extra) = (n / clients, n % clients);
    let mut out = Vec::with_capacity(clients);
    let mut start = 0;
    for k in 0..clients {
        let len = base + usize::from(k < extra);
        let mut shard = order[start..start + len].to_vec();
        shard.sort_unstable();
        out.push(shard);
        start += len;
    }
    Ok(out)
}

/// Label-skewed split (Hsu, Qi and Brown 2019): for every class in id order,
/// its examples are shuffled and divided among the clients in proportions
/// p ~ Dirichlet(α, …, α) (client k gets the examples between
/// ⌊n_c·Σ_{j<k} p_j⌋ and ⌊n_c·Σ_{j≤k} p_j⌋). One SplitMix64 stream seeded
/// with `seed` drives all shuffles and Gamma draws (p = g / Σg with
/// g_k ~ Gamma(α)). Afterwards every client left empty, in client order,
/// receives the last example of the currently largest shard (lowest client
/// index on ties), so every client has at least one example. Shards are
/// returned in ascending index order.
pub fn split_dirichlet(
    labels: &[u32],
    num_classes: usize,
    clients: usize,
    alpha: f64,
    seed: u64,
) -> anyhow::Result<Vec<Vec<usize>>> {
    check_clients(labels.len(), clients)?;
    if !(alpha > 0.0 && alpha.is_finite()) {
        bail!("the Dirichlet concentration alpha must be positive, got {alpha}");
    }
    let mut rng = Rng(seed);
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); clients];
    for class in 0..num_classes as u32 {
        let mut members: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] == class).collect();
        if members.is_empty() {
            continue;
        }
        rng.shuffle(&mut members);
        let g: Vec<f64> = (0..clients).map(|_| rng.gamma(alpha)).collect();
        let total: f64 = g.iter().sum();
        let p: Vec<f64> = if total > 0.0 && total.is_finite() {
            g.iter().map(|x| x / total).collect()
        } else {
            // Every draw underflowed (tiny alpha): one client takes the class.
            let k = (rng.next_u64() % clients as u64) as usize;
            (0..clients).map(|j| f64::from(u8::from(j == k))).collect()
        };
        let n = members.len();
        let mut cum = 0.0;
        let mut start = 0;
        for (k, pk) in p.iter().enumerate() {
            cum += pk;
            let end = if k + 1 == clients {
                n
            } else {
                ((n as f64 * cum).floor() as usize).clamp(start, n)
            };
            out[k].extend_from_slice(&members[start..end]);
            start = end;
        }
    }
    for k in 0..clients {
        if out[k].is_empty() {
            let donor = (0..clients)
                .max_by_key(|&j| (out[j].len(), std::cmp::Reverse(j)))
                .expect("clients > 0");
            let moved = out[donor].pop().expect("n >= clients leaves a shard of 2+");
            out[k].push(moved);
        }
    }
    for shard in &mut out {
        shard.sort_unstable();
    }
    Ok(out)
}

/// One client of the simulation.
struct Client {
    shard: Vec<Example>,
    sampler: BatchSampler,
    seed: u64,
    /// DP-SGD state (σ, the privacy ledger, the noise source) with --dp-epsilon.
    dp: Option<DpTraining>,
    /// AdamW and, with --keep-moments, the moments carried between rounds.
    opt: LocalOptimizer,
}

/// One round's results.
#[derive(Debug, Clone, serde::Serialize)]
struct RoundRow {
    round: u64,
    eval_accuracy: f64,
    eval_loss: f64,
    train_loss: Option<f64>,
    participants: u32,
    samples: u64,
    bytes_up: u64,
    bytes_down: u64,
    seconds: f64,
    /// With differential privacy: the largest ε any client has spent so far.
    epsilon_spent: Option<f64>,
    /// The clients' learning rate in this round (none for round 0).
    learning_rate: Option<f32>,
    /// `eval_confusion[label][predicted]`: the evaluation's confusion matrix
    /// in the order of the task's labels.
    eval_confusion: Vec<Vec<u64>>,
}

/// AdamW on the head only, on the CPU (the `--head-only` baseline), with
/// the formula of `adamw.wgsl` (torch.optim.AdamW).
struct HeadAdam {
    m: Vec<f32>,
    v: Vec<f32>,
    steps: i32,
}

impl HeadAdam {
    fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            steps: 0,
        }
    }

    fn step(&mut self, opt: &AdamW, params: &mut [f32], grads: &[f32]) {
        self.steps += 1;
        let bc1 = (1.0 - f64::from(opt.beta1).powi(self.steps)) as f32;
        let bc2 = (1.0 - f64::from(opt.beta2).powi(self.steps)) as f32;
        for (i, (p, &g)) in params.iter_mut().zip(grads).enumerate() {
            let m1 = opt.beta1 * self.m[i] + (1.0 - opt.beta1) * g;
            let v1 = opt.beta2 * self.v[i] + (1.0 - opt.beta2) * g * g;
            self.m[i] = m1;
            self.v[i] = v1;
            let decayed = *p * (1.0 - opt.lr * opt.weight_decay);
            *p = decayed - (opt.lr / bc1) * m1 / (v1.sqrt() / bc2.sqrt() + opt.eps);
        }
    }
}

/// The training set, read with the classes of `--init`'s head when the
/// file names them (`--labels` must then agree), else `--labels`, else its
/// own; and the evaluation examples, read with the same class ids.
fn read_data(
    args: &SimArgs,
    init_file: Option<&InitFile>,
) -> anyhow::Result<(Dataset, Vec<Example>)> {
    let classes = head_classes(
        init_file.map(|f| (f.path.as_str(), f.labels.as_deref())),
        args.labels.as_deref(),
    )?;
    let train = read_training_set(&args.train, &args.columns, classes.as_ref())?;
    if train.num_labels() < 2 {
        bail!(
            "{}: the head needs at least two classes, found {:?} (give them with --labels)",
            args.train.display(),
            train.label_names
        );
    }
    check_classes(&train, &args.train)?;
    let eval = read_eval_set(&args.eval, &train)?;
    let mut eval_examples = eval.examples;
    if args.eval_limit > 0 {
        eval_examples.truncate(args.eval_limit);
    }
    Ok((train, eval_examples))
}

/// The initial model's adapter file that `--write-shards` writes when the
/// simulator initializes the adapters itself.
const INIT_FILE: &str = "init.safetensors";

/// Writes each client's shard as JSONL with the training file's column names
/// (labels by class name) and `shards.json`, which names `adapter_file`:
/// the task's `[adapter] file` (the `--init` file, or [`INIT_FILE`] in `dir`).
fn write_shards(
    dir: &Path,
    train: &Dataset,
    clients: &[Client],
    args: &SimArgs,
    split: &str,
    local_steps: u32,
    adapter_file: &str,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let label_col = train.label_column.clone().unwrap_or_else(|| "label".into());
    let mut manifest = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let name = format!("client-{}.jsonl", i + 1);
        let mut text = String::new();
        let mut counts = vec![0u64; train.num_labels()];
        for e in &c.shard {
            let mut obj = serde_json::Map::new();
            obj.insert(train.text_column.clone(), e.text.clone().into());
            if let (Some(col), Some(p)) = (&train.text_pair_column, &e.text_pair) {
                obj.insert(col.clone(), p.clone().into());
            }
            let label = e.label.context("an unlabelled training example")? as usize;
            counts[label] += 1;
            obj.insert(label_col.clone(), train.label_names[label].clone().into());
            let _ = writeln!(text, "{}", serde_json::Value::Object(obj));
        }
        let path = dir.join(&name);
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        let label_counts: serde_json::Map<String, serde_json::Value> = train
            .label_names
            .iter()
            .zip(&counts)
            .map(|(n, c)| (n.clone(), (*c).into()))
            .collect();
        let mut join_args = vec!["--data".to_owned(), name.clone(), "--seed".to_owned()];
        join_args.push(c.seed.to_string());
        if args.keep_moments {
            join_args.push("--keep-moments".to_owned());
        }
        manifest.push(serde_json::json!({
            "client": i + 1,
            "file": name,
            "examples": c.shard.len(),
            "labels": label_counts,
            "batch_seed": c.seed,
            "join_args": join_args,
        }));
    }
    let doc = serde_json::json!({
        "split": split,
        "seed": args.seed,
        "clients": manifest,
        "task": {
            "labels": train.label_names,
            "local_steps": local_steps,
            "batch_size": args.batch,
            "learning_rate": args.lr,
            "head_learning_rate": args.head_lr(),
            "lr_decay": args.lr_decay,
            "lr_warmup_rounds": args.lr_warmup_rounds,
            "server_learning_rate": args.server_lr,
            "server_momentum": args.server_momentum,
            "max_seq_len": args.seq_len(),
            "rank": args.rank(),
            "modules": args.modules,
            "adapter_file": adapter_file,
            // A task that initializes federatedly instead (`[adapter] init =
            // "federated"`): these settings make the same initial model.
            "federated_init_samples": args.federated_init,
            "init_learning_rate": args.init_lr(),
            "init_seed": args.seed,
            "centre_head": args.centre_head,
        },
    });
    let path = dir.join("shards.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&doc)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What the federated initialization (`--federated-init`) exchanged, in the
/// aggregator's accounting of its round 0.
#[derive(Debug, Clone, Copy)]
struct InitTraffic {
    participants: u32,
    /// Examples the summed gradients cover.
    samples: u64,
    /// The clients' `InitGradient`, `InitDone` and `CentreLogits` frames.
    bytes_up: u64,
    /// Every client's `InitRequest` and `CentreRequest` frames (the adapter
    /// file with A, B and R₀ comes over HTTP and is not counted, as with
    /// `--init`).
    bytes_down: u64,
}

/// The federated LoRA-SB initialization of `--federated-init N`, with the
/// code `fedsb join` and the aggregator run over WebSockets: each client's
/// `InitGradient`s and `InitDone` (its first N examples in the order of its
/// batch seed) encoded, decoded and summed by the aggregator's
/// [`InitCollector`], A, B and R₀ from the signs; with --centre-head each
/// client's `CentreLogits` under the initial model, summed by a
/// [`CentreCollector`] that centres the head's bias.
#[allow(clippy::too_many_arguments)]
fn federated_initial_model(
    args: &SimArgs,
    per_client: u64,
    ctx: &GpuContext,
    weights: &BertWeights<f32>,
    tokenizer: &BertTokenizer,
    train: &Dataset,
    clients: &[Client],
    names: &[String],
    modules: &[ModuleRef],
) -> anyhow::Result<(LoraSbAdapters<f32>, ClassifierHead<f32>, InitTraffic)> {
    let config = &weights.config;
    let classes = train.num_labels();
    let init_modules = InitModules::new(config.clone(), names.to_vec())?;
    // The aggregator's initial head for `[adapter] init_seed` = --seed.
    let mut head = init_modules.head(classes, args.seed);
    let head_weight = Tensor::new(
        vec![classes as u32, config.hidden_size as u32],
        head.weight.data.clone(),
    )
    .context("the initial head's weight")?;
    let head_bias =
        Tensor::new(vec![classes as u32], head.bias.clone()).context("the initial head's bias")?;
    let task = TaskInfo {
        task_id: "fedsb-sim".into(),
        model_id: args.model.display().to_string(),
        model_sha256: String::new(),
        module_names: names.to_vec(),
        shape: AdapterShape {
            rank: args.rank() as u32,
            modules: modules.len() as u32,
            head_classes: classes as u32,
            head_hidden: config.hidden_size as u32,
        },
        labels: train.label_names.clone(),
        local_steps: 1,
        batch_size: args.batch as u32,
        learning_rate: args.lr,
        head_learning_rate: args.head_lr(),
        max_seq_len: args.seq_len() as u32,
        total_rounds: args.rounds,
        files: Vec::new(),
        privacy: None,
    };
    let request = ServerMessage::InitRequest {
        init_samples: per_client,
        batch_size: args.batch as u32,
        head_weight: head_weight.clone(),
        head_bias: head_bias.clone(),
    }
    .encode();
    let mut bytes_down = request.len() as u64 * clients.len() as u64;
    let started = Instant::now();
    let mut collector = InitCollector::new(init_modules.shapes.clone(), per_client, clients.len());
    for (i, client) in clients.iter().enumerate() {
        let p = ParticipantId(i as u64 + 1);
        let (gradients, taken) = pollster::block_on(fedsb_participant::init_gradients(
            ctx,
            &task,
            weights,
            tokenizer,
            &client.shard,
            client.seed,
            per_client,
            args.batch as u32,
            head_weight.clone(),
            head_bias.clone(),
        ))
        .with_context(|| format!("client {}: the initialization's gradients", i + 1))?;
        for frame in fedsb_participant::init_frames(gradients, taken) {
            let bytes = frame.encode();
            // What the aggregator receives: the decoded frame.
            let accepted = match ClientMessage::decode(&bytes)? {
                ClientMessage::InitGradient { module, gradient } => {
                    collector.gradient(p, module, gradient, bytes.len() as u64)
                }
                ClientMessage::InitDone { num_samples } => {
                    collector.finish_participant(p, num_samples).map(|_| ())
                }
                other => bail!("client {}: an initialization frame {other:?}", i + 1),
            };
            accepted.map_err(|r| {
                anyhow::anyhow!("client {}'s initialization frame rejected: {r}", i + 1)
            })?;
        }
    }
    let adapters = collector.adapters(&init_modules, args.rank(), f64::from(args.init_lr()))?;
    eprintln!(
        "federated LoRA-SB init on {} examples of {} clients ({per_client} each at most), rank {}, η {}: {:.1} s",
        collector.total_samples(),
        collector.contributors(),
        args.rank(),
        args.init_lr(),
        started.elapsed().as_secs_f64()
    );
    let mut bytes_up = collector.bytes_in();
    if args.centre_head {
        let adapter = initial_state(&adapters, &head, modules)?;
        let request = ServerMessage::CentreRequest {
            init_samples: per_client,
            batch_size: args.batch as u32,
            adapter: adapter.clone(),
        }
        .encode();
        bytes_down += request.len() as u64 * clients.len() as u64;
        let mut centring = CentreCollector::new(classes, per_client);
        let mut encoder = GpuEncoder::new(ctx, weights, Some(&adapters), Some(&head))?;
        for (i, client) in clients.iter().enumerate() {
            let message = pollster::block_on(fedsb_participant::centre_logits(
                &mut encoder,
                tokenizer,
                &adapters,
                modules,
                &client.shard,
                client.seed,
                per_client,
                args.batch as u32,
                &adapter,
            ))
            .with_context(|| format!("client {}: the logit sums for centring", i + 1))?;
            let bytes = message.encode();
            let ClientMessage::CentreLogits {
                logit_sums,
                num_samples,
            } = ClientMessage::decode(&bytes)?
            else {
                bail!(
                    "client {}: a centring answer that is not CentreLogits",
                    i + 1
                );
            };
            centring
                .add(
                    ParticipantId(i as u64 + 1),
                    &logit_sums,
                    num_samples,
                    bytes.len() as u64,
                )
                .map_err(|r| anyhow::anyhow!("client {}'s logit sums rejected: {r}", i + 1))?;
        }
        let means = centring.centre(&mut head.bias)?;
        bytes_up += centring.bytes_in();
        eprintln!("head centred over the clients' examples: the initial model's mean logits were {means:.3?}");
    }
    let traffic = InitTraffic {
        participants: collector.contributors() as u32,
        samples: collector.total_samples(),
        bytes_up,
        bytes_down,
    };
    Ok((adapters, head, traffic))
}

/// The wire state of `adapters`' R's and `head`: round 0's global model.
fn initial_state(
    adapters: &LoraSbAdapters<f32>,
    head: &ClassifierHead<f32>,
    modules: &[ModuleRef],
) -> anyhow::Result<AdapterState> {
    let initial = TrainableGradients {
        r: adapters
            .layers
            .iter()
            .map(|l| l.each_ref().map(|m| m.as_ref().map(|m| m.r.clone())))
            .collect(),
        head_weight: head.weight.clone(),
        head_bias: head.bias.clone(),
    };
    Ok(engine_to_state(&initial, modules)?)
}

/// The initial adapters (A, B, R₀) and head: from the `--init` file
/// `init_file` (its head's classes are those of `train`, [`read_data`]),
/// the federated initialization of `--federated-init` (with what it
/// exchanged), or the LoRA-SB initialization exactly as `fedsb init --seed
/// S --batch B --lr η` computes it on `--train`, with η = `--init-lr`
/// (default `--lr`).
#[allow(clippy::too_many_arguments)]
fn initial_model(
    args: &SimArgs,
    ctx: &GpuContext,
    weights: &BertWeights<f32>,
    init_file: Option<&InitFile>,
    tokenizer: &BertTokenizer,
    train: &Dataset,
    clients: &[Client],
    names: &[String],
    modules: &[ModuleRef],
    linears: &[fedsb_engine::model::AdaptedLinear],
) -> anyhow::Result<(
    LoraSbAdapters<f32>,
    ClassifierHead<f32>,
    Option<InitTraffic>,
)> {
    if let Some(n) = args.federated_init {
        let (adapters, head, traffic) = federated_initial_model(
            args, n, ctx, weights, tokenizer, train, clients, names, modules,
        )?;
        return Ok((adapters, head, Some(traffic)));
    }
    let config = &weights.config;
    let classes = train.num_labels();
    if let Some(file) = init_file {
        let path = &file.path;
        let adapters = read_adapter_file(&file.bytes, names, modules, config, args.rank())
            .with_context(|| format!("adapter file {path} (--init)"))?;
        // As the aggregator's round 0: the file's head when it has one, else zeros.
        let head = read_head(&file.bytes, classes, config.hidden_size)
            .with_context(|| format!("adapter file {path} (--init, {classes} classes)"))?
            .unwrap_or_else(|| ClassifierHead {
                weight: Matrix::zeros(classes, config.hidden_size),
                bias: vec![0.0; classes],
            });
        return Ok((adapters, head, None));
    }
    let mut head = ClassifierHead::<f32>::init(
        classes,
        config.hidden_size,
        config.initializer_range,
        args.seed ^ 0x5eed,
    );
    let (batches, taken) = init_batches(
        tokenizer,
        &train.examples,
        args.batch,
        args.seed,
        args.init_samples,
    )?;
    let mut options = LoraSbInitOptions::new(args.rank(), f64::from(args.init_lr()));
    options.modules = linears.to_vec();
    let started = Instant::now();
    let adapters = pollster::block_on(gpu_lora_sb_init(ctx, weights, &head, &batches, &options))?;
    eprintln!(
        "LoRA-SB init on {taken} training samples, rank {}, η {}: {:.1} s",
        args.rank(),
        args.init_lr(),
        started.elapsed().as_secs_f64()
    );
    if args.centre_head {
        let means = pollster::block_on(centre_head_bias(
            ctx, weights, &adapters, &mut head, &batches,
        ))?;
        eprintln!("head centred: the initial model's mean logits were {means:.3?}");
    }
    Ok((adapters, head, None))
}

/// The adapted linears: `given` (--modules), or those of the --init file,
/// or all six. A --init file's A and B are those of its own modules, so
/// --modules that name others are refused rather than read as a part of it.
fn resolve_modules(
    given: &[String],
    init: Option<&InitFile>,
    num_layers: usize,
) -> anyhow::Result<Vec<String>> {
    let Some(file) = init else {
        return Ok(if given.is_empty() {
            AdaptedLinear::ALL
                .map(|w| w.checkpoint_name().to_owned())
                .to_vec()
        } else {
            given.to_vec()
        });
    };
    let mut kinds: Vec<String> = Vec::new();
    for (_, w) in &file.info.modules {
        let name = w.checkpoint_name().to_owned();
        if !kinds.contains(&name) {
            kinds.push(name);
        }
    }
    if given.is_empty() {
        return Ok(kinds);
    }
    let (_, wanted) = layered_modules(given, num_layers)?;
    let mut wanted = wanted;
    let mut have = file.info.modules.clone();
    wanted.sort_by_key(|&(layer, w)| (layer, w.checkpoint_name()));
    have.sort_by_key(|&(layer, w)| (layer, w.checkpoint_name()));
    if wanted != have {
        bail!(
            "--modules {} are not the modules of {} (--init), which adapts {} in {} of {} layers; \
             leave --modules out",
            given.join(","),
            file.path,
            kinds.join(","),
            have.iter()
                .map(|&(layer, _)| layer)
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            num_layers
        );
    }
    Ok(given.to_vec())
}

pub fn run(mut args: SimArgs) -> anyhow::Result<()> {
    let split: Split = args.split.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    let mut inputs = training_inputs(
        &args.model,
        &args.train,
        Some(&args.eval),
        args.init.as_deref(),
    );
    // Each output is checked against the inputs and the outputs before it.
    for (flag, what, path) in [
        ("--csv", "the --csv file", &args.csv),
        ("--plot", "the --plot file", &args.plot),
        ("--output", "the --output file", &args.output),
    ] {
        if let Some(path) = path {
            check_output_file(path, flag, &inputs)?;
            inputs.push((what, path.clone()));
        }
    }
    for (flag, dir) in [
        ("--write-shards", &args.write_shards),
        ("--write-globals", &args.write_globals),
    ] {
        if let Some(dir) = dir {
            check_output_dir(dir, flag)?;
        }
    }

    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    if args.local_steps == Some(0) {
        bail!("--local-steps must be at least 1");
    }
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr must be positive");
    }
    if !(args.lr_decay > 0.0 && args.lr_decay <= 1.0) {
        bail!(
            "--lr-decay {} must be in (0, 1] (1 keeps the learning rate constant)",
            args.lr_decay
        );
    }
    if u64::from(args.lr_warmup_rounds) >= args.rounds {
        bail!(
            "--lr-warmup-rounds {} must be below --rounds {} (round {} would be the first at the full rate)",
            args.lr_warmup_rounds,
            args.rounds,
            u64::from(args.lr_warmup_rounds) + 1
        );
    }
    if let Some(h) = args.head_lr {
        if !(h > 0.0 && h.is_finite()) {
            bail!("--head-lr {h} must be positive");
        }
    }
    // η alone first, so that each refusal names the flag at fault.
    let lr_only = ServerStep {
        momentum: 0.0,
        ..args.server_step()
    };
    if let Err(e) = lr_only.check() {
        bail!("--server-lr: {e}");
    }
    if let Err(e) = args.server_step().check() {
        bail!("--server-momentum: {e}");
    }
    if let Some(eta) = args.init_lr {
        if !(eta > 0.0 && eta.is_finite()) {
            bail!("--init-lr {eta} must be positive");
        }
        if args.init.is_some() {
            bail!("--init-lr sets η of the initialization, which --init skips: give one of them");
        }
    }
    if args.federated_init == Some(0) {
        bail!("--federated-init must be at least 1 (examples per client)");
    }
    let policy = dp_policy(&args)?;
    if args.keep_moments && args.head_only {
        bail!("--keep-moments applies to the adapters' AdamW; --head-only trains the head alone");
    }
    let (weights, base_model) = load_base_model(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let config = weights.config.clone();
    let init_file = match &args.init {
        Some(path) => Some(InitFile::read(path, config.num_hidden_layers, &base_model)?),
        None => None,
    };
    let max_seq_len = match &init_file {
        Some(f) => resolve_file_max_seq_len(args.max_seq_len, &f.info.metadata, &f.path, &config)?,
        None => resolve_max_seq_len(args.max_seq_len, &config)?,
    };
    // What the shards' manifest and the simulated task announce.
    args.max_seq_len = Some(max_seq_len);
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"))?
        .with_max_length(max_seq_len)?;
    if let Some(file) = &init_file {
        match args.rank {
            Some(r) if r != file.info.rank => bail!(
                "--rank {r} does not match the rank {} of {} (--init); leave --rank out",
                file.info.rank,
                file.path
            ),
            _ => args.rank = Some(file.info.rank),
        }
    }
    args.modules = resolve_modules(&args.modules, init_file.as_ref(), config.num_hidden_layers)?;
    let (train, eval_examples) = read_data(&args, init_file.as_ref())?;

    let labels: Vec<u32> = train
        .examples
        .iter()
        .map(|e| e.label.context("an unlabelled training example"))
        .collect::<anyhow::Result<_>>()?;
    let shards = match split {
        Split::Iid => split_iid(train.len(), args.clients, args.seed)?,
        Split::Dirichlet(alpha) => {
            split_dirichlet(&labels, train.num_labels(), args.clients, alpha, args.seed)?
        }
    };
    let local_steps = args.local_steps.unwrap_or_else(|| {
        let avg = train.len().div_ceil(args.clients);
        avg.div_ceil(args.batch).max(1) as u32
    });
    let opt = AdamW {
        lr: args.lr,
        head_lr_scale: args.head_lr() / args.lr,
        weight_decay: 0.01,
        ..AdamW::default()
    };
    let mut clients: Vec<Client> = shards
        .iter()
        .enumerate()
        .map(|(i, idx)| {
            let seed = client_seed(args.seed, i);
            Client {
                shard: idx.iter().map(|&j| train.examples[j].clone()).collect(),
                sampler: BatchSampler::new(idx.len(), args.batch, seed),
                seed,
                dp: None,
                opt: LocalOptimizer::new(opt, args.keep_moments),
            }
        })
        .collect();
    if let Some(policy) = &policy {
        let planned = args.rounds * u64::from(local_steps);
        for (i, client) in clients.iter_mut().enumerate() {
            let dp = DpTraining::calibrate(
                policy,
                client.shard.len(),
                args.batch,
                planned,
                AccountantKind::from(args.accountant),
            )
            .with_context(|| format!("client {}", i + 1))?;
            client.dp = Some(dp);
        }
        let sigmas: Vec<f64> = clients
            .iter()
            .filter_map(|c| c.dp.as_ref().map(|d| d.config.noise_multiplier))
            .collect();
        eprintln!(
            "differential privacy: ε = {}, δ = {}, C = {} over {planned} steps per client; σ per client {:?}",
            policy.epsilon,
            policy.delta,
            policy.clip_norm,
            sigmas.iter().map(|s| format!("{s:.4}")).collect::<Vec<_>>()
        );
    }
    eprintln!(
        "train: {} examples ({} classes {:?}) split {} over {} clients: sizes {:?}; eval: {} examples; {local_steps} local steps of {} per round",
        train.len(),
        train.num_labels(),
        train.label_names,
        args.split,
        args.clients,
        clients.iter().map(|c| c.shard.len()).collect::<Vec<_>>(),
        eval_examples.len(),
        args.batch,
    );

    // The aggregator's order: layer by layer, then the modules as listed.
    let (names, modules) = layered_modules(&args.modules, config.num_hidden_layers)?;
    // The linears of one layer, in the listed order.
    let linears: Vec<_> = modules
        .iter()
        .take(args.modules.len())
        .map(|&(_, which)| which)
        .collect();
    let shape = AdapterShape {
        rank: args.rank() as u32,
        modules: modules.len() as u32,
        head_classes: train.num_labels() as u32,
        head_hidden: config.hidden_size as u32,
    };
    // The simulation sends real frames: refuse before any training what
    // the protocol could not carry.
    if let Some(e) = shape.frame_limit_error() {
        bail!("{e}; lower --rank or adapt fewer --modules");
    }

    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: args.adapter.as_deref(),
    }))?;
    eprintln!("adapter: {}", ctx.adapter_name());
    let (frozen, head0, init_traffic) = initial_model(
        &args,
        &ctx,
        &weights,
        init_file.as_ref(),
        &tokenizer,
        &train,
        &clients,
        &names,
        &modules,
        &linears,
    )?;
    if let Some(dir) = &args.write_shards {
        let adapter_file = match &args.init {
            Some(path) => path.display().to_string(),
            None => {
                // The initial model as the adapter file `fedsb init` writes
                // (with --centre-head, its head centred), for the task.
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let mut metadata = adapter_metadata(&args, &train, &base_model)?;
                let init_samples = match &init_traffic {
                    Some(t) => t.samples,
                    None => args.init_samples.min(train.len()) as u64,
                };
                metadata.extend([
                    ("init_samples".to_owned(), init_samples.to_string()),
                    ("learning_rate".to_owned(), args.init_lr().to_string()),
                    ("seed".to_owned(), args.seed.to_string()),
                    (
                        "written_by".to_owned(),
                        "fedsb sim --write-shards".to_owned(),
                    ),
                ]);
                if args.centre_head {
                    metadata.insert("centre_head".to_owned(), "true".to_owned());
                }
                if let Some(t) = &init_traffic {
                    metadata.insert("init".to_owned(), "federated".to_owned());
                    metadata.insert("participants".to_owned(), t.participants.to_string());
                }
                let path = dir.join(INIT_FILE);
                write_adapter_file(&path, &names, &modules, &frozen, &head0, metadata)?;
                INIT_FILE.to_owned()
            }
        };
        write_shards(
            dir,
            &train,
            &clients,
            &args,
            &args.split,
            local_steps,
            &adapter_file,
        )?;
        eprintln!("wrote the shards into {}", dir.display());
    }
    let mut global = initial_state(&frozen, &head0, &modules)?;
    // The global model before `global` (x_{t−2} of the server's momentum).
    let mut before: Option<AdapterState> = None;
    global
        .validate(&shape)
        .map_err(|e| anyhow::anyhow!("initial state: {e}"))?;
    let mut global_frame = ServerMessage::GlobalModel {
        round: RoundId(0),
        participants: 0,
        total_samples: 0,
        adapter: global.clone(),
    }
    .encode();
    let mut encoder = GpuEncoder::new(&ctx, &weights, Some(&frozen), Some(&head0))?;
    if let Some(dir) = &args.write_globals {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("round-0.bin"), &global_frame)?;
    }

    let total_steps = args.rounds * args.clients as u64 * u64::from(local_steps);
    let bar = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} steps ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let report = |bar: &ProgressBar, row: &RoundRow| {
        if args.json {
            bar.suspend(|| {
                println!(
                    "{}",
                    serde_json::to_string(row).expect("a row serializes to JSON")
                )
            });
        } else {
            // A hidden bar (stderr is not a terminal) drops println's text.
            let line = |s: String| {
                if bar.is_hidden() {
                    eprintln!("{s}");
                } else {
                    bar.println(s);
                }
            };
            line(format!(
                "round {}: eval accuracy {:.4}, eval loss {:.4}, {} participants, {} samples, {} bytes up, {} bytes down, {:.1} s",
                row.round,
                row.eval_accuracy,
                row.eval_loss,
                row.participants,
                row.samples,
                row.bytes_up,
                row.bytes_down,
                row.seconds
            ));
        }
    };

    // Round 0: the initial global state, evaluated.
    let started = Instant::now();
    bar.set_message("evaluating round 0");
    let e0 = pollster::block_on(evaluate(
        &mut encoder,
        &tokenizer,
        &eval_examples,
        args.batch,
    ))?;
    let mut rows = vec![RoundRow {
        round: 0,
        eval_accuracy: e0.accuracy,
        eval_loss: e0.loss,
        train_loss: None,
        participants: init_traffic.map_or(0, |t| t.participants),
        samples: init_traffic.map_or(0, |t| t.samples),
        bytes_up: init_traffic.map_or(0, |t| t.bytes_up),
        bytes_down: init_traffic.map_or(0, |t| t.bytes_down),
        seconds: started.elapsed().as_secs_f64(),
        epsilon_spent: policy.as_ref().map(|_| 0.0),
        learning_rate: None,
        eval_confusion: e0.confusion,
    }];
    // The CSV and the plot hold every round so far, so a run stopped early
    // keeps them; written before the round is reported.
    write_progress(&args, &rows)?;
    report(&bar, &rows[0]);

    for n in 1..=args.rounds {
        let started = Instant::now();
        let id = RoundId(n);
        let mut round = Round::new(
            id,
            shape,
            Weighting::Samples,
            args.clients as u32,
            u64::from(local_steps) * args.batch as u64,
            now_unix_ms(),
        );
        let bytes_down = global_frame.len() as u64 * args.clients as u64;
        let (adapters, head) = state_to_engine(&frozen, &modules, &global)?;
        let mut bytes_up = 0u64;
        let mut epsilon_spent: Option<f64> = None;
        let lr = round_learning_rate(args.lr, args.lr_decay, args.lr_warmup_rounds, n);
        for (i, client) in clients.iter_mut().enumerate() {
            bar.set_message(format!("round {n}, client {}", i + 1));
            client.opt.set_learning_rate(lr)?;
            let update = if let Some(dp) = client.dp.as_mut() {
                let check = dp.check(u64::from(local_steps))?;
                if !check.within_budget {
                    bail!(
                        "client {}: {}",
                        i + 1,
                        dp.exhausted_message(&check, id, local_steps)
                    );
                }
                let (local, report, _) = pollster::block_on(fedsb_participant::train_round_dp(
                    &mut encoder,
                    &tokenizer,
                    &frozen,
                    &modules,
                    &client.shard,
                    dp,
                    &global,
                    local_steps,
                    &mut client.opt,
                    id,
                ))
                .with_context(|| format!("round {n}, client {}", i + 1))?;
                bar.inc(u64::from(local_steps));
                epsilon_spent = Some(epsilon_spent.unwrap_or(0.0).max(report.epsilon_spent));
                local.into_update(id, Some(report))
            } else if args.head_only {
                train_head_only_round(
                    &mut encoder,
                    &tokenizer,
                    client,
                    &adapters,
                    &head,
                    &modules,
                    id,
                    local_steps,
                    &bar,
                )
                .with_context(|| format!("round {n}, client {}", i + 1))?
            } else {
                // The round exactly as `fedsb join` and a browser tab train it.
                let local = pollster::block_on(fedsb_participant::train_round(
                    &mut encoder,
                    &tokenizer,
                    &frozen,
                    &modules,
                    &client.shard,
                    &mut client.sampler,
                    &global,
                    local_steps,
                    &mut client.opt,
                    id,
                ))
                .with_context(|| format!("round {n}, client {}", i + 1))?;
                bar.inc(u64::from(local_steps));
                local.into_update(id, None)
            };
            let frame = ClientMessage::Update(update).encode();
            bytes_up += frame.len() as u64;
            // What the aggregator receives: the decoded frame.
            let ClientMessage::Update(update) = ClientMessage::decode(&frame)? else {
                unreachable!("an Update frame decodes to an Update");
            };
            if let Some(policy) = &policy {
                check_report_against_policy(update.privacy.as_ref(), policy).map_err(|r| {
                    anyhow::anyhow!("round {n}: client {}'s update rejected: {r}", i + 1)
                })?;
            }
            round
                .accept(
                    ParticipantId(i as u64 + 1),
                    "fedsb-sim",
                    update,
                    frame.len() as u64,
                    now_unix_ms(),
                )
                .map_err(|r| {
                    anyhow::anyhow!("round {n}: client {}'s update rejected: {r}", i + 1)
                })?;
        }
        let (state, contributions) = round
            .aggregate_step(args.server_step(), &global, before.as_ref())
            .context("a round without accepted updates")?;
        let total_samples: u64 = contributions.iter().map(|c| c.num_samples).sum();
        let loss_weight: f64 = contributions.iter().map(|c| c.num_samples as f64).sum();
        let train_loss = contributions
            .iter()
            .filter_map(|c| c.train_loss.map(|l| f64::from(l) * c.num_samples as f64))
            .sum::<f64>()
            / loss_weight;
        global_frame = ServerMessage::GlobalModel {
            round: id,
            participants: contributions.len() as u32,
            total_samples,
            adapter: state.clone(),
        }
        .encode();
        if let Some(dir) = &args.write_globals {
            std::fs::write(dir.join(format!("round-{n}.bin")), &global_frame)?;
        }
        before = Some(std::mem::replace(&mut global, state));
        bar.set_message(format!("evaluating round {n}"));
        let (adapters, head) = state_to_engine(&frozen, &modules, &global)?;
        encoder.set_trainable(&adapters, &head)?;
        let e = pollster::block_on(evaluate(
            &mut encoder,
            &tokenizer,
            &eval_examples,
            args.batch,
        ))?;
        let row = RoundRow {
            round: n,
            eval_accuracy: e.accuracy,
            eval_loss: e.loss,
            train_loss: Some(train_loss),
            participants: contributions.len() as u32,
            samples: total_samples,
            bytes_up,
            bytes_down,
            seconds: started.elapsed().as_secs_f64(),
            epsilon_spent,
            learning_rate: Some(lr),
            eval_confusion: e.confusion,
        };
        rows.push(row);
        write_progress(&args, &rows)?;
        report(&bar, &rows[rows.len() - 1]);
    }
    bar.finish_and_clear();

    let table = summary_table(&rows);
    if args.json {
        eprint!("{table}");
    } else {
        print!("{table}");
    }
    if let Some(path) = &args.output {
        let (adapters, head) = state_to_engine(&frozen, &modules, &global)?;
        let mut metadata = adapter_metadata(&args, &train, &base_model)?;
        metadata.extend([
            ("round".to_owned(), args.rounds.to_string()),
            ("clients".to_owned(), args.clients.to_string()),
            ("split".to_owned(), args.split.clone()),
            ("local_steps".to_owned(), local_steps.to_string()),
            ("learning_rate".to_owned(), args.lr.to_string()),
            ("head_learning_rate".to_owned(), args.head_lr().to_string()),
            ("lr_decay".to_owned(), args.lr_decay.to_string()),
            (
                "lr_warmup_rounds".to_owned(),
                args.lr_warmup_rounds.to_string(),
            ),
            (
                "server_learning_rate".to_owned(),
                args.server_lr.to_string(),
            ),
            (
                "server_momentum".to_owned(),
                args.server_momentum.to_string(),
            ),
            ("seed".to_owned(), args.seed.to_string()),
            ("trained_by".to_owned(), "fedsb sim".to_owned()),
        ]);
        if args.init.is_none() {
            metadata.insert("init_learning_rate".to_owned(), args.init_lr().to_string());
        }
        if let Some(n) = args.federated_init {
            metadata.insert("init".to_owned(), "federated".to_owned());
            metadata.insert("federated_init_samples".to_owned(), n.to_string());
        }
        if args.centre_head {
            metadata.insert("centre_head".to_owned(), "true".to_owned());
        }
        if let Some(e) = rows.last().and_then(|r| r.epsilon_spent) {
            metadata.insert("dp_epsilon".to_owned(), e.to_string());
            metadata.insert("dp_delta".to_owned(), args.dp_delta.to_string());
        }
        write_adapter_file(path, &names, &modules, &adapters, &head, metadata)?;
        eprintln!("wrote the final global model to {}", path.display());
    }
    Ok(())
}

/// The metadata every adapter file the simulator writes starts with: its
/// format, rank, adapted linears, class names, sequence length and base
/// model.
fn adapter_metadata(
    args: &SimArgs,
    train: &Dataset,
    base_model: &BaseModel,
) -> anyhow::Result<HashMap<String, String>> {
    Ok(HashMap::from([
        ("format".to_owned(), "fedsb-lora-sb".to_owned()),
        ("rank".to_owned(), args.rank().to_string()),
        ("modules".to_owned(), args.modules.join(",")),
        (
            "labels".to_owned(),
            serde_json::to_string(&train.label_names)?,
        ),
        (MAX_SEQ_LEN.to_owned(), args.seq_len().to_string()),
        base_model.metadata_entry(),
    ]))
}

/// The task's privacy policy from --dp-epsilon, --dp-delta and --clip, or
/// None without DP; the combinations that cannot work are refused.
fn dp_policy(args: &SimArgs) -> anyhow::Result<Option<PrivacyPolicy>> {
    let (epsilon, clip_norm) = match (args.dp_epsilon, args.clip) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            bail!("differential privacy needs --clip C (the per-sample clipping norm)")
        }
        (None, Some(_)) => bail!("--clip needs --dp-epsilon E (differential privacy)"),
        (Some(e), Some(c)) => (e, c),
    };
    let policy = PrivacyPolicy {
        epsilon,
        delta: args.dp_delta,
        clip_norm,
    };
    if let Err((field, value)) = policy.check() {
        let flag = match field {
            PolicyField::Epsilon => "--dp-epsilon",
            PolicyField::Delta => "--dp-delta",
            PolicyField::ClipNorm => "--clip",
        };
        bail!("{flag} must be {}, got {value}", field.expected());
    }
    if args.head_only {
        bail!("--head-only trains without DP-SGD; it cannot be combined with --dp-epsilon");
    }
    if args.init.is_none() {
        bail!(
            "with differential privacy the LoRA-SB initialization must not read the private \
             training data (DP-SGD does not cover it): make an adapter file from public seed \
             data with `fedsb init` and give it with --init"
        );
    }
    Ok(Some(policy))
}

/// The `--head-only` baseline's local round: from the global `adapters`
/// and `head`, `local_steps` AdamW steps (on the CPU, [`HeadAdam`]) on the
/// head alone, every R kept, on batches of the client's sampler.
#[allow(clippy::too_many_arguments)]
fn train_head_only_round(
    encoder: &mut GpuEncoder<'_>,
    tokenizer: &BertTokenizer,
    client: &mut Client,
    adapters: &LoraSbAdapters<f32>,
    head: &ClassifierHead<f32>,
    modules: &[ModuleRef],
    round: RoundId,
    local_steps: u32,
    bar: &ProgressBar,
) -> anyhow::Result<ClientUpdate> {
    encoder.set_trainable(adapters, head)?;
    let opt = client.opt.adamw;
    let mut adam = HeadAdam::new(head.weight.data.len() + head.bias.len());
    let mut params = [head.weight.data.clone(), head.bias.clone()].concat();
    let mut samples = 0u64;
    let mut loss_sum = 0f64;
    for step in 1..=local_steps {
        let idx = client.sampler.next_batch();
        let refs: Vec<&Example> = idx.iter().map(|&j| &client.shard[j]).collect();
        let (batch, batch_labels) = encode_examples(tokenizer, &refs)?;
        let losses = pollster::block_on(encoder.loss_and_gradients(
            &batch,
            &batch_labels,
            GradientMode::BatchMean,
        ))?;
        let g = pollster::block_on(encoder.read_gradients())?;
        let grads = [g.head_weight.data, g.head_bias].concat();
        adam.step(&opt, &mut params, &grads);
        let hw = head.weight.data.len();
        let new_head = ClassifierHead {
            weight: Matrix::from_vec(head.weight.rows, head.weight.cols, params[..hw].to_vec()),
            bias: params[hw..].to_vec(),
        };
        encoder.set_trainable(adapters, &new_head)?;
        let loss = losses.iter().sum::<f32>() / losses.len() as f32;
        if !loss.is_finite() {
            bail!("training diverged at step {step} (loss {loss})");
        }
        samples += idx.len() as u64;
        loss_sum += f64::from(loss) * idx.len() as f64;
        bar.inc(1);
    }
    let trained = pollster::block_on(encoder.read_trainable())?;
    Ok(ClientUpdate {
        round,
        num_samples: samples,
        train_loss: Some((loss_sum / samples.max(1) as f64) as f32),
        privacy: None,
        adapter: engine_to_state(&trained, modules)?,
    })
}

fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn summary_table(rows: &[RoundRow]) -> String {
    let dp = rows.iter().any(|r| r.epsilon_spent.is_some());
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>5}  {:>8}  {:>9}  {:>10}  {:>5}  {:>8}  {:>10}  {:>10}  {:>8}{}",
        "round",
        "accuracy",
        "eval loss",
        "train loss",
        "parts",
        "samples",
        "bytes up",
        "bytes down",
        "seconds",
        if dp { "  ε spent" } else { "" }
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{:>5}  {:>8.4}  {:>9.4}  {:>10}  {:>5}  {:>8}  {:>10}  {:>10}  {:>8.1}{}",
            r.round,
            r.eval_accuracy,
            r.eval_loss,
            r.train_loss.map_or("-".to_owned(), |l| format!("{l:.4}")),
            r.participants,
            r.samples,
            r.bytes_up,
            r.bytes_down,
            r.seconds,
            r.epsilon_spent
                .map_or(String::new(), |e| format!("  {e:>7.4}"))
        );
    }
    let up: u64 = rows.iter().map(|r| r.bytes_up).sum();
    let down: u64 = rows.iter().map(|r| r.bytes_down).sum();
    let _ = writeln!(s, "total: {up} bytes up, {down} bytes down");
    s
}

impl RoundRow {
    /// The columns of `--csv`: every field of the JSON line but the
    /// confusion matrix, in the JSON line's order.
    const CSV_COLUMNS: [&'static str; 11] = [
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
    ];

    /// The row's [`Self::CSV_COLUMNS`]; a missing value is empty.
    fn csv_cells(&self) -> [String; 11] {
        fn optional(v: Option<impl ToString>) -> String {
            v.map_or(String::new(), |v| v.to_string())
        }
        [
            self.round.to_string(),
            self.eval_accuracy.to_string(),
            self.eval_loss.to_string(),
            optional(self.train_loss),
            self.participants.to_string(),
            self.samples.to_string(),
            self.bytes_up.to_string(),
            self.bytes_down.to_string(),
            self.seconds.to_string(),
            optional(self.epsilon_spent),
            optional(self.learning_rate),
        ]
    }
}

/// `--csv` and `--plot` with the rounds so far (each replaced whole).
fn write_progress(args: &SimArgs, rows: &[RoundRow]) -> anyhow::Result<()> {
    if let Some(path) = &args.csv {
        write_csv(path, rows)?;
    }
    if let Some(path) = &args.plot {
        draw_plot(path, rows, args.rounds)?;
    }
    Ok(())
}

fn write_csv(path: &Path, rows: &[RoundRow]) -> anyhow::Result<()> {
    let mut s = RoundRow::CSV_COLUMNS.join(",");
    s.push('\n');
    for r in rows {
        let _ = writeln!(s, "{}", r.csv_cells().join(","));
    }
    // Replaced whole after each round: a reader never sees half a row.
    write_file_atomically(path, s.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Accuracy per round as a PNG, 800×500: the y axis spans 0–1 with a grid
/// line every 0.1 (darker at 0.5), the x axis rounds 0…`rounds` (the whole
/// run, so a plot drawn part way shows how far it is) with a tick per
/// round; the curve is blue with a dot per round so far. There is no text
/// (the plotting crate is built without a font backend so that it needs no
/// system fonts); the CSV has the numbers. Drawn in memory, encoded and
/// written atomically, so a viewer never finds half a picture.
fn draw_plot(path: &Path, rows: &[RoundRow], rounds: u64) -> anyhow::Result<()> {
    const SIZE: (u32, u32) = (800, 500);
    let mut rgb = vec![0u8; SIZE.0 as usize * SIZE.1 as usize * 3];
    draw_accuracy(&mut rgb, SIZE, rows, rounds)
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    let mut png_bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut png_bytes, SIZE.0, SIZE.1);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let writer = encoder
            .write_header()
            .and_then(|mut w| w.write_image_data(&rgb).map(|()| w))
            .with_context(|| format!("encoding {}", path.display()))?;
        writer
            .finish()
            .with_context(|| format!("encoding {}", path.display()))?;
    }
    write_file_atomically(path, &png_bytes).with_context(|| format!("writing {}", path.display()))
}

/// [`draw_plot`]'s picture into an RGB buffer of `size`.
fn draw_accuracy(
    rgb: &mut [u8],
    size: (u32, u32),
    rows: &[RoundRow],
    rounds: u64,
) -> Result<(), String> {
    use plotters::prelude::*;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let area = root.margin(20, 20, 20, 20);
    let last = rows.last().map_or(rounds, |r| r.round.max(rounds)).max(1) as f64;
    let mut chart = ChartBuilder::on(&area)
        .build_cartesian_2d(0f64..last, 0f64..1f64)
        .map_err(|e| err(&e))?;
    for i in 0..=10 {
        let y = f64::from(i) / 10.0;
        let color = if i == 5 {
            RGBColor(150, 150, 150)
        } else {
            RGBColor(220, 220, 220)
        };
        chart
            .draw_series(LineSeries::new([(0.0, y), (last, y)], color))
            .map_err(|e| err(&e))?;
    }
    for r in 0..=last as u64 {
        let x = r as f64;
        chart
            .draw_series(LineSeries::new([(x, 0.0), (x, 0.02)], BLACK))
            .map_err(|e| err(&e))?;
    }
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (last, 0.0)], BLACK))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(LineSeries::new([(0.0, 0.0), (0.0, 1.0)], BLACK))
        .map_err(|e| err(&e))?;
    let points: Vec<(f64, f64)> = rows
        .iter()
        .map(|r| (r.round as f64, r.eval_accuracy))
        .collect();
    chart
        .draw_series(LineSeries::new(points.clone(), BLUE.stroke_width(2)))
        .map_err(|e| err(&e))?;
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_parses_and_bad_ones_are_refused() {
        assert_eq!("iid".parse::<Split>(), Ok(Split::Iid));
        assert_eq!("dirichlet:0.5".parse::<Split>(), Ok(Split::Dirichlet(0.5)));
        assert!("dirichlet:0"
            .parse::<Split>()
            .unwrap_err()
            .contains("positive"));
        assert!("dirichlet:-1".parse::<Split>().is_err());
        assert!("dirichlet:x".parse::<Split>().is_err());
        assert!("shards".parse::<Split>().unwrap_err().contains("unknown"));
    }

    #[test]
    fn iid_split_is_a_seeded_partition_of_equal_shards() {
        let s = split_iid(10, 3, 7).unwrap();
        assert_eq!(s.iter().map(Vec::len).collect::<Vec<_>>(), [4, 3, 3]);
        let mut all: Vec<usize> = s.concat();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        assert_eq!(s, split_iid(10, 3, 7).unwrap());
        assert_ne!(s, split_iid(10, 3, 8).unwrap());
        assert!(split_iid(2, 3, 0)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        assert!(split_iid(2, 0, 0).is_err());
    }

    #[test]
    fn dirichlet_split_is_a_seeded_partition_with_no_empty_client() {
        let labels: Vec<u32> = (0..200).map(|i| u32::from(i % 4 == 0)).collect();
        for alpha in [0.01, 0.1, 1.0, 100.0] {
            for clients in [1, 3, 7] {
                let s = split_dirichlet(&labels, 2, clients, alpha, 3).unwrap();
                assert_eq!(s.len(), clients);
                assert!(s.iter().all(|c| !c.is_empty()), "{alpha} {clients}");
                let mut all: Vec<usize> = s.concat();
                all.sort_unstable();
                assert_eq!(all, (0..200).collect::<Vec<_>>());
                assert_eq!(s, split_dirichlet(&labels, 2, clients, alpha, 3).unwrap());
            }
        }
        // Small alpha skews labels: some client is far from the 25% positive share.
        let s = split_dirichlet(&labels, 2, 5, 0.05, 1).unwrap();
        let skew = s
            .iter()
            .map(|c| {
                let pos = c.iter().filter(|&&i| labels[i] == 1).count() as f64;
                (pos / c.len() as f64 - 0.25).abs()
            })
            .fold(0.0, f64::max);
        assert!(skew > 0.3, "skew {skew}");
        // Large alpha is close to IID.
        let s = split_dirichlet(&labels, 2, 4, 1000.0, 1).unwrap();
        for c in &s {
            assert!((c.len() as i64 - 50).abs() <= 5, "{}", c.len());
        }
        // Every client gets one even when there are as many clients as examples.
        let s = split_dirichlet(&labels[..5], 2, 5, 0.01, 2).unwrap();
        assert!(s.iter().all(|c| c.len() == 1));
        assert!(split_dirichlet(&labels, 2, 3, 0.0, 0).is_err());
        assert!(split_dirichlet(&labels[..2], 2, 3, 1.0, 0).is_err());
    }

    /// The CSV's columns are the JSON line's fields but the confusion
    /// matrix, in its order, and a row's cells are its values.
    #[test]
    fn the_csv_has_the_json_lines_scalar_fields_in_order() {
        let row = RoundRow {
            round: 2,
            eval_accuracy: 0.75,
            eval_loss: 0.5,
            train_loss: Some(0.625),
            participants: 3,
            samples: 96,
            bytes_up: 1000,
            bytes_down: 2000,
            seconds: 1.5,
            epsilon_spent: None,
            learning_rate: Some(0.01),
            eval_confusion: vec![vec![1, 0], vec![0, 1]],
        };
        let json = serde_json::to_string(&row).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut scalars: Vec<&str> = value
            .as_object()
            .unwrap()
            .iter()
            .filter(|(_, v)| !v.is_array())
            .map(|(k, _)| k.as_str())
            .collect();
        let mut columns = RoundRow::CSV_COLUMNS.to_vec();
        scalars.sort_unstable();
        columns.sort_unstable();
        assert_eq!(columns, scalars);
        // The JSON text has its fields in the struct's order.
        let at: Vec<usize> = RoundRow::CSV_COLUMNS
            .iter()
            .map(|c| json.find(&format!("\"{c}\":")).unwrap())
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{json}");
        for (column, cell) in RoundRow::CSV_COLUMNS.iter().zip(row.csv_cells()) {
            match &value[*column] {
                serde_json::Value::Null => assert_eq!(cell, "", "{column}"),
                v => assert_eq!(cell.parse::<f64>().ok(), v.as_f64(), "{column}"),
            }
        }
    }

    #[test]
    fn gamma_draws_have_the_right_mean() {
        let mut rng = Rng(5);
        for shape in [0.3, 1.0, 4.0] {
            let n = 20_000;
            let mean = (0..n).map(|_| rng.gamma(shape)).sum::<f64>() / n as f64;
            assert!(
                (mean - shape).abs() < 0.05 * shape.max(1.0),
                "{shape}: {mean}"
            );
        }
    }
}
