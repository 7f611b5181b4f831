#!/usr/bin/env bash
# The demo command of the README: on a fresh Debian 12 machine, installs libvirt and
# QEMU, starts libvirtd, defines and starts the demo domain `vizor-demo` (VNC with a
# password, boot menu), then records one live console session per encoding with vizor's
# RFB codec and prints what it framed. Safe to run twice.
#
# `vizor serve` (the WebSocket proxy for browsers) is the next milestone; until it lands
# this demo shows the codec that the proxy runs on both legs, against a real VM.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/test-host.sh install
scripts/test-host.sh start
pw_file=/var/lib/vizor-demo/vnc-password
mkdir -p /var/lib/vizor-demo
if [ ! -s "$pw_file" ]; then
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 8 >"$pw_file")
fi
pw=$(cat "$pw_file")
port=$(scripts/test-host.sh domain vizor-demo --vnc-passwd "$pw" --no-spice --mode-switch-disk | tail -n 1)
port=${port#vnc_port=}
out=$(mktemp -d /tmp/vizor-demo-captures.XXXXXX)
echo "demo: recording live sessions from vizor-demo (VNC on 127.0.0.1:$port) into $out" >&2
VIZOR_VNC_PASSWORD=$pw VIZOR_VNC_DOMAIN=vizor-demo \
    cargo run --quiet --release -p vizor-rfb --example rfb-record -- "127.0.0.1:$port" "$out"
cat <<MSG

Each line above is one real QEMU console session framed end to end by vizor's codec:
every byte in both directions accounted for, per encoding. The captures are in $out.
The demo VM stays running: virsh -c qemu:///system list. Its VNC password is in $pw_file
(root only). Remove it with: scripts/test-host.sh stop
MSG
