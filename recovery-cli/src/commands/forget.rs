//! `recovery-cli forget --store STORE SNAPSHOT [--force] [--json]`
//! `recovery-cli forget --store STORE NAME --keep-within 1h --keep-last N
//!   --keep-hourly 24 --keep-daily 7 --keep-weekly 4 --keep-monthly M
//!   --keep-yearly Y [--dry-run] [--json]`
//!
//! With `--keep-*`, restic's retention policy (see `store::retention`) is
//! applied to every snapshot of image NAME, backups and protection points
//! alike: the union of the policies is kept, the rest forgotten; held
//! snapshots are kept and reported. Counts take `unlimited`.
//!
//! A member snapshot of a live group point (`backup --plan`) is refused
//! unless `--force`: groups go as a whole with `forget --plan`.
//!
//! A held snapshot (an instant-boot state dir depends on it) is refused,
//! naming the holders, unless `--force`; even then gc keeps it while it is
//! held, and `unforget` brings it back.

use std::path::PathBuf;

use store::retention::{KeepPolicy, UNLIMITED};

use super::{open_store, StoreArg};
use crate::output;

/// Arguments of `forget`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub store: StoreArg,
    /// Snapshot: NAME (newest), NAME@ID or ID.
    pub snapshot: String,
    /// Forget it even if it is held (gc still keeps it while held).
    #[arg(long)]
    pub force: bool,
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<String>,
    /// Keep the newest snapshot of each of the N newest hours with one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<String>,
    /// Keep the newest snapshot of each of the N newest days with one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<String>,
    /// Keep the newest snapshot of each of the N newest ISO weeks with one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<String>,
    /// Keep the newest snapshot of each of the N newest months with one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<String>,
    /// Keep the newest snapshot of each of the N newest years with one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<String>,
    /// Keep every snapshot newer than the newest one minus DURATION (1h, 2d).
    #[arg(long, value_name = "DURATION")]
    pub keep_within: Option<String>,
    /// With --keep-*: print what would be kept and removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the forgotten snapshot as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Validated `forget` configuration.
#[derive(Debug)]
pub struct Config {
    pub store: PathBuf,
    pub snapshot: String,
    pub force: bool,
    /// `--keep-*` given: apply the retention policy to image `snapshot`.
    pub policy: Option<KeepPolicy>,
    pub dry_run: bool,
    pub json: bool,
}

fn count(flag: &str, v: Option<String>) -> anyhow::Result<Option<u64>> {
    v.map(|v| match v.as_str() {
        "unlimited" => Ok(UNLIMITED),
        _ => v
            .parse::<u64>()
            .map_err(|_| anyhow::anyhow!("Invalid --{flag} {v:?}: use a count or 'unlimited'")),
    })
    .transpose()
}

impl TryFrom<Args> for Config {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> anyhow::Result<Config> {
        let policy = KeepPolicy {
            last: count("keep-last", a.keep_last)?,
            hourly: count("keep-hourly", a.keep_hourly)?,
            daily: count("keep-daily", a.keep_daily)?,
            weekly: count("keep-weekly", a.keep_weekly)?,
            monthly: count("keep-monthly", a.keep_monthly)?,
            yearly: count("keep-yearly", a.keep_yearly)?,
            within: a
                .keep_within
                .map(|d| store::point::parse_duration(&d))
                .transpose()?,
        };
        let policy = (!policy.is_empty()).then_some(policy);
        match &policy {
            Some(_) => {
                if a.force {
                    anyhow::bail!(
                        "--force cannot be combined with --keep-*: held snapshots are always kept"
                    );
                }
                store::snapshot::validate_name(&a.snapshot).map_err(|_| {
                    anyhow::anyhow!("--keep-* takes an image NAME, not {:?}", a.snapshot)
                })?;
            }
            None if a.dry_run => anyhow::bail!("--dry-run needs a --keep-* option"),
            None => {}
        }
        Ok(Config {
            store: a.store.store,
            snapshot: a.snapshot,
            force: a.force,
            policy,
            dry_run: a.dry_run,
            json: a.json,
        })
    }
}

/// Forget the snapshot.
pub fn run(c: Config) -> anyhow::Result<()> {
    let s = open_store(&c.store)?;
    if let Some(policy) = &c.policy {
        return retention(&s, &c, policy);
    }
    // A member of a live group point: forgetting it alone would split the
    // group (`forget --plan` removes groups whole).
    let target = s.resolve(&c.snapshot)?;
    if let Some(g) = s.group_of(&target.reference())? {
        if !c.force {
            anyhow::bail!(
                "{} is a member of group point {}: forgetting it alone would split the group; \
                 use `forget --plan` (or --force)",
                target.reference(),
                g.reference()
            );
        }
    }
    let info = s.forget_with(&c.snapshot, c.force)?;
    let holds = s.holds(Some(&info.reference()))?;
    if c.json {
        let mut v = serde_json::to_value(&info)?;
        v["snapshot"] = info.reference().into();
        v["holds"] = serde_json::to_value(&holds)?;
        return output::json(&v);
    }
    if holds.is_empty() {
        output::line(&format!(
            "Forgot {} (run gc to reclaim its space; `unforget {}` brings it back until then)",
            info.reference(),
            info.reference()
        ))
    } else {
        output::line(&format!(
            "Forgot {}; it is still held by {}, so gc keeps it until the hold is removed (`unforget {}` brings it back)",
            info.reference(),
            holds
                .iter()
                .map(|h| h.info.holder.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            info.reference()
        ))
    }
}

/// `--keep-*`: plan, print, apply.
fn retention(s: &store::Store, c: &Config, policy: &KeepPolicy) -> anyhow::Result<()> {
    let mut plan = s.plan_retention(&c.snapshot, policy)?;
    // Members of live group points are kept: a group goes as a whole
    // (`forget --plan`).
    for d in plan.iter_mut().filter(|d| !d.keep) {
        if let Some(g) = s.group_of(&d.snapshot)? {
            d.keep = true;
            d.reasons = vec![format!("member of group point {}", g.reference())];
        }
    }
    let removed = if c.dry_run {
        0
    } else {
        s.apply_retention(&plan)?
    };
    if c.json {
        return output::json(&serde_json::json!({
            "name": c.snapshot,
            "dry_run": c.dry_run,
            "keep": plan.iter().filter(|d| d.keep).collect::<Vec<_>>(),
            "remove": plan.iter().filter(|d| !d.keep).collect::<Vec<_>>(),
        }));
    }
    let kept = plan.iter().filter(|d| d.keep).count();
    for d in &plan {
        let what = if d.keep { "keep  " } else { "remove" };
        let line = format!(
            "{what} {} {} {}",
            d.snapshot,
            d.created,
            d.reasons.join(", ")
        );
        output::line(line.trim_end())?;
    }
    let gone = plan.len() - kept;
    output::line(&if c.dry_run {
        format!(
            "Dry run: would keep {kept} and remove {gone} snapshots of {}",
            c.snapshot
        )
    } else {
        format!(
            "Kept {kept} and forgot {removed} snapshots of {} (run gc to reclaim their space)",
            c.snapshot
        )
    })
}
