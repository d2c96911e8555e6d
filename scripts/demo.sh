#!/usr/bin/env bash
# The main job, end to end, on a fresh machine:
#
#   1. back up a running guest into a deduplicating chunk store (a full
#      and an incremental backup through QMP, while it writes);
#   2. boot the guest instantly from the store (vhost-user-blk, QEMU/TCG)
#      and migrate its disk to a raw "production" file in the background,
#      with a live progress bar, while the guest keeps writing: writes to
#      chunks not migrated yet go through the overlay, the others straight
#      to the target;
#   3. protect it continuously meanwhile: a protection point of the disk
#      the guest sees every 2 s (changed chunks only), so any moment of the
#      run can come back: restore one from the middle of the migration;
#   4. boot the migrated file on its own, without the store or the daemon.
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
QEMU_PID=
cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null || true
    [ -n "$QEMU_PID" ] && kill "$QEMU_PID" 2>/dev/null || true
    if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
STORE=$WORK/store
STATE=$WORK/state
TARGET=$WORK/production.raw

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "Back up the guest while it runs (QMP: image fleecing + a dirty bitmap)"
# The guest boots from a qcow2 copy of its disk and writes numbered,
# fsynced files; two backups are taken under it: a full one, then an
# incremental that reads only what changed. It pauses only for the start.
qemu-img convert -O qcow2 "$GUEST/root.img" "$WORK/guest.qcow2"
qemu-system-x86_64 -accel tcg -machine q35 -m 512 -smp 1 -nodefaults -no-user-config \
    -display none -no-reboot -serial "file:$WORK/running.log" \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "$(cat "$GUEST/cmdline") guestmode=files" \
    -blockdev "driver=file,node-name=disk0-file,filename=$WORK/guest.qcow2" \
    -blockdev driver=qcow2,node-name=disk0,file=disk0-file \
    -device virtio-blk-pci,drive=disk0 \
    -qmp "unix:$WORK/qmp.sock,server=on,wait=off" &
QEMU_PID=$!
wait_line() {
    for _ in $(seq 1500); do
        grep -q "$1" "$WORK/running.log" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "the running guest never printed $1" >&2
    return 1
}
wait_line '^FILE 5 '
"$CLI" init "$STORE"
"$CLI" backup --store "$STORE" --name guest --qmp "$WORK/qmp.sock" --drive disk0 --scratch "$WORK"
wait_line '^FILE 40 '
"$CLI" backup --store "$STORE" --name guest --qmp "$WORK/qmp.sock" --drive disk0 --scratch "$WORK"
kill "$QEMU_PID"
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=
rm "$WORK/guest.qcow2"
"$CLI" snapshots --store "$STORE"

say "Boot it instantly from the store, migrating to $TARGET"
# The guest runs a write-and-verify loop on its disk while the copier moves
# every chunk to the target. The copy rate is low (256 KiB/s: the guest's
# ~6 MiB of data, plus what it writes meanwhile, take 30 to 60 s), so the
# guest boots and runs its loop while the migration runs; should the
# migration still run when the guest has verified 120 rounds, the demo
# lifts the limit (set-rate), so it ends while the guest keeps writing. The daemon
# launches QEMU itself (--qemu) and exits once QEMU has powered off and
# the migration is complete.
"$CLI" instant-boot --store "$STORE" guest \
    --socket "$WORK/vhost.sock" --state "$STATE" --target "$TARGET" \
    --copy-rate 256K --queues 1 --protect --protect-every 2s --qemu -- \
    -accel tcg -smp 1 -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$WORK/console.log" \
    -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" \
    -append "$(cat "$GUEST/cmdline") guestmode=loop guestiters=200" \
    >"$WORK/daemon.out" 2>"$WORK/daemon.log" &
DAEMON_PID=$!
for _ in $(seq 100); do
    [ -S "$STATE/control.sock" ] && break
    sleep 0.1
done
sed -n '1,3p' "$WORK/daemon.out"
CONTROL=$STATE/control.sock

# Every status while migrating, for the summary below.
"$CLI" status --control "$CONTROL" --watch --json --interval 1s >"$WORK/status.jsonl" &
JSON_PID=$!
# Lift the limit once the guest has written and verified 120 rounds while
# the migration runs (or after 5 minutes).
(
    for _ in $(seq 1500); do
        grep -q '^LOOP 120 ' "$WORK/console.log" 2>/dev/null && break
        sleep 0.2
    done
    "$CLI" set-rate --control "$CONTROL" unlimited >/dev/null || true
) &
RATE_PID=$!

say "Migration progress (recovery-cli status --watch)"
INTERVAL=250ms
[ -t 1 ] || INTERVAL=5s
"$CLI" status --control "$CONTROL" --watch --interval "$INTERVAL"
ROUNDS=$(grep -c '^LOOP .* OK' "$WORK/console.log" || true)
kill "$RATE_PID" 2>/dev/null || true
wait "$RATE_PID" 2>/dev/null || true
wait "$JSON_PID"
"$CLI" status --control "$CONTROL" 2>/dev/null || true

# The last status while migrating (the line that says complete).
field() { grep -o "\"$1\":[0-9.]*" "$WORK/status.jsonl" | tail -1 | cut -d: -f2; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
say "What happened during the migration"
echo "copied to the target:     $(mib "$(field bytes_copied)") of data"
echo "skipped (zero chunks):    $(mib "$(field bytes_skipped)")"
echo "guest writes:             $(field guest_write_ops) requests, $(mib "$(field guest_write_bytes)")"
echo "  through the overlay:    $(mib "$(field overlay_write_bytes)") (their chunk was not on the target yet)"
echo "guest loop rounds verified by then: $ROUNDS"
echo "protection points:        $(field points_written) written meanwhile, RPO $(awk -v s="$(field rpo_seconds)" 'BEGIN { printf "%.1f s", s }') at the end"
if [ "$(field overlay_write_bytes)" -eq 0 ]; then
    echo "the guest wrote nothing through the overlay: no overlap with the migration" >&2
    exit 1
fi

say "The guest, which ran from the store meanwhile"
wait "$DAEMON_PID"
DAEMON_PID=
# The daemon's own log at the default level: journal, progress, state.
grep -E 'live journal|migration' "$WORK/daemon.log" | sed 's/^[^ ]* *//' | head -8 || true
grep -E 'PAYLOAD|DISK-SERIAL|LOOP-DONE|WROTE-BOOT|GUEST-DONE' "$WORK/console.log" || true
if grep -q 'LOOP .* BAD' "$WORK/console.log"; then
    echo "the guest saw bad data" >&2
    exit 1
fi

say "Continuous protection: a point every 2 s while the guest ran (recovery-cli snapshots)"
# Points are ordinary snapshots of the image: deltas on the previous point.
"$CLI" snapshots --store "$STORE" guest | tail -n 6
read -r POINTS MID < <("$CLI" snapshots --store "$STORE" guest --json | python3 -c '
import json, sys
snaps = json.load(sys.stdin)
print(len(snaps), snaps[len(snaps) * 3 // 4]["created"])')
"$CLI" restore --store "$STORE" guest --at "$MID" "$WORK/point.raw"
e2fsck -fy "$WORK/point.raw" >/dev/null 2>&1 || [ $? -lt 4 ]
e2fsck -fn "$WORK/point.raw"
echo "$POINTS snapshots of guest in the store; the one at $MID restored and checked"

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
