//! `fedsb export`: a committed global model of a task, as an adapter file
//! ([`fedsb_aggregator::export`]): the task's frozen `A` and `B` with the
//! round's `R`s and head, in the layout of `fedsb init` and `fedsb train
//! --output`, so the federation's result can be evaluated (`fedsb eval`),
//! used, or compared with centralized training. The database is opened
//! read-only, so a running `fedsb serve` is not disturbed. `--average N`
//! writes the mean of the N rounds ending at `--round` instead. The task's
//! model and adapter file must be the ones its database pins, and `--out`
//! must not be one of the task's own files.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use fedsb_aggregator::config::Config;
use fedsb_aggregator::export::{check_pinned_files, export_rounds_mean, refuse_task_file};
use fedsb_aggregator::store::Store;
use sha2::{Digest, Sha256};

use crate::checks::check_output_file;
use crate::participant::write_file_atomically;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The task's configuration, as given to `fedsb serve` (the same
    /// FEDSB_* environment overrides apply).
    #[arg(long)]
    config: PathBuf,
    /// Directory of the task's SQLite state; overrides [server] state_dir.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// The committed round to export (0: the initial model); default: the
    /// last committed round.
    #[arg(long)]
    round: Option<u64>,
    /// Where to write the adapter file (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Write the mean of the N committed rounds ending at --round (every R
    /// and the head averaged; A and B are the task's, so this is the mean of
    /// the rounds' models), which damps the accuracy's round-to-round swing
    /// (BENCHMARKS.md). 1: the round itself.
    #[arg(long, default_value_t = 1, value_name = "N")]
    average: u64,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    check_output_file(&args.out, "--out", &[("the --config file", &args.config)])?;
    let mut config = Config::load(&args.config)?;
    if let Some(d) = args.state_dir {
        config.server.state_dir = d;
    }
    let store = Store::open_read_only(
        &config.server.state_dir,
        &config.task.id,
        &config.identity_json(),
    )?;
    refuse_task_file(&config, store.path(), &args.out)?;
    let task = config.task.id.clone();
    let config = Arc::new(config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("cannot start the async runtime")?;
    let exported = rt.block_on(async {
        // The task's model and adapter file must be the ones its rounds
        // were trained with.
        check_pinned_files(config.clone(), &store).await?;
        export_rounds_mean(config, &store, args.round, args.average).await
    })?;
    write_file_atomically(&args.out, &exported.bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let meta = &exported.meta;
    let averaged = exported.averaged_rounds();
    let rounds = match averaged {
        Some([first, last]) => format!("the mean of rounds {first}-{last}"),
        None => format!("round {}", exported.round),
    };
    eprintln!(
        "exported {rounds} of task {task} (round {}: {} participants, {} samples) to {}",
        exported.round,
        meta.participants,
        meta.total_samples,
        args.out.display()
    );
    println!(
        "{}",
        serde_json::json!({
            "task": task,
            "round": exported.round,
            "averaged_rounds": averaged,
            "last_committed_round": exported.last_committed,
            "participants": meta.participants,
            "total_samples": meta.total_samples,
            // One round's state; a mean of rounds is none of theirs.
            "global_sha256": averaged.is_none().then_some(&meta.global_sha256),
            "out": args.out.display().to_string(),
            "sha256": hex::encode(Sha256::digest(&exported.bytes)),
            "bytes": exported.bytes.len(),
            // DP tasks (null otherwise): the largest ε a participant
            // reported, and the largest the aggregator accounts.
            "dp_epsilon_max": exported.dp_epsilon_max,
            "dp_epsilon_accounted_max": exported.dp_epsilon_accounted_max,
        })
    );
    Ok(())
}
