//! `recovery-cli`: back up VM disk images into a dedup chunk store, restore
//! them, and (later) boot them instantly.
//!
//! Each command is one module under [`commands`] with the same shape:
//! clap `Args` → `TryFrom<Args> for Config` (validation) → `run(Config)`.
//! The binary (`main.rs`) only parses, installs logging and prints errors.
#![forbid(unsafe_code)]

pub mod commands;
pub mod output;

use clap::Parser;

/// Instant-recovery VM boot service.
#[derive(Debug, Parser)]
#[command(name = "recovery-cli", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: commands::Command,
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    cli.command.run()
}
