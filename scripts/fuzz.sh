#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/, seeds their corpora from the QEMU captures,
# and runs each for the given number of seconds (0: build and replay the seeds only).
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
[ ${#targets[@]} -gt 0 ] || targets=(rfb_server_to_client rfb_client_to_server rfb_handshake spice)
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked --quiet
fi
cargo run --quiet -p vizor-rfb --example rfb-fuzz-seeds -- fuzz/corpus >&2
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" fuzz/artifacts
    if [ "$seconds" -gt 0 ]; then
        echo "fuzz: $t for ${seconds}s" >&2
        cargo fuzz run "$t" "fuzz/corpus/$t" -- -max_total_time="$seconds" -print_final_stats=1 2>&1 \
            | grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE|==[0-9]+==|SUMMARY|thread .* panicked)' >&2 || true
    else
        echo "fuzz: $t: build and replay the corpus" >&2
        cargo fuzz run "$t" "fuzz/corpus/$t" -- -runs=0 2>&1 | tail -n 1 >&2
    fi
    # A crash leaves an artifact; any artifact fails the run.
    if compgen -G "fuzz/artifacts/$t/*" >/dev/null; then
        echo "fuzz: $t found crashes: fuzz/artifacts/$t" >&2
        exit 1
    fi
done
