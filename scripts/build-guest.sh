#!/usr/bin/env bash
# Build the small test guest used by the QEMU boot tests and the demo.
#
#   scripts/build-guest.sh [CACHE_DIR]      (default: <repo>/.guest-cache)
#
# Outputs in CACHE_DIR:
#   vmlinuz            Debian cloud kernel (apt-get download, never installed)
#   initramfs.cpio.gz  static busybox + virtio modules; /init loads the
#                      modules, waits for root=, mounts it ext4 and
#                      switch_roots into the disk's /sbin/init
#   root.img           64 MiB ext4 root disk (template: copy it before
#                      booting, the guest writes to it). Its /sbin/init
#                      verifies /payload.bin against /payload.sha256, prints
#                      PAYLOAD-OK or PAYLOAD-BAD, lists earlier boot files
#                      (SAW-BOOTS: ...), writes /boot-<N>.txt, syncs, prints
#                      GUEST-DONE and powers off.
#   cmdline            the kernel command line to boot with
#
# Guest modes (kernel command line):
#   guestmode=check   (default) the checks above
#   guestmode=loop    the checks above, then a write-and-verify loop on
#                     /loop.dat (1 MiB of fresh random data per iteration,
#                     written with O_DIRECT and fsync'ed, then sync, drop
#                     caches, read back with O_DIRECT and compared with
#                     what was written), printing "LOOP-SUM <i> <sha256
#                     written>" then "LOOP <i> OK|BAD", for
#                     guestiters=<N> iterations (default 20, 0 = forever)
#                     or until the line "stop" arrives on the serial
#                     console; then LOOP-DONE <n>, GUEST-DONE, power off.
#                     guestwriters=<N> (default 1) runs N writers at once,
#                     the k-th (k >= 2) on /loop-<k>.dat, and the N
#                     read-backs at once too, so several requests are in
#                     flight together; each extra file prints
#                     "LOOP-FILE-SUM <i> /loop-<k>.dat <sha256>" before
#                     the result, which covers every file.
#   guestmode=files   the checks above, then numbered 16 KiB files
#                     /files/f-<i>, each fsync'ed and synced, then
#                     "FILE <i> <sha256>", until "stop" on the console;
#                     then FILES-DONE <n>, GUEST-DONE, power off.
#   guestmode=exec    the checks above, then the program guestexec=<path>
#                     (not part of this image: copy it in, e.g. with
#                     debugfs), console as stdin and stdout; then
#                     EXEC-EXIT <status> (or EXEC-MISSING <path>),
#                     GUEST-DONE, power off.
#   guestmode=serve   the checks above, then services for recovery drills
#                     until "stop" on the console: qemu-guest-agent on the
#                     virtio-serial port named org.qemu.guest_agent.0 (if
#                     QEMU gives one; QGA-STARTED <dev> or QGA-NONE), and on
#                     a virtio-net NIC (if any) 10.0.2.15/24 (QEMU's
#                     user-mode default) with two TCP services: on
#                     guestport=<N> (default 8080) one that sends the line
#                     "GUEST-SERVICE <kernel release>" and closes, on N+1 one
#                     that sends nothing and echoes what it reads
#                     (NET-UP <N> or NET-NONE); then SERVE-READY. Later
#                     GUEST-DONE, power off.
#
# Console markers (one per line, greppable):
#   GUEST-INIT <kernel release> mode=<mode>, DISK-SERIAL: <virtio-blk serial
#   or none>, PAYLOAD-OK | PAYLOAD-BAD, SAW-BOOTS: <files or none>,
#   WROTE-BOOT: boot-<N>.txt, LOOP-READY, LOOP-SUM <i> <sha256>,
#   LOOP-FILE-SUM <i> <file> <sha256>, LOOP <i> OK|BAD, LOOP-DONE <n>,
#   ROOT-RO (root remounted read-only, so e2fsck -fn is clean), GUEST-DONE,
#   EXEC-EXIT <status> | EXEC-MISSING <path>,
#   QGA-STARTED <dev> | QGA-NONE, NET-UP <port> | NET-NONE, SERVE-READY,
#   and INITRAMFS-FAIL: <why> when the initramfs cannot mount the root.
#
# Idempotent and cached: the kernel download is kept, and the images are
# rebuilt only when this script changes. Safe to run concurrently (flock).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${1:-$REPO/.guest-cache}
ROOT_SIZE_MIB=64
PAYLOAD_MIB=4
# no_timer_check: under load, TCG can miss the kernel's IO-APIC timer check
# ("IO-APIC + timer doesn't work") and panic at boot.
CMDLINE="console=ttyS0 root=/dev/vda rw quiet panic=-1 no_timer_check"
# Modules loaded by the initramfs, dependencies first (checked below
# against each module's own depends= list). virtio_console and virtio_net
# serve guestmode=serve (guest agent channel, drill network).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
    virtio_console failover net_failover virtio_net)

