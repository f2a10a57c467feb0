//! `fedsb eval`: accuracy and mean cross-entropy of an adapter file on a
//! labelled file, on the GPU: the evaluation the aggregator runs on every
//! committed round, for any adapter file (`fedsb export`, `fedsb train
//! --output`, `fedsb init`). An adapter file that records another base
//! model (`base_model_sha256`) than `--model`'s `model.safetensors` is
//! refused. Sequences are truncated at `--max-seq-len`, else at the length
//! the file records (`max_seq_len`: the task's for an exported round), so
//! that an exported round evaluates as the aggregator evaluated it. Prints
//! one JSON line on stdout (with the `max_seq_len` used):
//!
//! ```text
//! fedsb export --config configs/sst2-demo.toml --out round.safetensors
//! fedsb eval --model models/all-MiniLM-L6-v2 --adapter-file round.safetensors \
//!     --eval data/sst2/dev.tsv
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::read_dataset_file;
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::BertTokenizer;
use fedsb_engine::train::evaluate;

use crate::checks::{load_base_model, resolve_file_max_seq_len};
use crate::data_args::{check_labels_flag, require_label_column, DataColumns};
use crate::participant::adapter_file_info;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The adapter file: A, B and R of every adapted module and the head
    /// (from `fedsb export`, `fedsb train --output` or `fedsb init`).
    #[arg(long)]
    adapter_file: PathBuf,
    /// Labelled data (.csv, .tsv or .jsonl).
    #[arg(long)]
    eval: PathBuf,
    #[command(flatten)]
    columns: DataColumns,
    /// Class names in the head's order, comma-separated (default: the
    /// adapter file's `labels` metadata).
    #[arg(long, value_delimiter = ',')]
    labels: Option<Vec<String>>,
    /// Evaluate on the first N labelled rows only (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Truncate sequences to this many tokens (special tokens included).
    /// [default: the adapter file's max_seq_len metadata (the task's for an
    /// exported round, the length `fedsb train`, `sim` or `init` ran at);
    /// without it 128, or the model's max_position_embeddings if fewer]
    #[arg(long, value_name = "N")]
    max_seq_len: Option<usize>,
    /// Use the GPU adapter whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    check_labels_flag(args.labels.as_deref())?;
    let file = args.adapter_file.display().to_string();
    let (weights, base_model) = load_base_model(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let config = &weights.config;
    let bytes = std::fs::read(&args.adapter_file).with_context(|| format!("reading {file}"))?;
    let info = adapter_file_info(&bytes, config.num_hidden_layers)
        .with_context(|| format!("adapter file {file}"))?;
    base_model.check_adapter_file(&args.adapter_file, &info.metadata)?;
    let max_seq_len = resolve_file_max_seq_len(args.max_seq_len, &info.metadata, &file, config)?;
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"))?
        .with_max_length(max_seq_len)?;
    let context = || format!("adapter file {file}");
    let file_labels = info.labels().with_context(context)?;
    let labels: Vec<String> = match &args.labels {
        Some(l) => {
            if let Some(theirs) = file_labels.as_ref().filter(|f| *f != l) {
                let mut same = theirs.clone();
                let mut given = l.clone();
                same.sort();
                given.sort();
                if same == given {
                    bail!(
                        "--labels {l:?} name the classes of {file} ({theirs:?}) in another \
                         order: its head's rows would be scored as each other's classes; leave \
                         --labels out, or give them in the file's order"
                    );
                }
                tracing::warn!(
                    "--labels {l:?} differ from the classes {theirs:?} that {file} names: \
                     the head's rows are read as --labels says"
                );
            }
            l.clone()
        }
        None => file_labels.with_context(|| {
            format!(
                "adapter file {file} names no classes (no labels metadata): give them with \
                 --labels, in the head's order"
            )
        })?,
    };
    let (adapters, head) = info.read_model(&bytes, config).with_context(context)?;
    let classes = head.bias.len();
    if classes != labels.len() {
        bail!("adapter file {file}: the head has {classes} classes but the labels are {labels:?}");
    }
    let data = read_dataset_file(&args.eval, &args.columns.spec(Some(labels.clone())))
        .with_context(|| format!("reading {}", args.eval.display()))?;
    require_label_column(&data, &args.eval)?;
    let mut examples = data.examples;
    if args.limit > 0 {
        examples.truncate(args.limit);
    }
    if examples.is_empty() {
        bail!("{}: no labelled rows", args.eval.display());
    }
    eprintln!(
        "{}: {} modules of rank {}, classes {labels:?}; {}: {} examples (text column {:?}{}, \
         label column {:?}), truncated at {max_seq_len} tokens",
        file,
        info.names.len(),
        info.rank,
        args.eval.display(),
        examples.len(),
        data.text_column,
        data.text_pair_column
            .as_ref()
            .map_or(String::new(), |c| format!(" + {c:?}")),
        data.label_column.as_deref().unwrap_or_default(),
    );
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: args.adapter.as_deref(),
    }))?;
    eprintln!("adapter: {}", ctx.adapter_name());
    let started = Instant::now();
    let mut encoder = GpuEncoder::new(&ctx, &weights, Some(&adapters), Some(&head))?;
    let result = pollster::block_on(evaluate(&mut encoder, &tokenizer, &examples, args.batch))?;
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "accuracy {:.4}, loss {:.4} on {} examples ({seconds:.1} s)",
        result.accuracy, result.loss, result.samples
    );
    let round = info
        .metadata
        .get("round")
        .and_then(|r| r.parse::<u64>().ok());
    println!(
        "{}",
        serde_json::json!({
            "accuracy": result.accuracy,
            "loss": result.loss,
            "samples": result.samples,
            "confusion": result.confusion,
            "labels": labels,
            "max_seq_len": max_seq_len,
            "seconds": seconds,
            "adapter_file": file,
            "round": round,
            "gpu_adapter": ctx.adapter_name(),
        })
    );
    Ok(())
}
