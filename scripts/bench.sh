#!/usr/bin/env bash
# Run the benchmarks and regenerate the tables in docs/BENCHMARKS.md.
#
#   scripts/bench.sh [SCENARIO...] [-- SIDEBYSIDE OPTIONS]
#
# With no scenario, runs every side-by-side scenario (ingest, chunk-size,
# restore, io, startup, boot, migrate), ingest and restore again with a
# warm page cache, then `cargo bench` (criterion).
# Each scenario prints a markdown table and writes target/sidebyside/
# SCENARIO.{md,json}; at the end the tables are spliced into
# docs/BENCHMARKS.md between its <!-- BEGIN/END SCENARIO --> markers.
#
# Options after `--` go to the harness, e.g. `-- --quick` for a smoke run
# (small images, short runs: do not commit those numbers) or `-- --warm`.
# BENCH_SKIP_CRITERION=1 skips `cargo bench`.
#
# Needs root for dropping the page cache between runs (otherwise the
# reports say "warm"), ~12 GiB free under target/, and the tools from
# scripts/install-deps.sh (restic, borg, qemu-img, qemu-storage-daemon,
# qemu-system-x86_64). Takes about 30 minutes on 2 cores.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

scenarios=()
while [[ $# -gt 0 && $1 != -- ]]; do
    scenarios+=("$1")
    shift
done
[[ ${1:-} == -- ]] && shift
[[ ${#scenarios[@]} -gt 0 ]] || scenarios=(all)

"$REPO/scripts/install-deps.sh"

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
cargo build --release -p recovery-cli
cargo build --release -p benches --bin sidebyside
SIDEBYSIDE=$CARGO_TARGET_DIR/release/sidebyside
OUT=$REPO/target/sidebyside

echo "machine: $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
status=0
run() { "$SIDEBYSIDE" "$@" --out "$OUT" --cli "$CARGO_TARGET_DIR/release/recovery-cli" || status=1; }
for s in "${scenarios[@]}"; do
    run "$s" "$@"
done
if [[ ${scenarios[*]} == all ]]; then
    # Backup and restore again with the inputs in the page cache: the CPU
    # cost without the disk (ingest-warm, restore-warm sections).
    run ingest --warm "$@"
    run restore --warm "$@"
fi
if [[ ${scenarios[*]} == all && ${BENCH_SKIP_CRITERION:-0} != 1 ]]; then
    cargo bench -p benches
    "$SIDEBYSIDE" criterion --out "$OUT" --criterion-dir "$CARGO_TARGET_DIR/criterion" || status=1
fi
"$SIDEBYSIDE" update-docs --out "$OUT"


exit $status
