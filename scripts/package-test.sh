#!/usr/bin/env bash
# Proves the Debian package as an operator gets it: builds it (scripts/package.sh),
# verifies its systemd unit with systemd-analyze, installs it with apt into a clean
# Debian 12 root made by debootstrap, and runs it there: vizor --version, keygen,
# check on the shipped configuration, a serve answering /readyz, then a purge.
# Takes about 4 minutes on 2 cores from a clean clone (the release build), a minute
# once built (most of it debootstrap).
#
#   scripts/package-test.sh                  as scripts/test.sh runs it
#   VIZOR_PACKAGE_ROOT_CACHE=FILE.tar        reuse a debootstrap root (made if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
say() { printf 'package-test: %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

deb=$(scripts/package.sh | tail -n 1)
[ -f "$deb" ] || fail "scripts/package.sh made no package"
say "built $deb ($(du -h "$deb" | cut -f1))"
dpkg-deb --info "$deb" | sed -n 's/^ \(Depends\|Recommends\):/  \1:/p' >&2

# The unit as it is installed, checked with the binary it names put in place.
work=$(mktemp -d)
root=$work/root
serve=
cleanup() {
    [ -z "$serve" ] || kill "$serve" 2>/dev/null || true
    for m in dev/pts dev proc; do
        mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"
    done
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/unit"
sed "s#/usr/bin/vizor#$PWD/target/release/vizor#g" packaging/vizor.service > "$work/unit/vizor.service"
# verify runs man for the unit's Documentation=: the pages as built, not installed.
command -v man >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q man-db >&2
if ! out=$(MANPATH=$PWD/target/vizor-gen/man systemd-analyze verify "$work/unit/vizor.service" 2>&1); then
    printf '%s\n' "$out" >&2
    fail "systemd-analyze verify packaging/vizor.service"
fi
# verify also reports problems without failing: any line about the unit is one.
if printf '%s\n' "$out" | grep -i "vizor.service" >&2; then
    fail "systemd-analyze verify had something to say about packaging/vizor.service"
fi
say "systemd-analyze verify: the unit is clean"

# A clean Debian 12 root.
for tool in debootstrap curl; do
    command -v "$tool" >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$tool" >&2
done
cache=${VIZOR_PACKAGE_ROOT_CACHE:-}
mkdir -p "$root"
if [ -n "$cache" ] && [ -s "$cache" ]; then
    tar -C "$root" -xf "$cache"
else
    debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap"; }
    [ -z "$cache" ] || tar -C "$root" -cf "$cache" .
fi
say "clean root ready after $(( $(date +%s) - started ))s"
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"
cp /etc/resolv.conf "$root/etc/resolv.conf"
# No service starts inside the root.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }

# As on a host with libvirt: its group exists, and vizor's user joins it.
in_root groupadd --system libvirt
cp "$deb" "$root/tmp/vizor.deb"
in_root apt-get update -q >"$work/apt.log" 2>&1 || { tail -n 20 "$work/apt.log" >&2; fail "apt-get update in the root"; }
in_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends /tmp/vizor.deb \
    >"$work/install.log" 2>&1 || { tail -n 30 "$work/install.log" >&2; fail "apt-get install vizor.deb"; }
grep '^vizor:' "$work/install.log" >&2 || true
say "installed with apt (dependencies from Debian's archive)"

expect() { # expect DESCRIPTION COMMAND...: the command succeeds
    local what=$1; shift
    "$@" || fail "$what"
}
version=$(in_root vizor --version)
[ "$version" = "vizor $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)" ] || fail "vizor --version said: $version"
say "vizor --version: $version"
in_root id vizor | grep -q '(libvirt)' || fail "the vizor user is not in the libvirt group: $(in_root id vizor)"
for f in /etc/vizor/token.key /etc/vizor/audit.key; do
    [ "$(in_root stat -c '%U %a' "$f")" = "vizor 600" ] || fail "$f: $(in_root stat -c '%U %a' "$f")"
done
for f in /usr/share/man/man1/vizor.1.gz /usr/share/man/man1/vizor-check.1.gz \
         /usr/share/bash-completion/completions/vizor /usr/share/zsh/vendor-completions/_vizor \
         /usr/share/fish/vendor_completions.d/vizor.fish /usr/share/vizor/novnc/core/rfb.js \
         /lib/systemd/system/vizor.service /usr/share/doc/vizor/copyright; do
    [ -s "$root$f" ] || fail "the package did not install $f"
done
expect "vizor keygen" in_root vizor keygen /tmp/new.key
[ "$(in_root stat -c '%a' /tmp/new.key)" = 600 ] || fail "vizor keygen: mode $(in_root stat -c '%a' /tmp/new.key)"
say "vizor keygen: a 0600 key"

# The shipped configuration, as the vizor user: everything but libvirt (no libvirtd in
# the root) checks out.
set +e
check=$(in_root setpriv --reuid=vizor --regid=vizor --init-groups vizor check --config /etc/vizor/vizor.toml 2>&1)
status=$?
set -e
printf '%s\n' "$check" | sed 's/^/  /' >&2
[ "$status" = 1 ] || fail "vizor check on the shipped config (no libvirtd): exit $status, expected 1"
[ "$(printf '%s\n' "$check" | grep -c '^FAIL')" = 1 ] && printf '%s\n' "$check" | grep -q '^FAIL  libvirt at qemu:///system is unreachable' \
    || fail "vizor check: the one failure must be libvirt"
# The same with libvirt's test driver: good, and it serves.
sed 's#^uri = "qemu:///system"#uri = "test:///default"#; s#^listen = .*#listen = "127.0.0.1:0"#; s#^metrics_listen = .*##' \
    "$root/etc/vizor/vizor.toml" > "$root/tmp/test.toml"
in_root setpriv --reuid=vizor --regid=vizor --init-groups vizor check --config /tmp/test.toml >&2 \
    || fail "vizor check on the shipped config with test:///default"
# Started without a shell in between, so that $! is vizor (chroot, env and setpriv exec).
chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
    setpriv --reuid=vizor --regid=vizor --init-groups vizor serve --config /tmp/test.toml \
    >"$work/serve.out" 2>"$work/serve.log" &
serve=$!
for _ in $(seq 50); do grep -q '^listening on' "$work/serve.out" && break; sleep 0.2; done
addr=$(sed -n 's/^listening on //p' "$work/serve.out")
[ -n "$addr" ] || { cat "$work/serve.log" >&2; fail "vizor serve did not start in the root"; }
ready=$(curl -fsS "http://$addr/readyz") || fail "/readyz"
[ "$ready" = ready ] || fail "/readyz said: $ready"
kill -TERM "$serve"
wait "$serve" || { cat "$work/serve.log" >&2; fail "vizor serve did not stop cleanly on SIGTERM"; }
in_root setpriv --reuid=vizor --regid=vizor --init-groups vizor audit verify --config /tmp/test.toml /var/log/vizor/audit.jsonl >&2 \
    || fail "the audit log written in the root does not verify"
say "vizor serve from the package: ready, stopped on SIGTERM, its audit log verifies"

# Purge: the token key goes; the audit log and the key that verifies it stay.
in_root env DEBIAN_FRONTEND=noninteractive apt-get purge -y -q vizor >"$work/purge.log" 2>&1 \
    || { tail -n 20 "$work/purge.log" >&2; fail "apt-get purge vizor"; }
[ ! -e "$root/etc/vizor/token.key" ] || fail "purge left the token key"
[ -e "$root/etc/vizor/audit.key" ] && [ -e "$root/var/log/vizor/audit.jsonl" ] || fail "purge removed the audit log or its key"
say "purged: the token key is gone; the audit log and its key are kept"
say "passed in $(( $(date +%s) - started ))s"