log() { echo "build-guest: $*" >&2; }
die() {
    log "error: $*"
    exit 1
}

mkdir -p "$CACHE"
CACHE=$(cd "$CACHE" && pwd)
exec 9>"$CACHE/.lock"
flock 9

STAMP=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)
if [[ -f $CACHE/.stamp && $(cat "$CACHE/.stamp") == "$STAMP" &&
    -f $CACHE/vmlinuz && -f $CACHE/initramfs.cpio.gz && -f $CACHE/root.img ]]; then
    log "up to date in $CACHE"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb cpio gzip mke2fs sha256sum flock; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing (run scripts/install-deps.sh)"
done
BUSYBOX=""
for candidate in /bin/busybox /usr/bin/busybox; do
    if [[ -x $candidate ]] && ! ldd "$candidate" >/dev/null 2>&1; then
        BUSYBOX=$candidate
        break
    fi
done
[[ -n $BUSYBOX ]] || die "static busybox not found (apt-get install busybox-static)"
# The guest agent (guestmode=serve) is the host's Debian qemu-ga with its
# shared libraries: the guest's root is a Debian 12 userland for it.
QEMU_GA=$(command -v qemu-ga || true)
[[ -n $QEMU_GA ]] || QEMU_GA=/usr/sbin/qemu-ga
[[ -x $QEMU_GA ]] || die "qemu-ga not found (apt-get install qemu-guest-agent)"

