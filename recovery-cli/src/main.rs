//! The `recovery-cli` binary: parse, set up logging, run, print errors.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use recovery_cli::Cli;
use tracing_subscriber::EnvFilter;

fn init_tracing() {
    // Bridge `log` records (rust-vmm crates) into tracing. The default
    // shows warnings, plus the daemon's progress and journal lines.
    let _ = tracing_log::LogTracer::init();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("warn,daemon::progress_log=info"));
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish();
    let _ = tracing::subscriber::set_global_default(subscriber);
}

fn main() -> ExitCode {
    // Usage errors: clap prints them and exits with status 2. `backup`,
    // `snapshots` and `forget` with --plan take no --store: their own parser.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let plan_cli = recovery_cli::commands::plan::dispatch(&args);
    let cli = match plan_cli {
        Some(_) => None,
        None => Some(Cli::parse_from(&args)),
    };
    init_tracing();
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error: {info}");
    }));
    let result = match (plan_cli, cli) {
        (Some(p), _) => p.run(),
        (None, Some(cli)) => recovery_cli::run(cli),
        (None, None) => unreachable!("one parser ran"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
