//! The scenarios, one module each. Every scenario returns a [`Report`].

pub mod boot;
pub mod chunk_size;
pub mod drill;
pub mod ingest;
pub mod io;
pub mod live_backup;
pub mod live_guest;
pub mod migrate;
pub mod plan_boot;
pub mod protect;
pub mod restore;
pub mod s3;
pub mod s3_ingest;
pub mod startup;
pub mod virtnbd;

use crate::report::Report;
use crate::Ctx;

/// Scenario names, in the order `all` runs them.
pub const ALL: &[&str] = &[
    "ingest",
    "chunk-size",
    "restore",
    "io",
    "startup",
    "boot",
    "migrate",
    "plan-boot",
    "drill",
    "protect",
    "virtnbd",
    "live-backup",
    "live-backup-guest",
    "s3",
    "s3-ingest",
];

/// Runs scenario `name`.
pub fn run(name: &str, ctx: &Ctx) -> anyhow::Result<Report> {
    match name {
        "ingest" => ingest::run(ctx),
        "chunk-size" => chunk_size::run(ctx),
        "restore" => restore::run(ctx),
        "io" => io::run(ctx),
        "startup" => startup::run(ctx),
        "boot" => boot::run(ctx),
        "migrate" => migrate::run(ctx),
        "plan-boot" => plan_boot::run(ctx),
        "drill" => drill::run(ctx),
        "protect" => protect::run(ctx),
        "virtnbd" => virtnbd::run(ctx),
        "live-backup" => live_backup::run(ctx),
        "live-backup-guest" => live_guest::run(ctx),
        "s3" => s3::run(ctx),
        "s3-ingest" => s3_ingest::run(ctx),
        _ => anyhow::bail!("unknown scenario {name:?} (known: {})", ALL.join(", ")),
    }
}
