#!/usr/bin/env bash
# Install the system packages the tests, benchmarks and demo need.
#
# Idempotent: does nothing when everything is already present. Runs
# `apt-get update` only when a package has no install candidate. Works as
# root (CI) or through sudo.
#
# QEMU note: qemu-system-x86 and qemu-utils must come from the same Debian
# release. Some images ship a newer qemu-utils backport that conflicts with
# Debian's qemu-system-x86, so both are installed together at the version of
# qemu-system-x86's candidate (downgrading qemu-utils if needed).
set -euo pipefail

PACKAGES=(qemu-system-x86 qemu-utils qemu-guest-agent busybox-static e2fsprogs cpio restic borgbackup tmux fdisk fuse3 libvirt-daemon-system libvirt-clients virtnbdbackup python3-pip)
# Python tools from PyPI: moto's S3 server, the real S3 endpoint of the S3
# store tests (tests/integration/s3.rs).
PIP_PACKAGES=("moto[server]")

log() { echo "install-deps: $*" >&2; }

SUDO=()
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo)
    else
        log "not root and sudo is missing; cannot install packages"
        exit 1
    fi
fi

installed_version() {
    dpkg-query -W -f='${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null |
        awk '$1 == "ii" { print $2 }' || true
}

candidate_version() {
    apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }' || true
}

# Which packages are missing (or, for qemu-utils, at the wrong version)?
qemu_version=$(installed_version qemu-system-x86)
missing=()
for pkg in "${PACKAGES[@]}"; do
    have=$(installed_version "$pkg")
    if [[ -z $have ]]; then
        missing+=("$pkg")
    elif [[ $pkg == qemu-utils && -n $qemu_version && $have != "$qemu_version" ]]; then
        missing+=("$pkg")
    fi
done
if ! command -v qemu-storage-daemon >/dev/null 2>&1 ||
    ! qemu-storage-daemon --version >/dev/null 2>&1; then
    missing+=(qemu-utils)
fi

# PyPI packages (after apt, which provides pip). Debian's pip refuses to
# install into the system Python without --break-system-packages.
install_pip_packages() {
    if command -v moto_server >/dev/null 2>&1; then
        log "moto_server present"
        return
    fi
    log "pip install ${PIP_PACKAGES[*]}"
    "${SUDO[@]}" python3 -m pip install -q "${PIP_PACKAGES[@]}" ||
        "${SUDO[@]}" python3 -m pip install -q --break-system-packages "${PIP_PACKAGES[@]}"
    if ! command -v moto_server >/dev/null 2>&1; then
        log "moto_server is not on PATH after pip install"
        exit 1
    fi
}

if [[ ${#missing[@]} -eq 0 ]]; then
    log "all packages present"
    install_pip_packages
    exit 0
fi
log "missing: ${missing[*]}"

# Refresh the package lists only when some package has no candidate.
need_update=0
for pkg in "${PACKAGES[@]}"; do
    cand=$(candidate_version "$pkg")
    if [[ -z $cand || $cand == "(none)" ]]; then
        need_update=1
    fi
done
if [[ $need_update -eq 1 ]]; then
    log "apt-get update"
    "${SUDO[@]}" apt-get update -q
fi

# Pin qemu-utils to the qemu-system-x86 version (the one already installed,
# or the candidate) so the two never conflict.
target_qemu=${qemu_version:-$(candidate_version qemu-system-x86)}
args=()
for pkg in "${PACKAGES[@]}"; do
    case $pkg in
    qemu-system-x86 | qemu-utils) args+=("$pkg=$target_qemu") ;;
    *) args+=("$pkg") ;;
    esac
done

apt_install() {
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
        --no-install-recommends --allow-downgrades "$@"
}
log "apt-get install ${args[*]}"
if ! apt_install "${args[@]}"; then
    if [[ $need_update -eq 1 ]]; then
        exit 1
    fi
    # Stale package lists (a version no longer on the mirror): refresh, retry.
    log "install failed; apt-get update and retry"
    "${SUDO[@]}" apt-get update -q
    target_qemu=${qemu_version:-$(candidate_version qemu-system-x86)}
    args=()
    for pkg in "${PACKAGES[@]}"; do
        case $pkg in
        qemu-system-x86 | qemu-utils) args+=("$pkg=$target_qemu") ;;
        *) args+=("$pkg") ;;
        esac
    done
    apt_install "${args[@]}"
fi

if ! qemu-storage-daemon --version >/dev/null 2>&1; then
    log "qemu-storage-daemon does not run after install"
    exit 1
fi
if ! qemu-system-x86_64 --version >/dev/null 2>&1; then
    log "qemu-system-x86_64 does not run after install"
    exit 1
fi
install_pip_packages
log "done: $(qemu-system-x86_64 --version | head -n1)"
