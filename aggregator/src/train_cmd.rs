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
//! Progress goes to stderr; the last line on stdout is one JSON object with
//! `eval_accuracy`, `eval_loss`, `steps`, `samples_per_second` and `adapter`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::{read_dataset_file, ColumnSpec, Example};
use fedsb_engine::gpu::adamw::AdamW;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use fedsb_engine::reference::{ClassifierHead, LoraSbInitOptions};
use fedsb_engine::train::{encode_examples, evaluate, gpu_lora_sb_init, BatchSampler};

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
    /// Text column (detected when not given).
    #[arg(long)]
    text_column: Option<String>,
    /// Second text column of sentence pairs.
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Label column (detected when not given).
    #[arg(long)]
    label_column: Option<String>,
    /// LoRA-SB rank r.
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 100)]
    steps: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// AdamW learning rate (also η of the LoRA-SB initialization).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Training samples whose gradients initialize A, B and R.
    #[arg(long, default_value_t = 256)]
    init_samples: usize,
    /// Truncate sequences to this many tokens (special tokens included).
    #[arg(long, default_value_t = 128)]
    max_seq_len: usize,
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
}

pub fn run(args: TrainArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.rank == 0 {
        bail!("--batch and --rank must be positive");
    }
    let weights = BertWeights::from_dir(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"))?
        .with_max_length(args.max_seq_len)?;
    let mut spec = ColumnSpec {
        text: args.text_column.clone(),
        text_pair: args.text_pair_column.clone(),
        label: args.label_column.clone(),
        label_names: None,
        skip_rows_without_label: true,
    };
    let train = read_dataset_file(&args.train, &spec)?;
    if train.label_column.is_none() {
        bail!("{}: no label column found", args.train.display());
    }
    // The evaluation set reads its labels with the training set's class ids.
    spec.text = Some(train.text_column.clone());
    spec.text_pair = train.text_pair_column.clone();
    spec.label = train.label_column.clone();
    spec.label_names = Some(train.label_names.clone());
    let eval = read_dataset_file(&args.eval, &spec)?;
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

    let config = &weights.config;
    let head = ClassifierHead::<f32>::init(
        num_labels,
        config.hidden_size,
        config.initializer_range,
        args.seed ^ 0x5eed,
    );
    let mut sampler = BatchSampler::new(train.len(), args.batch, args.seed);

    // LoRA-SB initialization on the first shuffled init_samples examples.
    let started = Instant::now();
    let mut init_batches = Vec::new();
    let mut taken = 0;
    let mut init_sampler = BatchSampler::new(train.len(), args.batch, args.seed ^ 0x1417);
    while taken < args.init_samples.min(train.len()) {
        let idx = init_sampler.next_batch();
        let idx = &idx[..idx.len().min(args.init_samples - taken)];
        taken += idx.len();
        let refs: Vec<&Example> = idx.iter().map(|&i| &train.examples[i]).collect();
        init_batches.push(encode_examples(&tokenizer, &refs)?);
    }
    let options = LoraSbInitOptions::new(args.rank, args.lr);
    let adapters = pollster::block_on(gpu_lora_sb_init(
        &ctx,
        &weights,
        &head,
        &init_batches,
        &options,
    ))?;
    let init_seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "LoRA-SB init (GPU gradients, CPU SVD) on {taken} samples, rank {}: {init_seconds:.1} s",
        args.rank
    );

    let mut encoder = GpuEncoder::new(&ctx, &weights, Some(&adapters), Some(&head))?;
    eprintln!(
        "trainable parameters: {} (every R and the head)",
        encoder.num_trainable()
    );
    let opt = AdamW {
        lr: args.lr as f32,
        weight_decay: 0.01,
        ..AdamW::default()
    };
    let mut train_seconds = 0.0;
    let mut samples = 0usize;
    let mut loss_window = Vec::new();
    for step in 1..=args.steps {
        let idx = sampler.next_batch();
        let refs: Vec<&Example> = idx.iter().map(|&i| &train.examples[i]).collect();
        let (batch, labels) = encode_examples(&tokenizer, &refs)?;
        let t0 = Instant::now();
        let loss = pollster::block_on(encoder.train_step(&batch, &labels, &opt))?;
        train_seconds += t0.elapsed().as_secs_f64();
        samples += idx.len();
        loss_window.push(loss);
        if !loss.is_finite() {
            bail!("training diverged at step {step} (loss {loss})");
        }
        if step % args.log_every.max(1) == 0 || step == args.steps {
            let mean = loss_window.iter().sum::<f32>() / loss_window.len() as f32;
            loss_window.clear();
            eprintln!(
                "step {step}/{}: train loss {mean:.4}, {:.2} samples/s, epoch {}",
                args.steps,
                samples as f64 / train_seconds,
                sampler.epochs
            );
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
                    serde_json::json!({"step": step, "eval_accuracy": e.accuracy, "eval_loss": e.loss})
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
    println!(
        "{}",
        serde_json::json!({
            "eval_accuracy": e.accuracy,
            "eval_loss": e.loss,
            "eval_samples": e.samples,
            "steps": args.steps,
            "batch": args.batch,
            "rank": args.rank,
            "samples_per_second": samples_per_second,
            "init_samples": taken,
            "init_seconds": init_seconds,
            "eval_samples_per_second": e.samples as f64 / eval_seconds.max(1e-9),
            "adapter": adapter_name,
        })
    );
    Ok(())
}
