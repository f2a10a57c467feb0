//! `fedsb init`: LoRA-SB initialization on the aggregator's side, from a seed
//! (public) data file, written as the adapter file a task serves.
//!
//! ```text
//! fedsb init --model models/all-MiniLM-L6-v2 --train data/seed.tsv \
//!     --labels negative,positive --rank 32 --out adapter.safetensors
//! ```
//!
//! 1. The head starts as `fedsb train` starts it: weight uniform with the
//!    model's `initializer_range` as standard deviation (seeded by `--seed`),
//!    bias zero. That head is used for the initialization's gradients and is
//!    written as the round-0 head.
//! 2. `G = Σ ∂L/∂W0` over `--init-samples` shuffled seed examples (GPU),
//!    `ΔW = −η·sign(G)` with η = `--lr`, truncated SVD of `ΔWᵀ` (CPU):
//!    `A = Uᵀ`, `B = V`, `R₀ = diag(S)`.
//! 3. The file holds `encoder.layer.<i>.<module>.lora_{A,B,R}` for every
//!    adapted module and `classifier.{weight,bias}` (see `participant.rs`),
//!    and records the base model (`base_model_sha256`: the SHA-256 of
//!    `--model`'s `model.safetensors`), which every reader checks.
//!
//! 4. With `--centre-head`, the head's bias is then shifted so that every
//!    class has the same mean logit over the seed examples under the initial
//!    model (A, B, R₀ and the head), as `fedsb sim --centre-head` does.
//!
//! Point the task at it with `[adapter] file = "adapter.safetensors"` (and
//! the same `rank`, `modules` and `[task] labels`); the aggregator serves it by
//! hash and starts round 0 from its `R₀` and head. The last line on stdout is
//! one JSON object describing the file.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::read_dataset_file;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::BertTokenizer;
use fedsb_engine::reference::{ClassifierHead, LoraSbInitOptions};
use fedsb_engine::train::{
    centre_head_bias, check_init_options, gpu_init_gradients, init_batches, lora_sb_from_gradients,
};
use sha2::{Digest, Sha256};

use crate::checks::{
    check_classes, check_output_file, load_base_model, resolve_max_seq_len, training_inputs,
};
use crate::data_args::{check_labels_flag, require_label_column, DataColumns};
use crate::participant::{layered_modules, write_adapter_file, MAX_SEQ_LEN};

#[derive(Debug, Args)]
pub struct InitArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Seed (public) training data (.csv, .tsv or .jsonl) whose gradients set A, B and R₀.
    #[arg(long)]
    train: PathBuf,
    #[command(flatten)]
    columns: DataColumns,
    /// Class names in head order, comma-separated: the task's `[task] labels`.
    /// Without it the classes are those of the seed data, in its order.
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// LoRA-SB rank r (the task's `[adapter] rank`).
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Seed examples whose gradients initialize A, B and R₀.
    #[arg(long, default_value_t = 256)]
    init_samples: usize,
    /// Adapted linears in each layer (the task's `[adapter] modules`),
    /// comma-separated; default all six.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "attention.self.query,attention.self.key,attention.self.value,attention.output.dense,intermediate.dense,output.dense"
    )]
    modules: Vec<String>,
    /// η of ΔW = −η·sign(G), which scales R₀ (use the task's learning rate).
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    /// Examples per gradient batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Truncate sequences to this many tokens (special tokens included).
    /// [default: 128, or the model's max_position_embeddings if fewer]
    #[arg(long, value_name = "N")]
    max_seq_len: Option<usize>,
    /// Output adapter file (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the head initialization and of the choice of seed examples.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use the GPU adapter whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
    /// Centre the head written as the round-0 head: shift its bias so that,
    /// under the initial model (A, B, R₀ and this head), every class has the
    /// same mean logit over the initialization's seed examples (README
    /// "Centring the initial head").
    #[arg(long)]
    centre_head: bool,
}

