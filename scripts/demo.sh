#!/usr/bin/env bash
# End-to-end demo: back up a guest disk, boot it instantly from the store,
# migrate it to production storage while the progress bar runs.
#
# Minimal for now: installs dependencies, builds recovery-cli and the test
# guest, backs up the guest's root disk into a fresh store and lists the
# snapshot. Instant boot and migration are added as they land.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

scripts/install-deps.sh
cargo build --release -p recovery-cli
CLI=${CARGO_TARGET_DIR:-$REPO/target}/release/recovery-cli
scripts/build-guest.sh
GUEST=$REPO/.guest-cache

WORK=$(mktemp -d "${TMPDIR:-/tmp}/recovery-demo.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STORE=$WORK/store

echo
echo "== init a store in $STORE"
"$CLI" init "$STORE"
echo
echo "== back up the guest root disk ($(du -h --apparent-size "$GUEST/root.img" | cut -f1))"
"$CLI" backup --store "$STORE" --name guest "$GUEST/root.img"
echo
echo "== snapshots"
"$CLI" snapshots --store "$STORE"
