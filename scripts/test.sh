#!/usr/bin/env bash
# The whole test suite, as CI runs it.
#
#   scripts/test.sh [extra cargo test arguments]
#
# Installs missing system packages (QEMU, qemu-utils, busybox, e2fsprogs,
# ...), builds the test guest (cached in .guest-cache/), then runs every
# workspace test. RECOVERY_REQUIRE_GUEST=1 makes every test that lacks its
# environment (the guest, root for tmpfs mounts, loop devices and other
# users, libvirtd) fail instead of skipping.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
scripts/build-guest.sh

export RECOVERY_REQUIRE_GUEST=1
exec cargo test --workspace "$@"
