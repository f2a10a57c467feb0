//! `fedsb privacy ...` (being written).

/// Privacy accounting subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PrivacyCommand {}

/// Runs a privacy subcommand.
pub fn run(cmd: PrivacyCommand) -> anyhow::Result<()> {
    match cmd {}
}
