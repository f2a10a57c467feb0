//! `fedsb export`: a committed global model of a task, as an adapter file.
//!
//! The aggregator's state holds every committed round's global `R`s and
//! head (the `GlobalModel` frame as broadcast); the task's adapter file holds
//! the frozen `A` and `B`. This writes both into one safetensors file in the
//! layout of `fedsb init` and `fedsb train --output` (`<module>.lora_A`,
//! `lora_B`, `lora_R` and `classifier.*`), with the round in its metadata, so
//! the federation's result can be evaluated (`fedsb eval`), used, or
//! compared with centralized training. The database is opened read-only, so
//! a running `fedsb serve` is not disturbed.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;
use fedsb_aggregator::config::Config;
use fedsb_aggregator::store::Store;
use fedsb_engine::model::BertConfig;
use fedsb_protocol::RoundId;
use sha2::{Digest, Sha256};

use crate::participant::{
    parse_module_names, read_adapter_file, state_to_engine, write_adapter_file,
};

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
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(d) = args.state_dir {
        config.server.state_dir = d;
    }
    let task = config.task.id.clone();
    let store = Store::open_read_only(
        &config.server.state_dir,
        &config.task.id,
        &config.identity_json(),
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .context("cannot start the async runtime")?;
    let last = rt
        .block_on(store.last_round())?
        .with_context(|| {
            format!(
                "task {task} has no committed round yet (state in {})",
                store.path().display()
            )
        })?
        .meta
        .round;
    let round = args.round.unwrap_or(last);
    let Some(committed) = rt.block_on(store.committed_round(RoundId(round)))? else {
        bail!("round {round} of task {task} is not committed: the last committed round is {last}");
    };
    let Some(adapter_path) = config.adapter_file_path() else {
        bail!(
            "task {task} has no adapter file with A and B ([adapter] file is not set{}), so its R matrices mean nothing on their own",
            if config.adapter.init == fedsb_aggregator::config::AdapterInit::Federated {
                ", and the federated initialization has not written one"
            } else {
                ""
            }
        );
    };
    let model_dir = config.model.dir.as_ref().with_context(|| {
        format!(
            "{}: fedsb export needs [model] dir (the shapes of A and B come from its config.json)",
            args.config.display()
        )
    })?;
    let config_json = model_dir.join("config.json");
    let bert = BertConfig::from_json(
        &std::fs::read(&config_json)
            .with_context(|| format!("reading {}", config_json.display()))?,
    )
    .with_context(|| format!("{}", config_json.display()))?;
    let names = config.module_names();
    let modules = parse_module_names(&names, bert.num_hidden_layers)?;
    let bytes = std::fs::read(&adapter_path)
        .with_context(|| format!("reading the adapter file {}", adapter_path.display()))?;
    let frozen = read_adapter_file(
        &bytes,
        &names,
        &modules,
        &bert,
        config.adapter.rank as usize,
    )
    .with_context(|| format!("adapter file {}", adapter_path.display()))?;
    let (adapters, head) = state_to_engine(&frozen, &modules, &committed.adapter)
        .with_context(|| format!("the global state of round {round}"))?;
    let meta = &committed.meta;
    let metadata = HashMap::from([
        ("format".to_owned(), "fedsb-lora-sb".to_owned()),
        ("rank".to_owned(), config.adapter.rank.to_string()),
        ("modules".to_owned(), config.adapter.modules.join(",")),
        (
            "labels".to_owned(),
            serde_json::to_string(&config.task.labels)?,
        ),
        ("model_id".to_owned(), config.model.id.clone()),
        ("task_id".to_owned(), task.clone()),
        ("round".to_owned(), round.to_string()),
        ("participants".to_owned(), meta.participants.to_string()),
        ("total_samples".to_owned(), meta.total_samples.to_string()),
        ("global_sha256".to_owned(), meta.global_sha256.clone()),
        (
            "trained_by".to_owned(),
            "fedsb serve (exported by fedsb export)".to_owned(),
        ),
    ]);
    write_adapter_file(&args.out, &names, &modules, &adapters, &head, metadata)?;
    let written = std::fs::read(&args.out)?;
    let sha256 = hex::encode(Sha256::digest(&written));
    eprintln!(
        "exported round {round} of task {task} ({} participants, {} samples) to {}",
        meta.participants,
        meta.total_samples,
        args.out.display()
    );
    println!(
        "{}",
        serde_json::json!({
            "task": task,
            "round": round,
            "last_committed_round": last,
            "participants": meta.participants,
            "total_samples": meta.total_samples,
            "global_sha256": meta.global_sha256,
            "out": args.out.display().to_string(),
            "sha256": sha256,
            "bytes": written.len(),
        })
    );
    Ok(())
}
