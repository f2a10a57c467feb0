//! `fedsb train`: centralized LoRA-SB fine-tuning on the GPU, the baseline the
//! federated runs are compared with.
//!
//! ```text
//! fedsb train --model models/all-MiniLM-L6-v2 --train data/sst2/train.tsv \
//!     --eval data/sst2/dev.tsv --rank 32 --steps 200
//! ```
//!
//! 1. LoRA-SB initialization on `--init-samples` training examples (GPU
//!    backward to every adapted `W0`, sign, truncated SVD on the CPU);
//! 2. `--steps` AdamW steps (weight decay 0.01) on every `R` and the head, on
//!    shuffled batches of `--batch`;
//! 3. evaluation every `--eval-every` steps and at the end.
//!
//! With differential privacy (`--clip C` and either `--dp-epsilon E` or
//! `--noise-multiplier S`), step 2 is DP-SGD instead: Poisson sampling at
//! `q = batch / N`, per-sample gradients clipped jointly to `C`, Gaussian
//! noise `N(0, σ²C²)`, divided by `q·N`, AdamW. With `--dp-epsilon` σ is
//! calibrated so that `--steps` steps spend at most ε at `--dp-delta`. The
//! LoRA-SB initialization reads gradients of its examples, which DP-SGD does
//! not cover, so with DP it needs public seed data (`--init-data`).
//!
//! `--init FILE` skips step 1 and starts from an adapter file instead
//! (`fedsb init`, `fedsb export`, `fedsb train --output`): its `A`, `B`, `R`
//! and head. `fedsb export --round 0` of a federated task gives the
//! federation's initial model, so centralized training can start where the
//! federation started (BENCHMARKS.md, "Centralized training from the
//! federated initialization").
//!
//! `--output FILE` writes the trained adapter in the layout `fedsb init` writes
//! (`lora_A`, `lora_B`, `lora_R` per module, `classifier.*`), recording the
//! base model (`base_model_sha256`) as it does and the `max_seq_len` it
//! trained at (which `fedsb eval` then uses); an `--init` file that
//! records another base model than `--model` is refused.
//!
//! Progress goes to stderr; the last line on stdout is one JSON object with
//! `eval_accuracy`, `eval_loss`, `steps`, `samples_per_second` and `adapter`,
//! and with DP `epsilon`, `delta`, `noise_multiplier`, `sample_rate`,
//! `clip_norm` and `accountant`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::{read_dataset_file, Dataset, Example};
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::AdaptedLinear;
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::{ClassifierHead, LoraSbAdapters, LoraSbInitOptions};
use fedsb_engine::train::{
    centre_head_bias, encode_examples, evaluate, gpu_lora_sb_init, init_batches, BatchSampler,
};
use fedsb_privacy::{AccountantKind, PrivacyBudget};
use fedsb_protocol::PrivacyPolicy;

