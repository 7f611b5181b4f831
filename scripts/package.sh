#!/usr/bin/env bash
# Builds vizor's Debian package with cargo-deb: target/debian/vizor_VERSION-1_ARCH.deb
# (its path is the last line printed). The package holds the binary, noVNC (npm,
# as web/package-lock.json pins it), man pages and shell completions (written by
# vizor-gen from the command line's definitions), /etc/vizor/vizor.toml, and the
# systemd unit packaging/vizor.service. Its contents: Cargo.toml [package.metadata.deb].
#
#   scripts/package.sh       build it (installing cargo-deb and noVNC when missing)
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    echo "package: installing cargo-deb $CARGO_DEB_VERSION" >&2
    # A debug build: it compiles in about 30 s instead of minutes, and packs vizor's
    # package as fast (5 s either way, measured).
    cargo install cargo-deb --debug --locked --version "$CARGO_DEB_VERSION" >&2
fi
# libvirt's headers for the virt crate, dpkg-dev for dpkg-shlibdeps ($auto depends).
missing=()
for p in libvirt-dev pkg-config dpkg-dev; do
    dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; }
    apt_install || { apt-get update >&2 && apt_install; }
fi
# noVNC as web/package.json pins it; one already there is kept, with whatever else
# web/node_modules holds (the browser tests' playwright-core).
novnc_pinned() {
    command -v node >/dev/null || return 1
    local pinned have
    pinned=$(node -p 'require("./web/package.json").dependencies["@novnc/novnc"]') || return 1
    have=$(node -p 'require("./web/node_modules/@novnc/novnc/package.json").version' 2>/dev/null) || return 1
    [ "$have" = "$pinned" ]
}
novnc_pinned || scripts/web-deps.sh >&2

cargo build --release --locked -p vizor -p vizor-gen >&2
rm -rf target/vizor-gen
target/release/vizor-gen target/vizor-gen
rm -f target/debian/vizor_*.deb
cargo deb --no-build --locked -p vizor >&2
ls target/debian/vizor_*.deb
