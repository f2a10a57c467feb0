//! The `fedsb` command-line tool: `fedsb serve` runs the aggregator,
//! `fedsb join` a native participant, `fedsb export`, `fedsb eval` and
//! `fedsb merge` take the trained model out, measure it and make it a plain
//! Hugging Face model. `fedsb --help` lists everything.
mod average_cmd;
mod checks;
mod data_args;
mod dp_training;
mod embed_cmd;
mod eval_cmd;
mod export_cmd;
mod init_cmd;
mod join_cmd;
mod merge_cmd;
mod participant;
mod privacy_cmd;
mod sim_cmd;
mod train_cmd;

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fedsb_aggregator::config::Config;
use fedsb_aggregator::server::Server;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "fedsb",
    version,
    about = "Federated LoRA-SB fine-tuning: aggregator and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the aggregator for one task: HTTP, WebSocket, rounds, persistence.
    Serve(ServeArgs),
    /// Differential-privacy accounting: epsilon from sigma, sigma from epsilon.
    #[command(subcommand)]
    Privacy(privacy_cmd::PrivacyCommand),
    /// Mean-pooled sentence embeddings on the GPU, one JSON line per text.
    Embed(embed_cmd::EmbedArgs),
    /// Centralized LoRA-SB training on the GPU, with evaluation.
    Train(train_cmd::TrainArgs),
    /// LoRA-SB initialization from seed data: writes the task's adapter file.
    Init(init_cmd::InitArgs),
    /// Join a task as a native participant: train on local data, send R.
    Join(join_cmd::JoinArgs),
    /// Simulate a federated run (N participants and the aggregator) on one GPU.
    Sim(sim_cmd::SimArgs),
    /// Write a committed global model of a task (A, B, R, head) to an adapter file.
    Export(export_cmd::ExportArgs),
    /// Accuracy and loss of an adapter file on labelled data, on the GPU.
    Eval(eval_cmd::EvalArgs),
    /// Merge an adapter file into its base model: a plain Hugging Face model directory.
    Merge(merge_cmd::MergeArgs),
    /// The mean of adapter files with the same A and B (checkpoints, rounds).
    Average(average_cmd::AverageArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Task configuration (TOML); see configs/sst2-demo.toml.
    #[arg(long)]
    config: PathBuf,
    /// TCP port (0 picks a free one); overrides [server] port.
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on; overrides [server] bind.
    #[arg(long)]
    bind: Option<IpAddr>,
    /// Directory of the SQLite state; overrides [server] state_dir.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Directory of the web page; overrides [server] www_dir.
    #[arg(long)]
    www_dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: log files and pipes get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(args),
        Command::Privacy(cmd) => privacy_cmd::run(cmd),
        Command::Embed(args) => embed_cmd::run(args),
        Command::Train(args) => train_cmd::run(args),
        Command::Init(args) => init_cmd::run(args),
        Command::Join(args) => join_cmd::run(args),
        Command::Sim(args) => sim_cmd::run(args),
        Command::Export(args) => export_cmd::run(args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Merge(args) => merge_cmd::run(args),
        Command::Average(args) => average_cmd::run(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = Config::load(&args.config)?;
    if let Some(p) = args.port {
        config.server.port = p;
    }
    if let Some(b) = args.bind {
        config.server.bind = b;
    }
    if let Some(d) = args.state_dir {
        config.server.state_dir = d;
    }
    if let Some(w) = args.www_dir {
        config.server.www_dir = w;
    }
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = Server::start(config).await?;
        let status = server.app.status.borrow().clone();
        // The first line on stdout is the URL; scripts and tests read it. A
        // closed stdout must not stop the server, so write errors are ignored.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fedsb listening on http://{}/", server.addr);
        let _ = writeln!(
            out,
            "task {} round {} of {} (state in {})",
            status.task_id,
            match (status.round, status.state) {
                (Some(r), _) => r.to_string(),
                (None, "initializing") => "0 (federated initialization)".to_string(),
                (None, _) => "finished".to_string(),
            },
            status.total_rounds,
            server.app.store.path().display()
        );
        let _ = out.flush();
        drop(out);
        server.run(shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
