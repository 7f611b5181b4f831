#!/usr/bin/env bash
# The test command of the README, run by .ci/run: sets up a fresh Debian 12 machine
# (packages, libvirtd, a QEMU test domain) and runs every check and test.
#
#   scripts/test.sh            everything
#   VIZOR_FUZZ_SECONDS=N       fuzz each target for N seconds (default 20; 0: build and
#                              replay the corpora only)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s\n' "$*" >&2; }

# Everything the run logs, and every secret it uses, for the secret check at the end.
export VIZOR_TEST_RUN_DIR=$PWD/target/test-run
rm -rf "$VIZOR_TEST_RUN_DIR"
mkdir -p "$VIZOR_TEST_RUN_DIR"
secret() { printf '%s\t%s\n' "$1" "$2" >> "$VIZOR_TEST_RUN_DIR/secrets.tsv"; }

step "test host: packages, libvirtd, test domain"
scripts/test-host.sh install
scripts/test-host.sh start
# A fresh random VNC password per run: nothing in the suite may depend on its value,
# and the live tests check that it never appears in what they record.
VIZOR_TEST_VNC_PASSWORD=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 8)
secret "live domain VNC password" "$VIZOR_TEST_VNC_PASSWORD"
# The test CA's private keys (QEMU's and vizor's client key toward QEMU).
for key in /var/lib/vizor-test/pki/*-key.pem; do
    # Body lines of 16 characters or more: a short last line could turn up by chance.
    grep -v -- '-----' "$key" | awk 'length($0) >= 16' | while read -r line; do
        secret "test CA key $(basename "$key")" "$line"
    done
done
domain=vizor-test-rfb
port=$(scripts/test-host.sh domain "$domain" --vnc-passwd "$VIZOR_TEST_VNC_PASSWORD" --no-spice --mode-switch-disk | tail -n 1)
port=${port#vnc_port=}
export VIZOR_TEST_VNC_ADDR=127.0.0.1:$port VIZOR_TEST_VNC_DOMAIN=$domain VIZOR_TEST_VNC_PASSWORD

step "test tools: prometheus"
# Debian's Prometheus, for tests/prometheus_live.rs (it runs its own instance on a
# free port). Its service is not started: a policy-rc.d refuses it during the install.
if [ ! -x /usr/bin/prometheus ]; then
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    install_prometheus() {
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus >&2
    }
    install_prometheus || { apt-get update >&2 && install_prometheus; }
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

step "test tools: strace, systemd-analyze, man, nginx, redis"
# tests/hardening.rs traces vizor against the unit's syscall filter; package-test.sh
# verifies the unit (systemd-analyze runs man for its Documentation=); tests/nginx.rs
# runs nginx on the README's example and tests/replicas.rs redis-server (each its own
# instance: the services are not started, a policy-rc.d refuses them during the
# install).
tools=()
for p in strace systemd man-db nginx-light redis-server; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || tools+=("$p")
done
if [ ${#tools[@]} -gt 0 ]; then
    made_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    install_tools() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${tools[@]}" >&2; }
    install_tools || { apt-get update >&2 && install_tools; }
    if [ -n "$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

step "test tools: Chromium, playwright-core, noVNC, spice-html5"
# For tests/browser.rs: the console page in Debian's headless Chromium.
scripts/web-deps.sh --browser

step "format, lints, docs"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

step "unit, fixture and live tests"
log=$VIZOR_TEST_RUN_DIR/cargo-test.log
# Live tests are #[ignore]d (a plain `cargo test` runs only those that need no host):
# here they run too; the one ignored measuring tool does not.
cargo test --workspace --locked -- --include-ignored --skip measure_qemu_keyboard 2>&1 | tee "$log"
# One closing line for the whole suite: cargo prints one per test binary.
read -r passed failed < <(awk '/^test result:/ { p += $4; f += $6 } END { print p + 0, f + 0 }' "$log")

step "secrets: none in any log of the run"
# Every vizor log and audit log of the run, and the test output itself, against every
# password, token, key and private key the tests used; first shown to find a planted one.
scripts/check-secrets.sh --self-test
scripts/check-secrets.sh "$VIZOR_TEST_RUN_DIR"

step "fuzz targets"
# A short fixed budget per target on top of the checked-in seeds (fuzz/seeds).
scripts/fuzz.sh "${VIZOR_FUZZ_SECONDS:-20}"

step "Debian package: built, unit verified, installed into a clean Debian 12 root, run there"
scripts/package-test.sh

scripts/second-host.sh stop >/dev/null 2>&1 || true
scripts/test-host.sh stop >/dev/null 2>&1 || true
echo "scripts/test.sh: all checks passed"
echo "tests: $passed passed, $failed failed"
