//! The `fedsb` command-line tool: `fedsb serve` runs the aggregator,
//! `fedsb join` a native participant, `fedsb export`, `fedsb eval` and
//! `fedsb merge` take the trained model out, measure it and make it a plain
//! Hugging Face model. `fedsb --help` lists everything.
mod average_cmd;
mod checks;
mod data_args;
#[cfg(test)]
mod doc_commands;
mod dp_training;
mod embed_cmd;
mod eval_cmd;
mod export_cmd;
mod init_cmd;
mod join_cmd;
mod merge_cmd;
mod participant;
mod privacy_cmd;
mod signals;
mod sim_cmd;
mod train_cmd;

use std::io::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use fedsb_aggregator::config::Config;
use fedsb_aggregator::server::{Server, WwwDir};
use signals::Signals;
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
    /// Merge an adapter file into its base model: a plain Hugging Face model directory (--peft: a PEFT LoRA adapter).
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
    /// Check the configuration and everything a start reads (page, demo
    /// data, files and their hashes, initial model, eval set, GPU adapter,
    /// the state read-only and its pinned files, the address), print what
    /// was found, and exit: 0 when a start would pass these checks, 1 with
    /// the start's error otherwise. Writes nothing; safe beside a running
    /// server.
    #[arg(long)]
    check: bool,
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
    let cli = parse_cli();
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

/// [`Cli::parse`], except that an option's value may be a negative number
/// in every subcommand: `--lr -1` is `--lr=-1`, which the command's own
/// check then names, not clap's "unexpected argument '-1'". Help, version
/// and usage errors are clap's, with its exit statuses.
fn parse_cli() -> Cli {
    let mut matches = with_negative_numbers(Cli::command()).get_matches();
    Cli::from_arg_matches_mut(&mut matches).unwrap_or_else(|e| e.format(&mut Cli::command()).exit())
}

/// `command` and its subcommands taking negative numbers as values. Clap's
/// test for one misses negative exponents and infinities (`-2.5e-4`,
/// `-inf`), so a float option takes any value that starts with `-`: a flag
/// given as its value (`--lr --json`) is then clap's "invalid value" error.
fn with_negative_numbers(command: clap::Command) -> clap::Command {
    use std::any::TypeId;
    let floats = [TypeId::of::<f64>(), TypeId::of::<f32>()];
    command
        .allow_negative_numbers(true)
        .mut_args(move |arg| {
            let value = arg.get_value_parser().type_id();
            if floats.iter().any(|&f| value == f) {
                arg.allow_hyphen_values(true)
            } else {
                arg
            }
        })
        .mut_subcommands(with_negative_numbers)
}

/// How long a stopping server waits for its evaluation thread to finish
/// the batch it is on and release the GPU (a batch takes about a second on
/// lavapipe, milliseconds on a GPU).
const EVALUATOR_STOP: std::time::Duration = std::time::Duration::from_secs(10);

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
    // `www` beside the configuration, as the configuration resolves it, is
    // the default: a missing one only warns. Any other was given.
    let default_www = args
        .config
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join("www");
    let www = match args.www_dir {
        Some(w) => {
            config.server.www_dir = w;
            WwwDir::Given
        }
        None if config.server.www_dir == default_www => WwwDir::Default,
        None => WwwDir::Given,
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    if args.check {
        let lines = runtime.block_on(Server::check(config, www))?;
        let mut out = std::io::stdout().lock();
        for line in lines {
            writeln!(out, "{line}")?;
        }
        writeln!(out, "configuration OK: {}", args.config.display())?;
        return Ok(());
    }
    let mut evaluator = None;
    let served = runtime.block_on(async {
        let server = Server::start(config, www).await?;
        evaluator = server.app.eval.clone();
        let status = server.app.status.borrow().clone();
        // The first line on stdout is the URL; scripts and tests read it. A
        // closed stdout must not stop the server, so write errors are ignored.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "fedsb listening on http://{}/", server.addr);
        let progress = match (status.round, status.state) {
            (Some(r), _) => format!("round {r} of {}", status.total_rounds),
            (None, "initializing") => format!(
                "round 0 of {} (federated initialization)",
                status.total_rounds
            ),
            (None, _) => format!("finished: all {} rounds committed", status.total_rounds),
        };
        let _ = writeln!(
            out,
            "task {} {progress} (state in {})",
            status.task_id,
            server.app.store.path().display()
        );
        let _ = out.flush();
        drop(out);
        server.run(shutdown_signal()).await?;
        anyhow::Ok(())
    });
    // The evaluation thread releases its GPU device before the process
    // exits (it uses the runtime to read rounds, so before that stops too).
    if let Some(evaluator) = evaluator {
        evaluator.stop(EVALUATOR_STOP);
    }
    // Blocking tasks still running (a database call) do not hold the exit up.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// Resolves on the first Ctrl-C or SIGTERM; a second one exits the process
/// at once, without waiting for the graceful shutdown.
async fn shutdown_signal() {
    let mut signals = Signals::new();
    let (first, _) = signals.next().await;
    tracing::info!(
        signal = first,
        grace_seconds = fedsb_aggregator::server::SHUTDOWN_GRACE.as_secs(),
        "shutting down; a second signal exits at once"
    );
    tokio::spawn(async move {
        let (second, status) = signals.next().await;
        tracing::warn!(signal = second, "second signal: exiting now");
        std::process::exit(status);
    });
}