use crate::checks::{
    check_classes, check_output_file, load_base_model, resolve_file_max_seq_len,
    resolve_max_seq_len, training_inputs, InitFile, DEFAULT_RANK,
};
use crate::data_args::{
    head_classes, read_eval_set, read_training_set, same_columns_as, DataColumns,
};
use crate::dp_training::{train_steps_dp, DpTraining};
use crate::participant::{layered_modules, write_adapter_file, ModuleRef, MAX_SEQ_LEN};
use crate::privacy_cmd::AccountantArg;

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Training data (.csv, .tsv or .jsonl).
    #[arg(long)]
    train: PathBuf,
    /// Evaluation data (same columns as --train).
    #[arg(long)]
    eval: PathBuf,
    #[command(flatten)]
    columns: DataColumns,
    /// LoRA-SB rank r [default: 32, or the rank of the --init file].
    #[arg(long)]
    rank: Option<usize>,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// AdamW learning rate of the classification head (default: --lr).
    #[arg(long)]
    head_lr: Option<f64>,
    /// η of the LoRA-SB initialization, ΔW = −η·sign(G), which scales R₀
    /// (default: --lr). Set it to vary the learning rate from the same
    /// initialization.
    #[arg(long)]
    init_lr: Option<f64>,
    /// Training samples whose gradients initialize A, B and R.
    #[arg(long, default_value_t = 256)]
    init_samples: usize,
    /// Centre the initial head: after the LoRA-SB initialization, shift the
    /// head's bias so that every class has the same mean logit over the
    /// initialization's samples under the initial model (the LoRA-SB step
    /// otherwise tilts every sentence towards one class; BENCHMARKS.md).
    #[arg(long)]
    centre_head: bool,
    /// Truncate sequences to this many tokens (special tokens included).
    /// [default: the --init file's max_seq_len metadata; without it 128, or
    /// the model's max_position_embeddings if fewer]
    #[arg(long, value_name = "N")]
    max_seq_len: Option<usize>,
    /// Evaluate every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    eval_every: usize,
    /// Evaluate on the first N evaluation examples only (0: all).
    #[arg(long, default_value_t = 0)]
    eval_limit: usize,
    /// Print the training loss every N steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
    /// Seed of the head initialization and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use the GPU adapter whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
    /// Also print every evaluation as a JSON line on stdout.
    #[arg(long)]
    json: bool,
    /// Write the trained adapter (A, B, R per module and the head) to this
    /// safetensors file, in the layout of `fedsb init`.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Also write the adapter after every N steps before the last, next to
    /// --output as `<its name>.step-<n>.safetensors` (`fedsb average`
    /// averages such checkpoints).
    #[arg(long, value_name = "N", requires = "output")]
    checkpoint_every: Option<usize>,
    /// Differential privacy: train with DP-SGD and calibrate σ so that
    /// --steps steps spend at most this ε (needs --clip).
    #[arg(long, conflicts_with = "noise_multiplier")]
    dp_epsilon: Option<f64>,
    /// δ of the DP guarantee.
    #[arg(long, default_value_t = 1e-5)]
    dp_delta: f64,
    /// Differential privacy: per-sample clipping norm C (joint L2 norm over
    /// every R and the head).
    #[arg(long)]
    clip: Option<f64>,
    /// Differential privacy with this noise multiplier σ instead of a target ε
    /// (needs --clip); the ε it spends is reported.
    #[arg(long)]
    noise_multiplier: Option<f64>,
    /// Privacy accountant for calibration and the ε reported.
    #[arg(long, value_enum, default_value_t = AccountantArg::Pld)]
    accountant: AccountantArg,
    /// Public seed data for the LoRA-SB initialization (default: --train,
    /// which is refused with differential privacy).
    #[arg(long)]
    init_data: Option<PathBuf>,
    /// Start from this adapter file (A, B, R of every adapted module and the
    /// head, from `fedsb init`, `fedsb export` or `fedsb train --output`)
    /// instead of a LoRA-SB initialization, as `fedsb sim --init` does. Its
    /// head's classes are its `labels` metadata, in order, when it has one.
    /// `fedsb export --round 0` gives a task's initial model.
    #[arg(long, value_name = "ADAPTER_FILE", conflicts_with_all = ["init_lr", "init_samples", "init_data", "centre_head"])]
    init: Option<PathBuf>,
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if args.rank == Some(0) {
        bail!("--rank must be at least 1");
    }
    if args.init.is_none() && args.init_samples == 0 {
        bail!("--init-samples must be at least 1 (examples for the LoRA-SB initialization)");
    }
    if let Some(out) = &args.output {
        let inputs = training_inputs(
            &args.model,
            &args.train,
            Some(&args.eval),
            args.init.as_deref(),
        );
        check_output_file(out, "--output", &inputs)?;
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr {} must be positive", args.lr);
    }
    let init_lr = args.init_lr.unwrap_or(args.lr);
    if !(init_lr > 0.0 && init_lr.is_finite()) {
        bail!("--init-lr {init_lr} must be positive");
    }
    let head_lr = args.head_lr.unwrap_or(args.lr);
    if !(head_lr > 0.0 && head_lr.is_finite()) {
        bail!("--head-lr {head_lr} must be positive");
    }
    let checkpoint_every = args.checkpoint_every;
    if checkpoint_every == Some(0) {
        bail!("--checkpoint-every must be at least 1 (steps)");
    }
    let dp_wanted = args.dp_epsilon.is_some() || args.noise_multiplier.is_some();
    match (dp_wanted, args.clip) {
        (true, None) => bail!("differential privacy needs --clip C (the per-sample clipping norm)"),
        (false, Some(_)) => {
            bail!("--clip needs --dp-epsilon E or --noise-multiplier S (differential privacy)")
        }
        _ => {}
    }
    if let Some(e) = args.dp_epsilon.filter(|e| !(*e > 0.0 && e.is_finite())) {
        bail!("--dp-epsilon {e} must be positive and finite");
    }
    if let Some(s) = args
        .noise_multiplier
        .filter(|s| !(*s > 0.0 && s.is_finite()))
    {
        bail!("--noise-multiplier {s} must be positive and finite");
    }
    if let Some(c) = args.clip.filter(|c| !(*c > 0.0 && c.is_finite())) {
        bail!("--clip {c} must be positive and finite");
    }
    if dp_wanted && !(args.dp_delta > 0.0 && args.dp_delta < 1.0) {
        bail!("--dp-delta {} must be between 0 and 1", args.dp_delta);
    }
    if dp_wanted && args.init_data.is_none() && args.init.is_none() {
        bail!(
            "with differential privacy the LoRA-SB initialization must not read the private \
             training data (DP-SGD does not cover it): give public seed data with --init-data"
        );
    }
    let (weights, base_model) = load_base_model(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let init_file = match &args.init {
        Some(path) => Some(InitFile::read(
            path,
            weights.config.num_hidden_layers,
            &base_model,
        )?),
        None => None,
    };
    let max_seq_len = match &init_file {
        Some(f) => {
            resolve_file_max_seq_len(args.max_seq_len, &f.info.metadata, &f.path, &weights.config)?
        }
        None => resolve_max_seq_len(args.max_seq_len, &weights.config)?,
    };
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"))?
        .with_max_length(max_seq_len)?;
    let rank = match (&init_file, args.rank) {
        (Some(s), Some(r)) if r != s.info.rank => bail!(
            "--rank {r} does not match the rank {} of {} (--init); leave --rank out",
            s.info.rank,
            s.path
        ),
        (Some(s), _) => s.info.rank,
        (None, r) => r.unwrap_or(DEFAULT_RANK),
    };
    // Starting from a head, the training set's class ids are the head's.
    let classes = head_classes(
        init_file
            .as_ref()
            .map(|s| (s.path.as_str(), s.labels.as_deref())),
        None,
    )?;
    let train = read_training_set(&args.train, &args.columns, classes.as_ref())?;
    check_classes(&train, &args.train)?;
    if dp_wanted && args.dp_delta * train.len() as f64 >= 1.0 {
        tracing::warn!(
            "--dp-delta {} is not below 1/N = {:.3e} for the {} training examples: a δ that \
             large allows publishing an example outright; the usual choice is well below 1/N",
            args.dp_delta,
            1.0 / train.len() as f64,
            train.len()
        );
    }
    // The evaluation set reads its labels with the training set's class ids.
    let eval = read_eval_set(&args.eval, &train)?;
    let mut eval_examples: Vec<Example> = eval.examples;
    if args.eval_limit > 0 {
        eval_examples.truncate(args.eval_limit);
    }
    let num_labels = train.num_labels();
    eprintln!(
        "train: {} examples, eval: {} examples, {} classes {:?}, text column {:?}{}",
        train.len(),
        eval_examples.len(),
        num_labels,
        train.label_names,
        train.text_column,
        train
            .text_pair_column
            .as_ref()
            .map_or(String::new(), |c| format!(" + {c:?}")),
    );

    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: args.adapter.as_deref(),
    }))?;
    let adapter_name = ctx.adapter_name().to_owned();
    eprintln!("adapter: {adapter_name}");

    if args.batch > train.len() {
        tracing::warn!(
            "--batch {} is more than the {} training examples: every step trains on all of them",
            args.batch,
            train.len()
        );
    }
    let config = &weights.config;
    let mut sampler = BatchSampler::new(train.len(), args.batch, args.seed);
    let started = Instant::now();
    let (adapters, head, names, modules, taken) = match &init_file {
        Some(s) => {
            let (adapters, head) = s.model(config, train.num_labels())?;
            eprintln!(
                "starting from {}: {} modules of rank {rank} and the head",
                s.path,
                s.info.names.len()
            );
            (
                adapters,
                head,
                s.info.names.clone(),
                s.info.modules.clone(),
                None,
            )
        }
        None => {
            let (adapters, head, taken) =
                initialize(&args, &ctx, &weights, &tokenizer, &train, rank, init_lr)?;
            let every_linear = AdaptedLinear::ALL.map(|w| w.checkpoint_name().to_owned());
            let (names, modules) = layered_modules(&every_linear, config.num_hidden_layers)?;
            (adapters, head, names, modules, Some(taken))
        }
    };
    let init_seconds = started.elapsed().as_secs_f64();
    let mut encoder = GpuEncoder::new(&ctx, &weights, Some(&adapters), Some(&head))?;
    eprintln!(
        "trainable parameters: {} (every R and the head)",
        encoder.num_trainable()
    );
    let opt = AdamW {
        lr: args.lr as f32,
        head_lr_scale: (head_lr / args.lr) as f32,
        weight_decay: 0.01,
        ..AdamW::default()
    };
    let accountant = AccountantKind::from(args.accountant);
    let mut dp = match (args.dp_epsilon, args.noise_multiplier, args.clip) {
        (Some(epsilon), _, Some(clip)) => {
            let policy = PrivacyPolicy {
                epsilon,
                delta: args.dp_delta,
                clip_norm: clip,
            };
            Some(DpTraining::calibrate(
                &policy,
                train.len(),
                args.batch,
                args.steps as u64,
                accountant,
            )?)
        }
        (None, Some(sigma), Some(clip)) => Some(DpTraining::with_noise_multiplier(
            sigma,
            clip,
            train.len(),
            args.batch,
            // No target: the ε spent is only reported.
            PrivacyBudget::new(f64::MAX, args.dp_delta)?,
            accountant,
        )?),
        _ => None,
    };
    if let Some(dp) = &dp {
        eprintln!(
            "DP-SGD: σ = {:.4}, C = {}, q = {:.6} (expected batch {:.2} of {}), δ = {}, {} accountant{}",
            dp.config.noise_multiplier,
            dp.config.clip_norm,
            dp.config.sample_rate,
            dp.config.expected_batch(),
            train.len(),
            dp.delta(),
            accountant,
            args.dp_epsilon
                .map_or(String::new(), |e| format!(", calibrated for ε = {e} over {} steps", args.steps)),
        );
    }
    // The adapter as `--output` and the checkpoints write it, after `steps`.
    let write_adapter = |encoder: &GpuEncoder<'_>,
                         dp: Option<&DpTraining>,
                         steps: usize,
                         path: &Path|
     -> anyhow::Result<()> {
        let (trained, trained_head) = pollster::block_on(encoder.read_adapters(&adapters))?;
        let mut metadata = HashMap::from([
            ("format".to_owned(), "fedsb-lora-sb".to_owned()),
            ("rank".to_owned(), rank.to_string()),
            ("modules".to_owned(), module_kinds(&modules)),
            (
                "labels".to_owned(),
                serde_json::to_string(&train.label_names)?,
            ),
            ("steps".to_owned(), steps.to_string()),
            ("learning_rate".to_owned(), args.lr.to_string()),
            ("head_learning_rate".to_owned(), head_lr.to_string()),
            ("seed".to_owned(), args.seed.to_string()),
            (MAX_SEQ_LEN.to_owned(), max_seq_len.to_string()),
            ("trained_by".to_owned(), "fedsb train".to_owned()),
            base_model.metadata_entry(),
        ]);
        match &init_file {
            Some(s) => {
                metadata.insert("init_file".to_owned(), s.path.clone());
            }
            None => {
                metadata.insert("init_learning_rate".to_owned(), init_lr.to_string());
            }
        }
        if args.centre_head {
            metadata.insert("centre_head".to_owned(), "true".to_owned());
        }
        if let Some(dp) = dp {
            metadata.insert("dp_epsilon".to_owned(), dp.epsilon_spent()?.to_string());
            metadata.insert("dp_delta".to_owned(), dp.delta().to_string());
        }
        write_adapter_file(path, &names, &modules, &trained, &trained_head, metadata)?;
        Ok(())
    };
    let mut checkpoints: Vec<String> = Vec::new();
    let mut train_seconds = 0.0;
    let mut samples = 0usize;
    let mut loss_window = Vec::new();
    for step in 1..=args.steps {
        let (loss, n) = if let Some(dp) = dp.as_mut() {
            let t0 = Instant::now();
            let out = train_steps_dp(&mut encoder, &tokenizer, &train.examples, dp, 1, &opt)?;
            train_seconds += t0.elapsed().as_secs_f64();
            (out.mean_loss, out.samples as usize)
        } else {
            let idx = sampler.next_batch();
            let refs: Vec<&Example> = idx.iter().map(|&i| &train.examples[i]).collect();
            let (batch, labels) = encode_examples(&tokenizer, &refs)?;
            let t0 = Instant::now();
            let loss = pollster::block_on(encoder.train_step(&batch, &labels, &opt))?;
            train_seconds += t0.elapsed().as_secs_f64();
            (loss, idx.len())
        };
        samples += n;
        // An empty Poisson batch has no loss to average.
        if n > 0 {
            loss_window.push(loss);
        }
        if !loss.is_finite() {
            bail!("training diverged at step {step} (loss {loss})");
        }
        if step % args.log_every.max(1) == 0 || step == args.steps {
            let mean = loss_window.iter().sum::<f32>() / loss_window.len().max(1) as f32;
            loss_window.clear();
            let privacy = match &dp {
                Some(dp) => format!(", ε spent {:.4}", dp.epsilon_spent()?),
                None => format!(", epoch {}", sampler.epochs),
            };
            eprintln!(
                "step {step}/{}: train loss {mean:.4}, {:.2} samples/s{privacy}",
                args.steps,
                samples as f64 / train_seconds,
            );
        }
        if let (Some(every), Some(output)) = (checkpoint_every, &args.output) {
            if step % every == 0 && step != args.steps {
                let path = checkpoint_path(output, step);
                write_adapter(&encoder, dp.as_ref(), step, &path)?;
                eprintln!("step {step}: wrote {}", path.display());
                checkpoints.push(path.display().to_string());
            }
        }
        if args.eval_every > 0 && step % args.eval_every == 0 && step != args.steps {
            let e = pollster::block_on(evaluate(
                &mut encoder,
                &tokenizer,
                &eval_examples,
                args.batch,
            ))?;
            eprintln!(
                "step {step}: eval accuracy {:.4}, eval loss {:.4}",
                e.accuracy, e.loss
            );
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "step": step,
                        "eval_accuracy": e.accuracy,
                        "eval_loss": e.loss,
                        "eval_confusion": e.confusion,
                    })
                );
            }
        }
    }
    let t0 = Instant::now();
    let e = pollster::block_on(evaluate(
        &mut encoder,
        &tokenizer,
        &eval_examples,
        args.batch,
    ))?;
    let eval_seconds = t0.elapsed().as_secs_f64();
    eprintln!(
        "final: eval accuracy {:.4}, eval loss {:.4} on {} examples ({eval_seconds:.1} s)",
        e.accuracy, e.loss, e.samples
    );
    let samples_per_second = if train_seconds > 0.0 {
        samples as f64 / train_seconds
    } else {
        0.0
    };
    let output = match &args.output {
        Some(path) => {
            write_adapter(&encoder, dp.as_ref(), args.steps, path)?;
            eprintln!("wrote the trained adapter to {}", path.display());
            Some(path.display().to_string())
        }
        None => None,
    };
    let mut summary = serde_json::json!({
        "eval_accuracy": e.accuracy,
        "eval_loss": e.loss,
        "eval_samples": e.samples,
        "eval_confusion": e.confusion,
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "max_seq_len": max_seq_len,
        "rank": rank,
        "samples_per_second": samples_per_second,
        "init_samples": taken,
        "learning_rate": args.lr,
        "head_learning_rate": head_lr,
        "init_learning_rate": init_file.is_none().then_some(init_lr),
        "init_seconds": init_seconds,
        "centre_head": init_file.is_none().then_some(args.centre_head),
        "init_file": init_file.as_ref().map(|s| s.path.clone()),
        "eval_samples_per_second": e.samples as f64 / eval_seconds.max(1e-9),
        "adapter": adapter_name,
        "output": output,
        "checkpoints": checkpoints,
    });
    if let Some(dp) = &dp {
        let epsilon = dp.epsilon_spent()?;
        eprintln!(
            "privacy: ε = {epsilon:.4} at δ = {} ({} accountant, {} steps)",
            dp.delta(),
            dp.accountant(),
            dp.steps_taken()
        );
        let extra = serde_json::json!({
            "epsilon": epsilon,
            "delta": dp.delta(),
            "noise_multiplier": dp.config.noise_multiplier,
            "sample_rate": dp.config.sample_rate,
            "clip_norm": dp.config.clip_norm,
            "accountant": dp.accountant().to_string(),
            "samples_trained": samples,
        });
        if let (Some(m), serde_json::Value::Object(x)) = (summary.as_object_mut(), extra) {
            m.extend(x);
        }
    }
    println!("{summary}");
    Ok(())
}

