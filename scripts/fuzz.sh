#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ and runs each for the given number of seconds
# (0: build and replay the corpora only), starting from the checked-in seeds
# (fuzz/seeds/TARGET) and the working corpus (fuzz/corpus/TARGET, not tracked, where
# new inputs go; the RFB targets' also gets the QEMU captures). Prints each target's
# executions; fails on a build error, a crash, or any file in fuzz/artifacts.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# cargo-fuzz needs unstable compiler flags; RUSTC_BOOTSTRAP=1 allows them on the
# stable toolchain this machine has.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-0}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(rfb_server_to_client rfb_client_to_server rfb_handshake rfb_rules spice spice_rules token config paste)
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
cargo run --quiet -p vizor-rfb --example rfb-fuzz-seeds -- fuzz/corpus >&2
log=$(mktemp /tmp/vizor-fuzz.XXXXXX)
trap 'rm -f "$log"' EXIT
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" fuzz/artifacts
    # libFuzzer writes new inputs to the first directory only.
    dirs=("fuzz/corpus/$t")
    if [ -d "fuzz/seeds/$t" ]; then dirs+=("fuzz/seeds/$t"); fi
    rc=0
    if [ "$seconds" -gt 0 ]; then
        echo "fuzz: $t for ${seconds}s" >&2
        cargo fuzz run "$t" "${dirs[@]}" -- -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1 || rc=$?
        grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$log" >&2 || true
        execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
        summary+=("$t: ${execs:-?} executions in ${seconds}s, corpus $(find "${dirs[@]}" -type f | wc -l) files")
    else
        echo "fuzz: $t: build and replay the corpus" >&2
        cargo fuzz run "$t" "${dirs[@]}" -- -runs=0 >"$log" 2>&1 || rc=$?
        tail -n 1 "$log" >&2
    fi
    if [ "$rc" -ne 0 ]; then
        # The panic and its stack, then cargo-fuzz's note naming the failing input.
        sed -n '/panicked at/,/ERROR: libFuzzer/p' "$log" | head -n 60 >&2
        tail -n 30 "$log" >&2
        echo "fuzz: $t failed (exit $rc)" >&2
        exit 1
    fi
    # A crash leaves an artifact; any artifact fails the run.
    if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
        echo "fuzz: $t found crashes: fuzz/artifacts/$t" >&2
        exit 1
    fi
done
for line in "${summary[@]}"; do
    echo "fuzz: $line" >&2
done