# --- Kernel -----------------------------------------------------------------
# Newest cloud kernel the meta package points at; cached by package name.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
if [[ -z $kpkg ]]; then
    # No package lists yet: fall back to any cached kernel.
    kpkg=$(find "$CACHE/kernel" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' 2>/dev/null | sort | tail -n1)
    [[ -n $kpkg ]] || die "cannot resolve linux-image-cloud-amd64 (apt-get update?)"
fi
KDIR=$CACHE/kernel/$kpkg
if [[ ! -f $KDIR/.complete ]]; then
    log "downloading $kpkg"
    rm -rf "$KDIR"
    mkdir -p "$KDIR/deb"
    (cd "$KDIR/deb" && apt-get download -q "$kpkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
        die "apt-get download $kpkg failed"
    dpkg-deb -x "$KDIR"/deb/*.deb "$KDIR/x"
    rm -rf "$KDIR/deb"
    touch "$KDIR/.complete"
fi
KREL=$(find "$KDIR/x/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n1)
[[ -n $KREL ]] || die "no modules directory in $kpkg"
MODDIR=$KDIR/x/lib/modules/$KREL

# --- Work area --------------------------------------------------------------
WORK=$(mktemp -d "$CACHE/.work.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# --- Initramfs --------------------------------------------------------------
INITRD=$WORK/initramfs
mkdir -p "$INITRD"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$BUSYBOX" "$INITRD/bin/busybox"
ln -s busybox "$INITRD/bin/sh"

module_path() {
    local name=$1 alt
    alt=${name//_/-}
    find "$MODDIR/kernel" \( -name "$name.ko" -o -name "$alt.ko" -o -name "$name.ko.*" -o -name "$alt.ko.*" \) | head -n1
}
module_depends() {
    # The depends= field of the module's .modinfo section.
    local ko=$1
    case $ko in
    *.ko.xz) xz -dc "$ko" ;;
    *.ko.zst) zstd -dc "$ko" ;;
    *.ko.gz) gzip -dc "$ko" ;;
    *) cat "$ko" ;;
    esac | tr '\0' '\n' | grep -a '^depends=' | head -n1 | cut -d= -f2 | tr ',' ' '
}
builtin_module() {
    local name=$1
    grep -qE "/(${name}|${name//_/-})\.ko$" "$MODDIR/modules.builtin"
}

ORDER=()
: >"$INITRD/modules.order"
loaded=" "
for m in "${MODULES[@]}"; do
    if builtin_module "$m"; then
        log "module $m is built in"
        continue
    fi
    ko=$(module_path "$m")
    [[ -n $ko ]] || die "module $m not found in $KREL"
    for dep in $(module_depends "$ko"); do
        [[ $loaded == *" $dep "* ]] || builtin_module "$dep" ||
            die "module $m depends on $dep, which is not loaded before it"
    done
    case $ko in
    *.ko.xz) xz -dc "$ko" >"$INITRD/lib/modules/$m.ko" ;;
    *.ko.zst) zstd -dc "$ko" >"$INITRD/lib/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$ko" >"$INITRD/lib/modules/$m.ko" ;;
    *) cp "$ko" "$INITRD/lib/modules/$m.ko" ;;
    esac
    echo "$m" >>"$INITRD/modules.order"
    ORDER+=("$m")
    loaded+="$m "
done
log "kernel $KREL, modules: ${ORDER[*]}"
grep -q '^CONFIG_EXT4_FS=y' "$KDIR/x/boot/config-$KREL" ||
    die "ext4 is not built into $KREL (add its modules to MODULES)"

cat >"$INITRD/init" <<'EOF'
#!/bin/sh
# Initramfs: load virtio modules, mount the ext4 root, switch_root into it.
export PATH=/bin
/bin/busybox --install -s /bin
fail() {
    echo "INITRAMFS-FAIL: $*"
    sync
    poweroff -f
}
mount -t devtmpfs devtmpfs /dev || fail "mount devtmpfs"
mount -t proc proc /proc || fail "mount proc"
mount -t sysfs sysfs /sys || fail "mount sysfs"
exec </dev/console >/dev/console 2>&1
while read -r m; do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done </modules.order
root=/dev/vda
for arg in $(cat /proc/cmdline); do
    case $arg in
    root=*) root=${arg#root=} ;;
    esac
done
i=0
while [ ! -b "$root" ]; do
    i=$((i + 1))
    [ $i -gt 600 ] && fail "$root did not appear"
    sleep 0.1
done
mount -t ext4 -o rw "$root" /newroot || fail "mount $root"
[ -x /newroot/sbin/init ] || fail "no /sbin/init on $root"
umount /proc
umount /sys
mount --move /dev /newroot/dev || fail "move /dev"
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$INITRD/init"
(cd "$INITRD" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) |
    gzip -6 >"$WORK/initramfs.cpio.gz"

# --- Root disk --------------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,etc}
cp "$BUSYBOX" "$ROOT/bin/busybox"
"$BUSYBOX" --list-full | while read -r applet; do
    [[ $applet == bin/busybox ]] && continue
    dir=$(dirname "$applet")
    rel=$(realpath -m --relative-to="/$dir" /bin/busybox)
    [[ -e $ROOT/$applet ]] || ln -s "$rel" "$ROOT/$applet"
done
[[ -e $ROOT/sbin/init ]] && rm -f "$ROOT/sbin/init"

# qemu-ga and the libraries it links (ldd's resolved paths, and the loader).
mkdir -p "$ROOT/usr/sbin"
cp "$QEMU_GA" "$ROOT/usr/sbin/qemu-ga"
ldd "$QEMU_GA" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | while read -r lib; do
    mkdir -p "$ROOT$(dirname "$lib")"
    cp -L "$lib" "$ROOT$lib"
done
cat >"$ROOT/usr/sbin/guest-service" <<'EOF'
#!/bin/sh
# One connection of the guest's TCP service (guestmode=serve).
echo "GUEST-SERVICE $(uname -r)"
EOF
chmod 755 "$ROOT/usr/sbin/guest-service"

head -c $((PAYLOAD_MIB * 1024 * 1024)) /dev/urandom >"$ROOT/payload.bin"
(cd "$ROOT" && sha256sum payload.bin >payload.sha256)
echo "guest root built $(date -u +%FT%TZ) kernel $KREL" >"$ROOT/etc/guest-release"

cat >"$ROOT/sbin/init" <<'EOF'
#!/bin/sh
# Test guest init: check the payload, record this boot, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

finish() {
    # Leave a clean file system (journal checkpointed, summary counts
    # written) so the host can e2fsck -fn the disk after power-off.
    sync
    if mount -o remount,ro / ; then
        echo "ROOT-RO"
    else
        echo "ROOT-RO-FAILED"
    fi
    sync
    echo "GUEST-DONE"
    poweroff -f
}

mode=check
iters=20
writers=1
for arg in $(cat /proc/cmdline); do
    case $arg in
    guestmode=*) mode=${arg#guestmode=} ;;
    guestiters=*) iters=${arg#guestiters=} ;;
    guestwriters=*) writers=${arg#guestwriters=} ;;
    esac
done

echo "GUEST-INIT $(uname -r) mode=$mode"
serial=$(cat /sys/block/vda/serial 2>/dev/null)
echo "DISK-SERIAL: ${serial:-none}"

if (cd / && sha256sum -c -s payload.sha256); then
    echo "PAYLOAD-OK"
else
    echo "PAYLOAD-BAD"
fi

seen=""
n=1
while [ -e "/boot-$n.txt" ]; do
    seen="$seen boot-$n.txt"
    n=$((n + 1))
done
seen=${seen# }
echo "SAW-BOOTS: ${seen:-none}"
{
    echo "boot $n"
    echo "mode: $mode"
    echo "seen: ${seen:-none}"
    echo "serial: ${serial:-none}"
} >"/boot-$n.txt"
sync
echo "WROTE-BOOT: boot-$n.txt"

if [ "$mode" = loop ]; then
    # The host stops the loop by writing "stop" to the serial console.
    mount -t tmpfs tmpfs /run
    (
        while read -r line; do
            if [ "$line" = stop ]; then
                : >/run/stop
                break
            fi
        done </dev/console
    ) &
    files=/loop.dat
    k=2
    while [ $k -le "$writers" ]; do
        files="$files /loop-$k.dat"
        k=$((k + 1))
    done
    echo "LOOP-READY"
    i=0
    while [ ! -e /run/stop ] && { [ "$iters" -eq 0 ] || [ $i -lt "$iters" ]; }; do
        i=$((i + 1))
        ok=1
        # Fresh data per file in tmpfs: what each writer must leave on disk.
        k=0
        for f in $files; do
            k=$((k + 1))
            dd if=/dev/urandom of=/run/want-$k bs=64k count=16 2>/dev/null
        done
        # The writers run at once, O_DIRECT (each 64 KiB block is its own
        # request, no page cache merging) and fsync their file, so writes
        # and flushes of different files are in flight together. Waiting
        # on each pid (not a bare wait, which would also wait for the
        # console reader) collects every writer's exit status.
        pids=""
        k=0
        for f in $files; do
            k=$((k + 1))
            dd if=/run/want-$k of="$f" bs=64k oflag=direct conv=fsync 2>/dev/null &
            pids="$pids $!"
        done
        for p in $pids; do
            wait "$p" || ok=0
        done
        sync
        echo 3 >/proc/sys/vm/drop_caches
        # Read every file back at once, O_DIRECT: the device's data, not a
        # cached copy.
        pids=""
        k=0
        for f in $files; do
            k=$((k + 1))
            dd if="$f" of=/run/got-$k bs=64k iflag=direct 2>/dev/null &
            pids="$pids $!"
        done
        for p in $pids; do
            wait "$p" || ok=0
        done
        # What this iteration wrote, so the host can check the disk after
        # power-off (printed before the result: a host that sees the result
        # already has the sums).
        k=0
        for f in $files; do
            k=$((k + 1))
            want=$(sha256sum /run/want-$k | cut -d' ' -f1)
            got=$(sha256sum /run/got-$k | cut -d' ' -f1)
            [ "$want" = "$got" ] || ok=0
            if [ $k -eq 1 ]; then
                echo "LOOP-SUM $i $want"
            else
                echo "LOOP-FILE-SUM $i $f $want"
            fi
            rm -f /run/want-$k /run/got-$k
        done
        if [ $ok -eq 1 ]; then
            echo "LOOP $i OK"
        else
            echo "LOOP $i BAD"
        fi
    done
    echo "LOOP-DONE $i"
    umount /run 2>/dev/null
fi

if [ "$mode" = files ]; then
    # Numbered 16 KiB files, each fsync'ed and synced before its
    # "FILE <i> <sha256>" line, until "stop" on the serial console.
    mount -t tmpfs tmpfs /run
    (
        while read -r line; do
            if [ "$line" = stop ]; then
                : >/run/stop
                break
            fi
        done </dev/console
    ) &
    mkdir -p /files
    echo "FILES-READY"
    i=0
    while [ ! -e /run/stop ]; do
        i=$((i + 1))
        dd if=/dev/urandom of="/files/f-$i" bs=16k count=1 conv=fsync 2>/dev/null
        sync
        echo "FILE $i $(sha256sum "/files/f-$i" | cut -d' ' -f1)"
    done
    echo "FILES-DONE $i"
    umount /run 2>/dev/null
fi

if [ "$mode" = serve ]; then
    # Services for recovery drills, until "stop" on the serial console.
    port=8080
    for arg in $(cat /proc/cmdline); do
        case $arg in
        guestport=*) port=${arg#guestport=} ;;
        esac
    done
    mount -t tmpfs tmpfs /run
    mkdir -p /run/qga
    agent=""
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && agent=/dev/${p##*/}
    done
    if [ -n "$agent" ]; then
        qemu-ga -m virtio-serial -p "$agent" -t /run/qga -f /run/qga/pid </dev/null >/dev/null 2>&1 &
        echo "QGA-STARTED $agent"
    else
        echo "QGA-NONE"
    fi
    ip link set lo up
    if ip link set eth0 up 2>/dev/null && ip addr add 10.0.2.15/24 dev eth0; then
        nc -ll -p "$port" -e /usr/sbin/guest-service </dev/null >/dev/null 2>&1 &
        nc -ll -p $((port + 1)) -e /bin/cat </dev/null >/dev/null 2>&1 &
        echo "NET-UP $port"
    else
        echo "NET-NONE"
    fi
    echo "SERVE-READY"
    while read -r line; do
        [ "$line" = stop ] && break
    done </dev/console
fi

if [ "$mode" = exec ]; then
    # guestexec=<path>: a program someone put on this disk (the benchmark
    # harness copies its in-guest load onto a copy of root.img), run with
    # the serial console as stdin and stdout.
    exe=""
    for arg in $(cat /proc/cmdline); do
        case $arg in
        guestexec=*) exe=${arg#guestexec=} ;;
        esac
    done
    if [ -n "$exe" ] && [ -x "$exe" ]; then
        "$exe"
        echo "EXEC-EXIT $?"
    else
        echo "EXEC-MISSING ${exe:-none}"
    fi
fi
finish
EOF
chmod 755 "$ROOT/sbin/init"

truncate -s "${ROOT_SIZE_MIB}M" "$WORK/root.img"
mke2fs -q -F -t ext4 -b 4096 -L guestroot \
    -E lazy_itable_init=0,lazy_journal_init=0,root_owner=0:0 \
    -d "$ROOT" "$WORK/root.img" >/dev/null
e2fsck -fn "$WORK/root.img" >/dev/null 2>&1 || die "fresh root.img fails e2fsck"

# --- Publish ----------------------------------------------------------------
cp "$KDIR/x/boot/vmlinuz-$KREL" "$WORK/vmlinuz"
echo "$CMDLINE" >"$WORK/cmdline"
for f in vmlinuz initramfs.cpio.gz root.img cmdline; do
    mv -f "$WORK/$f" "$CACHE/$f"
done
echo "$STAMP" >"$CACHE/.stamp"
log "built $CACHE/{vmlinuz,initramfs.cpio.gz,root.img} (kernel $KREL)"
