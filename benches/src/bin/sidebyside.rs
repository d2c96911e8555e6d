//! `sidebyside SCENARIO|all|update-docs [--size 2G] [--quick]`: see the
//! `benches` crate doc.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use benches::{parse_size, report, scenario, Ctx};
use clap::Parser;

/// Measure us against restic, borg, qemu-img and qemu-storage-daemon.
#[derive(Debug, Parser)]
#[command(name = "sidebyside")]
struct Args {
    /// Scenario (ingest, chunk-size, restore, io, startup, boot, migrate, protect,
    /// s3, s3-ingest, ...),
    /// `all`, `criterion` to tabulate the last `cargo bench` results, or
    /// `update-docs` to splice the last results into docs/BENCHMARKS.md.
    scenario: String,
    /// Image size (default per scenario: 2G, io and startup 1G).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Small images and short runs: a smoke test, not a measurement.
    #[arg(long)]
    quick: bool,
    /// Do not drop the page cache before timed runs.
    #[arg(long)]
    warm: bool,
    /// Seconds per I/O case (default 5, --quick 1).
    #[arg(long)]
    duration: Option<f64>,
    /// Repetitions of short measurements (default 5, --quick 2).
    #[arg(long)]
    reps: Option<usize>,
    /// Rounds of the long scenarios (ingest, chunk-size, restore,
    /// migrate); tables show the median time (default 1).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Output directory for reports (default: target/sidebyside).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Scratch directory (default: OUT/work); needs ~10 GiB.
    #[arg(long)]
    work: Option<PathBuf>,
    /// criterion's output directory for `criterion` (default:
    /// $CARGO_TARGET_DIR/criterion or target/criterion).
    #[arg(long)]
    criterion_dir: Option<PathBuf>,
    /// The recovery-cli binary (default: next to this one).
    #[arg(long, env = "RECOVERY_CLI")]
    cli: Option<PathBuf>,
}

impl TryFrom<Args> for Ctx {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Ctx> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("workspace root")?
            .to_path_buf();
        let out = a.out.unwrap_or_else(|| root.join("target/sidebyside"));
        let work = a.work.unwrap_or_else(|| out.join("work"));
        let cli = match a.cli {
            Some(cli) => cli,
            None => std::env::current_exe()?
                .parent()
                .context("executable directory")?
                .join("recovery-cli"),
        };
        if !["update-docs", "criterion"].contains(&a.scenario.as_str()) && !cli.exists() {
            bail!(
                "{} not found: build it with `cargo build --release -p recovery-cli` \
                 (same target dir) or pass --cli",
                cli.display()
            );
        }
        Ok(Ctx {
            images: out.join("images"),
            root,
            out,
            work,
            cli,
            size: a.size,
            quick: a.quick,
            drop_caches: !a.warm,
            duration: a.duration.unwrap_or(if a.quick { 1.0 } else { 5.0 }),
            rounds: a.rounds.max(1),
            reps: a.reps.unwrap_or(if a.quick { 2 } else { 5 }).max(1),
        })
    }
}

fn update_docs(ctx: &Ctx) -> anyhow::Result<()> {
    let path = ctx.root.join("docs/BENCHMARKS.md");
    let mut doc =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let names = scenario::ALL
        .iter()
        .flat_map(|n| [n.to_string(), format!("{n}-warm")])
        .chain(["criterion".to_string()]);
    for name in names {
        let md = ctx.out.join(format!("{name}.md"));
        let Ok(body) = std::fs::read_to_string(&md) else {
            continue;
        };
        match report::splice(&doc, &name, &body) {
            Some(new) => {
                doc = new;
                eprintln!("update-docs: {name} from {}", md.display());
            }
            None => eprintln!("update-docs: no markers for {name} in {}", path.display()),
        }
    }
    std::fs::write(&path, doc)?;
    eprintln!("updated {}", path.display());
    Ok(())
}

fn criterion(ctx: &Ctx, dir: &Path) -> anyhow::Result<()> {
    let benches = benches::microbench::collect(dir);
    if benches.is_empty() {
        bail!(
            "no criterion results in {}: run `cargo bench -p benches`",
            dir.display()
        );
    }
    let mut report = report::Report::new("criterion", "in-process, inputs in memory or page cache");
    report.tables.push(benches::microbench::table(&benches));
    println!("{}", report.finish(&ctx.out)?);
    Ok(())
}

fn run(scenario_name: &str, ctx: &Ctx, criterion_dir: &Path) -> anyhow::Result<()> {
    if scenario_name == "update-docs" {
        return update_docs(ctx);
    }
    if scenario_name == "criterion" {
        return criterion(ctx, criterion_dir);
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: debug build; use --release for real numbers");
    }
    let names: Vec<&str> = if scenario_name == "all" {
        scenario::ALL.to_vec()
    } else {
        vec![scenario_name]
    };
    let mut failed = Vec::new();
    for name in names {
        eprintln!("=== {name}");
        match scenario::run(name, ctx).and_then(|r| r.finish(&ctx.out)) {
            Ok(md) => println!("## {name}\n\n{md}"),
            Err(e) => {
                eprintln!("error: scenario {name}: {e:#}");
                failed.push(name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("failed scenarios: {}", failed.join(", "));
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let name = args.scenario.clone();
    let criterion_dir = args.criterion_dir.clone().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
            .join("criterion")
    });
    let ctx = match Ctx::try_from(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match run(&name, &ctx, &criterion_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
