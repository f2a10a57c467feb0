//! `fedsb embed`: mean-pooled sentence embeddings of a BERT-family model,
//! computed on the GPU, one JSON line per text on stdout:
//!
//! ```text
//! fedsb embed --model models/all-MiniLM-L6-v2 --text "A sentence." --text "Another one."
//! fedsb embed --model models/all-MiniLM-L6-v2 --input texts.txt      # one text per line
//! fedsb embed --model models/all-MiniLM-L6-v2 --input dev.tsv        # CSV/TSV/JSONL: the text column
//! fedsb embed --model models/all-MiniLM-L6-v2 --input mnli.jsonl     # sentence pairs, one input each
//! ```
//!
//! The embedding is the attention-masked mean of the last hidden state, not
//! normalized (sentence-transformers' pooling without its Normalize module).

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_engine::data::{read_text_lines, read_texts_only, ColumnSpec, DataFormat};
use fedsb_engine::gpu::encoder::GpuEncoder;
use fedsb_engine::gpu::{GpuContext, GpuOptions};
use fedsb_engine::model::{BertTokenizer, BertWeights};
use serde::Serialize;

use crate::checks::resolve_max_seq_len;

#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Hugging Face model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// A text to embed (repeatable).
    #[arg(long = "text")]
    texts: Vec<String>,
    /// A file of texts: one per line, or the text column of a .csv/.tsv/.jsonl dataset.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Text column of a dataset --input (detected when not given).
    #[arg(long)]
    text_column: Option<String>,
    /// Second text column of a dataset --input of sentence pairs (detected
    /// when not given, as for training): each pair is embedded as one
    /// input, `[CLS] text [SEP] pair [SEP]`, and its line has `text_pair`.
    #[arg(long)]
    text_pair_column: Option<String>,
    /// Use the GPU adapter whose name contains this (case-insensitive).
    #[arg(long)]
    adapter: Option<String>,
    /// Truncate texts to this many tokens (special tokens included).
    /// [default: 128, or the model's max_position_embeddings if fewer]
    #[arg(long, value_name = "N")]
    max_seq_len: Option<usize>,
    /// Texts per GPU batch.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

/// The inputs to embed: each a text and, from a file of sentence pairs,
/// its pair.
fn read_texts(args: &EmbedArgs) -> anyhow::Result<Vec<(String, Option<String>)>> {
    let mut texts: Vec<(String, Option<String>)> =
        args.texts.iter().map(|t| (t.clone(), None)).collect();
    if let Some(path) = &args.input {
        let name = path.display().to_string();
        if DataFormat::from_file_name(&name).is_some() {
            let spec = ColumnSpec {
                text: args.text_column.clone(),
                text_pair: args.text_pair_column.clone(),
                ..ColumnSpec::default()
            };
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {name}"))?;
            let format = DataFormat::from_file_name(&name).expect("checked above");
            // Only the text is embedded: labels are neither needed nor checked.
            let data = read_texts_only(&bytes, format, &spec, &name)?;
            match &data.text_pair_column {
                Some(pair) => eprintln!(
                    "{name}: embedding the pairs of columns {:?} and {pair:?}",
                    data.text_column
                ),
                None => eprintln!("{name}: embedding column {:?}", data.text_column),
            }
            texts.extend(data.examples.into_iter().map(|e| (e.text, e.text_pair)));
        } else {
            let bytes = std::fs::read(path).with_context(|| format!("cannot read {name}"))?;
            // Bytes that are not UTF-8 are an error naming the line.
            let lines = read_text_lines(&bytes, &name)?;
            if lines.is_empty() {
                bail!("{name} has no text: every line is blank");
            }
            if args.text_pair_column.is_some() {
                bail!("--text-pair-column needs a .csv, .tsv or .jsonl --input, not {name}");
            }
            texts.extend(lines.into_iter().map(|l| (l, None)));
        }
    }
    if texts.is_empty() {
        bail!("nothing to embed: give --text T (repeatable) or --input FILE");
    }
    if args.input.is_none() && args.text_pair_column.is_some() {
        bail!("--text-pair-column names a column of --input FILE, which is not given");
    }
    Ok(texts)
}

/// One output line; `text` (and a pair's `text_pair`) first, the embedding
/// as shortest-round-trip f32s.
#[derive(Serialize)]
struct EmbeddingLine<'a> {
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text_pair: Option<&'a str>,
    embedding: &'a [f32],
}

pub fn run(args: EmbedArgs) -> anyhow::Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let texts = read_texts(&args)?;
    let weights = BertWeights::from_dir(&args.model)
        .with_context(|| format!("loading the model from {}", args.model.display()))?;
    let max_seq_len = resolve_max_seq_len(args.max_seq_len, &weights.config)?;
    let tokenizer = BertTokenizer::from_file(args.model.join("tokenizer.json"))?
        .with_max_length(max_seq_len)?;
    let ctx = pollster::block_on(GpuContext::new(&GpuOptions {
        adapter: args.adapter.as_deref(),
    }))?;
    eprintln!("adapter: {}", ctx.adapter_name());
    let mut encoder = GpuEncoder::new(&ctx, &weights, None, None)?;
    let hidden = weights.config.hidden_size;
    let mut out = std::io::stdout().lock();
    for chunk in texts.chunks(args.batch) {
        let inputs: Vec<(&str, Option<&str>)> = chunk
            .iter()
            .map(|(t, p)| (t.as_str(), p.as_deref()))
            .collect();
        let batch = tokenizer.encode_mixed_batch(&inputs)?;
        let pooled = pollster::block_on(encoder.embed(&batch))?;
        for (&(text, text_pair), embedding) in inputs.iter().zip(pooled.chunks(hidden)) {
            let line = serde_json::to_string(&EmbeddingLine {
                text,
                text_pair,
                embedding,
            })?;
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    Ok(())
}