/// The LoRA-SB initialization (step 1): a head from `--seed`, `A`, `B` and
/// `R₀` from the gradients of the first shuffled `--init-samples` examples,
/// and with `--centre-head` the head's bias centred. Returns the examples
/// taken as well.
fn initialize(
    args: &TrainArgs,
    ctx: &GpuContext,
    weights: &BertWeights,
    tokenizer: &BertTokenizer,
    train: &Dataset,
    rank: usize,
    init_lr: f64,
) -> anyhow::Result<(LoraSbAdapters<f32>, ClassifierHead<f32>, usize)> {
    let config = &weights.config;
    let mut head = ClassifierHead::<f32>::init(
        train.num_labels(),
        config.hidden_size,
        config.initializer_range,
        args.seed ^ 0x5eed,
    );
    // LoRA-SB initialization on the first shuffled init_samples examples.
    let init_examples: Vec<Example> = match &args.init_data {
        Some(path) => {
            let d = read_dataset_file(path, &same_columns_as(train))
                .with_context(|| format!("reading the seed data {}", path.display()))?;
            if d.is_empty() {
                bail!("{}: no labelled examples", path.display());
            }
            d.examples
        }
        None => train.examples.clone(),
    };
    let started = Instant::now();
    let (init_batches, taken) = init_batches(
        tokenizer,
        &init_examples,
        args.batch,
        args.seed,
        args.init_samples,
    )?;
    let options = LoraSbInitOptions::new(rank, init_lr);
    let adapters = pollster::block_on(gpu_lora_sb_init(
        ctx,
        weights,
        &head,
        &init_batches,
        &options,
    ))?;
    eprintln!(
        "LoRA-SB init (GPU gradients, CPU SVD) on {taken} samples, rank {rank}, η {init_lr}: \
         {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if args.centre_head {
        let means = pollster::block_on(centre_head_bias(
            ctx,
            weights,
            &adapters,
            &mut head,
            &init_batches,
        ))?;
        eprintln!("head centred: the initial model's mean logits were {means:.3?}");
    }
    Ok((adapters, head, taken))
}

/// Where `--checkpoint-every` writes the adapter after `step` steps: next to
/// `output`, `<output's stem>.step-<step>.safetensors`.
fn checkpoint_path(output: &Path, step: usize) -> PathBuf {
    let stem = output
        .file_stem()
        .map_or_else(|| "adapter".into(), |s| s.to_string_lossy().into_owned());
    output.with_file_name(format!("{stem}.step-{step}.safetensors"))
}

/// The `modules` metadata: the adapted linears' names, in the engine's order.
fn module_kinds(modules: &[ModuleRef]) -> String {
    AdaptedLinear::ALL
        .into_iter()
        .filter(|w| modules.iter().any(|(_, m)| m == w))
        .map(|w| w.checkpoint_name())
        .collect::<Vec<_>>()
        .join(",")
}