pub fn run(args: InitArgs) -> anyhow::Result<()> {
    for (flag, value) in [
        ("--batch", args.batch),
        ("--rank", args.rank),
        ("--init-samples", args.init_samples),
    ] {
        if value == 0 {
            bail!("{flag} must be at least 1");
        }
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        bail!("--lr {} must be positive (η of ΔW = −η·sign(G))", args.lr);
    }
    check_labels_flag(args.labels.as_deref())?;
    let inputs = training_inputs(&args.model, &args.train, None, None);
    check_output_file(&args.out, "--out", &inputs)?;
    let (weights, base_model) = load_base_model(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let max_seq_len = resolve_max_seq_len(args.max_seq_len, &weights.config)?;
    let config = weights.config.clone();
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"))?
        .with_max_length(max_seq_len)?;
    let data = read_dataset_file(&args.train, &args.columns.spec(args.labels.clone()))?;
    require_label_column(&data, &args.train)?;
    let labels = data.label_names.clone();
    if labels.len() < 2 {
        bail!(
            "{}: the head needs at least two classes, found {labels:?} (give the task's classes with --labels)",
            args.train.display()
        );
    }
    // As `fedsb train` and `sim` do: seed data of one class would make the
    // initial head's gradients, and so A, B and R₀, those of a
    // one-class problem.
    check_classes(&data, &args.train)?;

    // The aggregator's order: layer by layer, then the modules as listed.
    let (names, modules) = layered_modules(&args.modules, config.num_hidden_layers)?;
    // The linears of one layer, in the listed order.
    let linears: Vec<_> = modules
        .iter()
        .take(args.modules.len())
        .map(|&(_, which)| which)
        .collect();
    let shape = fedsb_protocol::AdapterShape {
        rank: args.rank as u32,
        modules: modules.len() as u32,
        head_classes: labels.len() as u32,
        head_hidden: config.hidden_size as u32,
    };
    if let Some(e) = shape.frame_limit_error() {
        eprintln!(
            "warning: fedsb serve would refuse a task with this adapter ({e}); it can still \
             start `fedsb train --init`"
        );
    }

    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: args.adapter.as_deref(),
    }))?;
    eprintln!("adapter: {}", ctx.adapter_name());
    let mut head = ClassifierHead::<f32>::init(
        labels.len(),
        config.hidden_size,
        config.initializer_range,
        args.seed ^ 0x5eed,
    );

    let mut options = LoraSbInitOptions::new(args.rank, args.lr);
    options.modules = linears;
    check_init_options(&config, &options)?;

    let started = Instant::now();
    let (batches, taken) = init_batches(
        &tokenizer,
        &data.examples,
        args.batch,
        args.seed,
        args.init_samples,
    )?;
    let grads = pollster::block_on(gpu_init_gradients(&ctx, &weights, &head, &batches))?;
    let gradient_seconds = started.elapsed().as_secs_f64();
    let svd_started = Instant::now();
    let adapters = lora_sb_from_gradients(&config, &grads, &options)?;
    let svd_seconds = svd_started.elapsed().as_secs_f64();
    let mean_logits = if args.centre_head {
        let means = pollster::block_on(centre_head_bias(
            &ctx, &weights, &adapters, &mut head, &batches,
        ))?;
        eprintln!("head centred: the initial model's mean logits were {means:.3?}");
        Some(means)
    } else {
        None
    };
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "LoRA-SB init on {taken} seed samples, rank {}, {} modules: {seconds:.1} s \
         ({gradient_seconds:.1} s gradients on the GPU, {svd_seconds:.1} s sign and SVD on the CPU)",
        args.rank,
        names.len()
    );

    let mut metadata = HashMap::from([
        ("format".to_owned(), "fedsb-lora-sb".to_owned()),
        ("rank".to_owned(), args.rank.to_string()),
        ("modules".to_owned(), args.modules.join(",")),
        ("labels".to_owned(), serde_json::to_string(&labels)?),
        ("init_samples".to_owned(), taken.to_string()),
        ("learning_rate".to_owned(), args.lr.to_string()),
        ("seed".to_owned(), args.seed.to_string()),
        (MAX_SEQ_LEN.to_owned(), max_seq_len.to_string()),
        (
            "head".to_owned(),
            "uniform(std = initializer_range) weight, zero bias".to_owned(),
        ),
        base_model.metadata_entry(),
    ]);
    if args.centre_head {
        metadata.insert(
            "head".to_owned(),
            "uniform(std = initializer_range) weight, bias centred on the initialization's examples"
                .to_owned(),
        );
        metadata.insert("centre_head".to_owned(), "true".to_owned());
    }
    write_adapter_file(&args.out, &names, &modules, &adapters, &head, metadata)?;
    let bytes = std::fs::read(&args.out)?;
    let sha256 = hex::encode(Sha256::digest(&bytes));
    eprintln!(
        "wrote {} ({} bytes, sha256 {sha256}); use it with [adapter] file = \"...\", rank = {}, and [task] labels = {labels:?}",
        args.out.display(),
        bytes.len(),
        args.rank
    );
    println!(
        "{}",
        serde_json::json!({
            "out": args.out.display().to_string(),
            "sha256": sha256,
            "bytes": bytes.len(),
            "base_model_sha256": base_model.sha256,
            "rank": args.rank,
            "modules": names.len(),
            "labels": labels,
            "init_samples": taken,
            "init_seconds": seconds,
            "gradient_seconds": gradient_seconds,
            "svd_seconds": svd_seconds,
            "centre_head": args.centre_head,
            "mean_logits_before_centring": mean_logits,
            "adapter": ctx.adapter_name(),
        })
    );
    Ok(())
}
