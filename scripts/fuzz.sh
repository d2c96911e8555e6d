#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for a bounded time,
# starting from the corpus committed in fuzz/corpus/<target>/ (copied to a
# temp dir, so a run never dirties the repo). Exits non-zero if any target
# finds a crash, a leak, a timeout or an out-of-memory; the input that did
# it is kept in fuzz/artifacts/<target>/ and printed.
#
# Usage: scripts/fuzz.sh [TARGET...]     run the given targets (default: all)
#        scripts/fuzz.sh --seed          rewrite fuzz/corpus from the real encoders
# Env:   FUZZ_SECONDS    seconds per target (default 60)
#        FUZZ_SANITIZER  address (default) or none: CI uses none, which
#                        builds and runs several times faster; the targets'
#                        own oracles and Rust's bounds checks still apply
#
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ALL_TARGETS=(request_parse manifest index pack sealed state inflight nbd_reply files_image patch)
seconds=${FUZZ_SECONDS:-60}
export RUSTC_BOOTSTRAP=1
# A small ASan quarantine: the default 256 MiB hands every large buffer (the
# merged index's 512 KiB fanout) fresh pages, halving exec/s; use-after-free
# is still caught within the last 8 MiB freed.
export ASAN_OPTIONS=${ASAN_OPTIONS:-quarantine_size_mb=8}
# Debug assertions on: overflow checks turn silent wrap-arounds into crashes.
build_flags=(--debug-assertions --sanitizer "${FUZZ_SANITIZER:-address}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [[ ${1:-} == --seed ]]; then
    (cd fuzz && cargo run --example seed -- corpus)
    du -sh fuzz/corpus
    exit 0
fi

targets=("$@")
((${#targets[@]})) || targets=("${ALL_TARGETS[@]}")

work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The store targets create their scratch stores under TMPDIR.
mkdir -p "$work/tmp"

for t in "${targets[@]}"; do
    cargo fuzz build "${build_flags[@]}" "$t"
done

failed=()
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    if [[ -d fuzz/corpus/$t ]]; then
        cp -r "fuzz/corpus/$t/." "$corpus/"
    fi
    echo "--- fuzzing $t for ${seconds}s ($(find "$corpus" -type f | wc -l) seeds)"
    log="$work/$t.log"
    if TMPDIR="$work/tmp" cargo fuzz run "${build_flags[@]}" "$t" "$corpus" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        # libFuzzer's closing line: "#N DONE cov: C ft: F corp: K/S ...".
        done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -n1 | tr -s '[:space:]' ' ' || true)
        rate=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}' || true)
        echo "$t: ok, ${done_line:-no stats} (${rate:-?} exec/s)"
    else
        failed+=("$t")
        echo "$t: FAILED"
        # The report, without cargo-fuzz's dump of the input as a Rust list.
        cut -c1-300 "$log" | grep -v -E '^(\s*$|\s+[0-9]+: )' | tail -n 80
        for a in fuzz/artifacts/"$t"/*; do
            [[ -f $a ]] || continue
            echo "artifact $a ($(stat -c %s "$a") bytes, base64):"
            base64 -w0 "$a" | head -c 100000
            echo
        done
    fi
done

passed=$((${#targets[@]} - ${#failed[@]}))
if ((${#failed[@]})); then
    echo "fuzzing found problems in: ${failed[*]}"
    echo "fuzz: $passed passed, ${#failed[@]} failed"
    exit 1
fi
echo "fuzzing: ${#targets[@]} targets ran ${seconds}s each without a crash"
echo "fuzz: $passed passed, 0 failed"
