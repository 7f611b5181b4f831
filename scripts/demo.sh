#!/usr/bin/env bash
# The demo command of the README: on a fresh Debian 12 machine (as root) it installs
# libvirt, QEMU, noVNC (npm) and spice-html5, starts libvirtd and the demo VM
# `vizor-demo` (VNC and SPICE, each with a password libvirt keeps; SeaBIOS boot menu),
# writes a token key and config, starts vizor on 127.0.0.1:6080 with its console page,
# and prints a console URL for each kind. Safe to run again: the VM and vizor are
# restarted.
#
#   VIZOR_DEMO_LISTEN=0.0.0.0:6080 scripts/demo.sh    to listen elsewhere
set -euo pipefail
cd "$(dirname "$0")/.."
listen=${VIZOR_DEMO_LISTEN:-127.0.0.1:6080}
dir=/var/lib/vizor-demo

scripts/test-host.sh install
scripts/web-deps.sh
scripts/test-host.sh start

mkdir -p "$dir"
chmod 700 "$dir"
for kind in vnc spice; do
    if [ ! -s "$dir/$kind-password" ]; then
        (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c 8 >"$dir/$kind-password")
    fi
done
scripts/test-host.sh domain vizor-demo --vnc-passwd "$(cat "$dir/vnc-password")" \
    --spice-passwd "$(cat "$dir/spice-password")" >/dev/null

echo "demo: building vizor (release)" >&2
cargo build --release --quiet --locked
vizor=$PWD/target/release/vizor
[ -s "$dir/token.key" ] || "$vizor" keygen "$dir/token.key"
[ -s "$dir/audit.key" ] || "$vizor" keygen "$dir/audit.key"
# The admin page's key (one word, 0600): the demo's administrator "admin".
[ -s "$dir/admin.key" ] || (umask 077 && head -c 24 /dev/urandom | base64 | tr '+/' '-_' >"$dir/admin.key")
cat >"$dir/vizor.toml" <<TOML
[server]
listen = "$listen"

[console]
novnc = "$PWD/web/node_modules/@novnc/novnc"
spice_html5 = "/usr/share/spice-html5"

[libvirt]
uri = "qemu:///system"

[tokens]
key_file = "token.key"
ttl = "10m"

[audit]
path = "audit.jsonl"
key_file = "audit.key"
keystrokes = "full"
record_dir = "recordings"

[api]
admin_key_file = "admin.key"
TOML
mkdir -p "$dir/recordings"

if [ -s "$dir/vizor.pid" ] && kill -0 "$(cat "$dir/vizor.pid")" 2>/dev/null; then
    echo "demo: stopping the previous demo vizor" >&2
    kill "$(cat "$dir/vizor.pid")"
    for _ in $(seq 50); do kill -0 "$(cat "$dir/vizor.pid")" 2>/dev/null || break; sleep 0.2; done
fi
nohup "$vizor" serve --config "$dir/vizor.toml" >"$dir/vizor.out" 2>"$dir/vizor.log" &
echo $! >"$dir/vizor.pid"
for _ in $(seq 50); do grep -q '^listening on' "$dir/vizor.out" 2>/dev/null && break; sleep 0.2; done
grep -q '^listening on' "$dir/vizor.out" || { cat "$dir/vizor.log" >&2; echo "demo: vizor did not start" >&2; exit 1; }
addr=$(sed -n 's/^listening on //p' "$dir/vizor.out")

token() { "$vizor" token --config "$dir/vizor.toml" --domain vizor-demo --user demo --kind "$1" | tail -n 1; }
vnc_token=$(token vnc)
spice_token=$(token spice)
cat <<MSG

vizor is serving the consoles of the VM vizor-demo on http://$addr/

Open one of these in a browser (each link opens one session, within 10 minutes):

  VNC (noVNC):          http://$addr/console?token=$vnc_token
  SPICE (spice-html5):  http://$addr/console?token=$spice_token

No password is asked: vizor authenticates to QEMU with the ones libvirt keeps.
The screen shows SeaBIOS; press Esc within 30 s of a restart
(virsh -c qemu:///system reset vizor-demo) to open its boot menu.

New links:      $vizor token --config $dir/vizor.toml --domain vizor-demo [--kind spice]
                then open http://$addr/console?token=TOKEN
Audit log:      $dir/audit.jsonl      vizor's log: $dir/vizor.log
Review it:      $vizor audit verify --key $dir/audit.key $dir/audit.jsonl
                $vizor audit sessions $dir/audit.jsonl
                $vizor audit text --key $dir/audit.key --session ID $dir/audit.jsonl
Admin page:     http://$addr/admin   (its key: cat $dir/admin.key) lists the live
                sessions: Watch, Events, End
Replay (VNC):   $vizor replay --novnc $PWD/web/node_modules/@novnc/novnc \$(ls -t $dir/recordings/*.vzr | head -n 1)
                then open http://127.0.0.1:6081/
Stop:           kill \$(cat $dir/vizor.pid); scripts/test-host.sh stop
MSG
