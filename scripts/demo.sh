#!/usr/bin/env bash
# The main job, end to end, on a fresh machine:
#
#   1. back up a guest disk into a deduplicating chunk store;
#   2. boot the guest instantly from the store (vhost-user-blk, QEMU/TCG),
#      while it keeps writing, and migrate its disk to a raw "production"
#      file in the background, with a live progress bar;
#   3. boot the migrated file on its own, without the store or the daemon.
#
# Installs what is missing (QEMU, qemu-utils, busybox, e2fsprogs, a guest
# kernel), builds recovery-cli in release mode. Work files go to a temp dir
# (kept with KEEP=1).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

scripts/install-deps.sh
cargo build --release -p recovery-cli
CLI=${CARGO_TARGET_DIR:-$REPO/target}/release/recovery-cli
scripts/build-guest.sh
GUEST=$REPO/.guest-cache

WORK=$(mktemp -d "${TMPDIR:-/tmp}/recovery-demo.XXXXXX")
DAEMON_PID=
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
STORE=$WORK/store
STATE=$WORK/state
TARGET=$WORK/production.raw

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Back up the guest's root disk into a new store"
cp "$GUEST/root.img" "$WORK/guest.img"
"$CLI" init "$STORE"
"$CLI" backup --store "$STORE" --name guest "$WORK/guest.img"
rm "$WORK/guest.img"
"$CLI" snapshots --store "$STORE"

say "Boot it instantly from the store, migrating to $TARGET"
# The guest runs a write-and-verify loop on its disk while the copier moves
# every chunk to the target (rate-limited so the progress is watchable).
# The daemon launches QEMU itself (--qemu) and exits once QEMU has powered
# off and the migration is complete.
"$CLI" instant-boot --store "$STORE" guest \
    --socket "$WORK/vhost.sock" --state "$STATE" --target "$TARGET" \
    --copy-rate 2M --queues 1 --qemu -- \
    -accel tcg -smp 1 -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$WORK/console.log" \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "$(cat "$GUEST/cmdline") guestmode=loop guestiters=30" \
    >"$WORK/daemon.out" 2>"$WORK/daemon.log" &
DAEMON_PID=$!
for _ in $(seq 100); do
    [ -S "$STATE/control.sock" ] && break
    sleep 0.1
done
sed -n '1,3p' "$WORK/daemon.out"

say "Migration progress (recovery-cli status --watch)"
"$CLI" status --control "$STATE/control.sock" --watch --interval 250ms
"$CLI" status --control "$STATE/control.sock"

say "The guest, which ran from the store meanwhile"
wait "$DAEMON_PID"
DAEMON_PID=
grep -E 'PAYLOAD|DISK-SERIAL|LOOP-DONE|WROTE-BOOT|GUEST-DONE' "$WORK/console.log" || true
if grep -q 'LOOP .* BAD' "$WORK/console.log"; then
    echo "the guest saw bad data" >&2
    exit 1
fi

say "The target is a plain raw disk: check it and boot it alone"
e2fsck -fn "$TARGET"
qemu-system-x86_64 -accel tcg -machine q35 -m 512 -smp 1 -nodefaults -no-user-config \
    -display none -no-reboot -serial "file:$WORK/console2.log" \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "$(cat "$GUEST/cmdline")" \
    -drive "file=$TARGET,format=raw,if=virtio,cache=unsafe"
grep -E 'PAYLOAD|SAW-BOOTS|WROTE-BOOT|GUEST-DONE' "$WORK/console2.log"
grep -q 'SAW-BOOTS: boot-1.txt' "$WORK/console2.log"
say "Done: the disk now lives on $TARGET, and it boots without us"
