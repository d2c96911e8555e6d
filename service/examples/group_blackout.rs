//! Group blackout against the number of VMs: real QEMUs (`-M none`, one
//! 64 MiB qcow2 disk each, written through QEMU between points), a full
//! group point first, then `ROUNDS` incremental ones; prints the median and
//! the worst group blackout (first `stop` to last `cont`) per VM count.
//!
//! `cargo run --release -p service --example group_blackout`

use std::sync::atomic::AtomicBool;

use hypervisor::qmp::Qmp;
use hypervisor::testing;
use serde_json::json;
use service::{backup, Plan};

const ROUNDS: usize = 7;

fn main() {
    if !testing::require_qemu() {
        return;
    }
    println!("vms  median_ms  max_ms  per-VM median_ms");
    for n in 1..=3 {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        store::Store::init(&d.join("store"), 65536).unwrap();
        let mut procs = Vec::new();
        let mut text = format!(
            "service = \"bench\"\nrpo = \"1h\"\nstore = \"{}\"\nscratch = \"{}\"\n",
            d.join("store").display(),
            d.display()
        );
        for i in 0..n {
            let img = d.join(format!("vm{i}.qcow2"));
            testing::qemu_img_create(&img, "qcow2", 64 << 20);
            testing::qemu_io(&img, "qcow2", &["write -P 7 0 16M"]);
            let qmp = d.join(format!("vm{i}.qmp"));
            procs.push(testing::qemu_none(
                &qmp,
                &testing::blockdev_args(&img, "qcow2", "disk0"),
            ));
            text.push_str(&format!(
                "[[vm]]\nname = \"vm{i}\"\nqmp = \"{}\"\ndisks = [ {{ drive = \"disk0\" }} ]\n",
                qmp.display()
            ));
        }
        let plan = Plan::parse(&d.join("bench.toml"), &text).unwrap();
        let abort = AtomicBool::new(false);
        let opts = backup::Options {
            abort: &abort,
            threads: None,
            full: false,
            rate: hypervisor::pacing::Rate::Fixed(0),
        };
        backup::run(&plan, &opts).unwrap();
        let mut group = Vec::new();
        let mut per_vm = Vec::new();
        for r in 0..ROUNDS {
            for i in 0..n {
                let cmd = format!("qemu-io disk0 \"write -P {} {}M 64k\"", r + 1, r * 2);
                Qmp::connect(&d.join(format!("vm{i}.qmp")))
                    .unwrap()
                    .execute_value(
                        "human-monitor-command",
                        Some(json!({ "command-line": cmd })),
                    )
                    .unwrap();
            }
            let g = backup::run(&plan, &opts).unwrap();
            group.push(g.blackout_ms);
            per_vm.extend(g.members.iter().map(|m| m.report.blackout_ms));
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let max = group.iter().copied().fold(0.0, f64::max);
        println!(
            "{n:>3}  {:>9.1}  {max:>6.1}  {:>8.1}",
            median(&mut group),
            median(&mut per_vm)
        );
        drop(procs);
    }
}
