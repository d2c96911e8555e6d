#!/usr/bin/env bash
# Boot the test guest by hand (the tests do the same from Rust).
#
#   scripts/boot-guest.sh --disk FILE    [-- EXTRA QEMU ARGS]
#   scripts/boot-guest.sh --socket PATH  [-- EXTRA QEMU ARGS]
#
# --disk boots a raw file (a COPY of .guest-cache/root.img: the guest
# writes to it); --socket boots from a vhost-user-blk socket with the
# memfd shared memory vhost-user needs. GUEST_ARGS adds kernel arguments
# (e.g. GUEST_ARGS="guestmode=loop guestiters=5"). The console is on
# stdout; the guest powers off by itself when done.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${GUEST_CACHE_DIR:-$REPO/.guest-cache}
MEM_MIB=512

usage() {
    sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

disk="" socket=""
while [[ $# -gt 0 ]]; do
    case $1 in
    --disk) disk=${2:?}; shift 2 ;;
    --socket) socket=${2:?}; shift 2 ;;
    --) shift; break ;;
    *) usage ;;
    esac
done
[[ -n $disk || -n $socket ]] || usage

"$REPO/scripts/build-guest.sh" "$CACHE"
cmdline="$(cat "$CACHE/cmdline") ${GUEST_ARGS:-}"

args=(-accel tcg -m "$MEM_MIB" -smp 1 -nodefaults -no-user-config
    -display none -no-reboot -serial stdio
    -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.cpio.gz" -append "$cmdline")
if [[ -n $socket ]]; then
    args+=(-machine "q35,memory-backend=mem"
        -object "memory-backend-memfd,id=mem,size=${MEM_MIB}M,share=on"
        -chardev "socket,id=vu0,path=$socket,reconnect=1"
        -device "vhost-user-blk-pci,chardev=vu0")
else
    args+=(-machine q35 -drive "file=$disk,format=raw,if=virtio")
fi
exec qemu-system-x86_64 "${args[@]}" "$@"
