#!/usr/bin/env bash
# bench.sh — vizor side by side with websockify, websocat and direct TCP (issue 8), in
# one command on a fresh Debian 12 (as root): installs what the benchmark needs, builds
# the release binaries and runs target/release/vizor-bench with the arguments given.
#
#   scripts/bench.sh                 the full run (about 12 minutes here), every case
#   scripts/bench.sh --quick         a smoke run of a minute or two
#   scripts/bench.sh --qemu-host     also start the libvirt test host (scripts/test-host.sh)
#                                    and a QEMU domain, vizor-test-bench, and time the first
#                                    full frame from its real QEMU, direct and through vizor
#   scripts/bench.sh --help          vizor-bench's own options (--cases, --paths, --json,
#                                    --rounds, --sessions, --many-seconds, --qemu DOMAIN ...)
#
# The table goes to standard output and, as JSON, to target/bench/results.json (or
# --json PATH); proxies' configs and logs to target/bench/run/. Loopback only; every
# step of the benchmark is bounded in time.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'bench: %s\n' "$*" >&2; }

args=()
qemu_host=0
for a in "$@"; do
    case "$a" in
        --qemu-host) qemu_host=1 ;;
        *) args+=("$a") ;;
    esac
done

# Debian packages: websockify (a path under test), python3 (websockify's), the
# libvirt client library and headers (vizor links libvirt; the benchmark's libvirt is
# its in-process test driver), a C toolchain and pkg-config for the build, prlimit and
# ps for the measurements.
packages=(websockify python3 libvirt-dev pkg-config build-essential util-linux procps git)
missing=()
for p in "${packages[@]}"; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt_install() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    }
    apt_install || { apt-get update >&2 && apt_install; }
fi

if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
command -v cargo >/dev/null || { log "cargo is missing: install Rust (rustup) first"; exit 1; }

# websocat: the Rust blind splicer, from crates.io.
if ! command -v websocat >/dev/null && [ ! -x "$HOME/.cargo/bin/websocat" ]; then
    log "installing websocat (cargo install websocat --locked; a few minutes)"
    cargo install websocat --locked >&2
fi
export PATH="$PATH:$HOME/.cargo/bin"

log "building the release binaries"
cargo build --release -p vizor -p vizor-bench >&2

if [ "$qemu_host" = 1 ]; then
    log "starting the libvirt test host and the domain vizor-test-bench"
    scripts/test-host.sh install
    scripts/test-host.sh start
    # A fresh random VNC password: vizor-bench reads it back from libvirt.
    password=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 8)
    scripts/test-host.sh domain vizor-test-bench --vnc-passwd "$password" --no-spice >/dev/null
    args+=(--qemu vizor-test-bench)
fi

exec target/release/vizor-bench "${args[@]}"
