//! The `fedsb` command-line tool.
mod privacy_cmd;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "fedsb", version, about = "Federated LoRA-SB fine-tuning: aggregator and tools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Differential-privacy accounting: epsilon from sigma, sigma from epsilon.
    #[command(subcommand)]
    Privacy(privacy_cmd::PrivacyCommand),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Privacy(cmd) => privacy_cmd::run(cmd),
    }
}
