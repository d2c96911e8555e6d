#!/usr/bin/env bash
# The whole test suite, as CI runs it.
#
#   scripts/test.sh [extra cargo test arguments]
#
# Installs missing system packages (QEMU, qemu-utils, busybox, e2fsprogs,
# ...), builds the test guest (cached in .guest-cache/), then runs every
# workspace test. RECOVERY_REQUIRE_GUEST=1 makes the QEMU tests fail instead
# of skipping if the guest cannot be built.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-deps.sh
scripts/build-guest.sh

export RECOVERY_REQUIRE_GUEST=1
exec cargo test --workspace "$@"
