#!/usr/bin/env bash
# second-host.sh — a second, really separate libvirt + QEMU host for vizor's integration tests.
#
# Beside the primary test host of test-host.sh (qemu:///system), this runs another
# virtlogd + libvirtd (+ the QEMU processes it starts) inside their own network namespace
# (ip netns vizor-h2, reached over a veth pair) and their own private mount namespace, in
# which /run (so /run/libvirt and the pid files), /var/lib/libvirt, /var/log/libvirt,
# /etc/libvirt and /var/cache/libvirt are directories under /var/lib/vizor-second-host.
# vizor reaches it as qemu+tcp://10.213.0.2/system (TCP, no auth, no TLS); its consoles
# listen on 10.213.0.2 too. Needs root and the packages of 'test-host.sh install'
# (libvirt-daemon, libvirt-daemon-driver-qemu, libvirt-clients, qemu-system-x86, nftables,
# iproute2) plus util-linux; it installs nothing.
#
# Only root on this machine reaches it: that libvirtd has no authentication and runs QEMU
# as root, so whoever talks to it is root. While it is up, the nftables table
# 'inet vizor_h2' of the host refuses (TCP reset: connect fails at once), in its output
# hook, every packet to 10.213.0.0/24 or out of vzh2-host from a socket whose owner is
# not uid 0 (libvirtd and the VNC consoles alike), and drops, in its forward hook, every
# packet to or from 10.213.0.0/24 or vzh2-host (other network namespaces, containers,
# other machines). Inside the namespace a table of the same name accepts only packets
# from 10.213.0.1 and loopback. start refuses when 10.213.0.0/24 is already in use on
# this machine (an address, or a route other than the default ones and its own).
#
# Usage:
#   second-host.sh start      create the namespaces and the veth pair (host side vzh2-host
#                            10.213.0.1/24, namespace side vzh2-ns 10.213.0.2/24) and start
#                            virtlogd + libvirtd in them, unless already there; waits until
#                            qemu+tcp://10.213.0.2/system answers. Idempotent: when the
#                            namespaces exist but libvirtd died (or was SIGSTOPped) it is
#                            started (continued) again and takes up the running domains.
#   second-host.sh domain NAME PASSWORD [--listen ADDR]
#                            (re)define and start a disk-less test domain (64 MiB, no NIC,
#                            VGA, boot menu) whose only console is VNC with that password
#                            (at most 8 characters; '' for none), listening on ADDR
#                            (default 0.0.0.0, reached at 10.213.0.2), autoport. Last stdout
#                            line: vnc_port=N
#   second-host.sh pid        print the pid of the second host's libvirtd
#   second-host.sh stop       destroy and undefine its domains, kill every process of its
#                            namespaces, unmount and remove the namespaces and the veth pair,
#                            then (last, so that nothing for 10.213.0.x leaves through the
#                            default route meanwhile) the route 'unreachable 10.213.0.0/24
#                            metric 4242' and the nftables table 'inet vizor_h2'.
#                            Idempotent; never touches the primary host's processes (it
#                            refuses to kill anything when a namespace file names the
#                            host's own namespace). Left on purpose: the capability cache
#                            and the logs under /var/lib/vizor-second-host.
#   second-host.sh status     up or down; libvirt version and domain list when up
#
# The daemons run as 'vzh2-libvirtd' and 'vzh2-virtlogd' (symlinks to the real binaries),
# so that name-based pgrep/pkill of libvirtd/virtlogd (test-host.sh has some) never sees
# them. Processes of this host are found by pid file and namespace, never by name.
# Domain type: 'kvm' when /dev/kvm opens read-write, else 'qemu' (TCG); VIZOR_DOMAIN_TYPE
# overrides. Progress goes to stderr; stdout only carries the results named above.
# Passwords are never printed.
set -euo pipefail

NETNS=vizor-h2
VETH_HOST=vzh2-host
VETH_NS=vzh2-ns
HOST_ADDR=10.213.0.1
NS_ADDR=10.213.0.2
PREFIX=24
PORT=16509
UNREACHABLE_METRIC=4242
NET=${HOST_ADDR%.*}.0/$PREFIX
NFT_TABLE="inet vizor_h2"   # in the host's network namespace and in ours
URI="qemu+tcp://$NS_ADDR/system"
START_TIMEOUT=60
# A fixed host UUID of its own: the second host must not look like the primary one.
HOST_UUID=5ec0dd05-0213-4a2b-9c1d-f4b7c0de0002

BASE=/var/lib/vizor-second-host
NS_DIR=$BASE/ns              # bind-mounted on itself, private: holds the mount-ns file
MNT_NS=$NS_DIR/mnt
NETNS_FILE=/run/netns/$NETNS
BIN_DIR=$BASE/bin
# host directory -> path inside the mount namespace
RUN_DIR=$BASE/run            # -> /run (and /var/run when it is not a link to /run)
LIB_DIR=$BASE/lib            # -> /var/lib/libvirt
LOG_DIR=$BASE/log            # -> /var/log/libvirt
ETC_DIR=$BASE/etc            # -> /etc/libvirt
CACHE_DIR=$BASE/cache        # -> /var/cache/libvirt (kept across stop: QEMU probe cache)
LOCK_FILE=$BASE/lock

LIBVIRTD=/usr/sbin/libvirtd
VIRTLOGD=/usr/sbin/virtlogd
EMULATOR=/usr/bin/qemu-system-x86_64
QEMU_DRIVER=/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so
LIBVIRTD_NAME=vzh2-libvirtd
VIRTLOGD_NAME=vzh2-virtlogd
# pid files, as seen inside the mount namespace and from the host
LIBVIRTD_PID_NS=/run/libvirtd.pid
VIRTLOGD_PID_NS=/run/virtlogd.pid
LIBVIRTD_PID=$RUN_DIR/libvirtd.pid
VIRTLOGD_PID=$RUN_DIR/virtlogd.pid
LIBVIRTD_LOG=$LOG_DIR/libvirtd.log
LIBVIRTD_STDERR=$LOG_DIR/libvirtd.stderr
VIRTLOGD_STDERR=$LOG_DIR/virtlogd.stderr

LIBVIRTD_CONF="listen_tls = 0
listen_tcp = 1
listen_addr = \"$NS_ADDR\"
tcp_port = \"$PORT\"
auth_tcp = \"none\"
host_uuid = \"$HOST_UUID\"
log_outputs = \"3:file:/var/log/libvirt/libvirtd.log\""

VIRTLOGD_CONF='log_outputs = "3:file:/var/log/libvirt/virtlogd.log"'

QEMU_CONF='user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
vnc_listen = "0.0.0.0"'

say() { printf 'second-host: %s\n' "$*" >&2; }
die() { printf 'second-host: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '/^# Usage:/,/^# The daemons run/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (namespaces, libvirtd)"; }

check_tools() {
    local missing=() t pkg
    for t in ip:iproute2 unshare:util-linux nsenter:util-linux findmnt:util-linux \
             taskset:util-linux flock:util-linux timeout:coreutils virsh:libvirt-clients \
             nft:nftables; do
        command -v "${t%%:*}" >/dev/null || missing+=("${t#*:} (for ${t%%:*})")
    done
    for t in "$LIBVIRTD:libvirt-daemon" "$VIRTLOGD:libvirt-daemon" \
             "$QEMU_DRIVER:libvirt-daemon-driver-qemu" "$EMULATOR:qemu-system-x86"; do
        [ -e "${t%%:*}" ] || missing+=("${t#*:} (for ${t%%:*})")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        for pkg in "${missing[@]}"; do say "missing: apt package $pkg"; done
        die "install the missing packages (apt-get install ..., or test-host.sh install)"
    fi
}

take_lock() { # one start/stop/domain at a time; fd 9 is closed for the daemons
    mkdir -p "$BASE"
    exec 9>"$LOCK_FILE"
    flock -w 300 9 || die "another second-host.sh holds $LOCK_FILE"
}

# Only with the veth pair there: else 10.213.0.2 would be sought through the default route.
veth_up() { ip -o -4 addr show dev "$VETH_HOST" 2>/dev/null | grep -q " $HOST_ADDR/"; }

libvirt_up() { veth_up && timeout 5 virsh -c "$URI" version >/dev/null 2>&1; }

virsh_q() { virsh -q -c "$URI" "$@"; }

# ------------------------------------------------------------------------ namespaces
mntns_up() { findmnt -rn --mountpoint "$MNT_NS" >/dev/null 2>&1; }
netns_up() { findmnt -rn --mountpoint "$NETNS_FILE" >/dev/null 2>&1; }
ns_inode() { stat -L -c %i "$1" 2>/dev/null; }

in_ns() { # run a command inside both namespaces
    nsenter --net="$NETNS_FILE" --mount="$MNT_NS" -- "$@"
}

proc_state() { sed 's/.*) //; s/ .*//' "/proc/$1/stat" 2>/dev/null; }   # R, S, T, Z...

# pid of a daemon from its pid file, when that process is alive, has our name and lives
# in our mount namespace
daemon_pid() { # pidfile name
    local pid ino
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    ino=$(ns_inode "$MNT_NS") || return 1
    [ "$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" = "mnt:[$ino]" ] || return 1
    echo "$pid"
}

# Our namespace files must name namespaces of their own: were one the host's (a broken
# or wrong bind mount), 'every process of our namespaces' would be every process of the
# machine, the primary host's included. Compares device and inode with those of this
# shell's namespaces (the host's) and, where readable (not in every VM), of init's; a
# namespace file that is there but cannot be examined counts as failure.
ns_distinct() {
    local kind file id pid
    for kind in mnt net; do
        if [ "$kind" = mnt ]; then file=$MNT_NS; else file=$NETNS_FILE; fi
        [ -e "$file" ] || [ -L "$file" ] || continue
        id=$(stat -L -c %d:%i "$file" 2>/dev/null) \
            || { say "cannot examine $file"; return 1; }
        for pid in $$ 1; do
            if [ "$(stat -L -c %d:%i "/proc/$pid/ns/$kind" 2>/dev/null)" = "$id" ]; then
                say "$file is the $kind namespace of pid $pid (the host's), not one of ours"
                return 1
            fi
        done
    done
}

# every process in our mount or network namespace (one find: a readlink per process
# costs a fork each); nothing, and failure, when ns_distinct fails
ns_pids() {
    local expr=() ino
    ns_distinct || return 1
    if mntns_up; then
        ino=$(ns_inode "$MNT_NS") || return 1
        expr+=( \( -name mnt -lname "mnt:\[$ino\]" \) )
    fi
    if netns_up; then
        ino=$(ns_inode "$NETNS_FILE") || return 1
        [ ${#expr[@]} -eq 0 ] || expr+=( -o )
        expr+=( \( -name net -lname "net:\[$ino\]" \) )
    fi
    [ ${#expr[@]} -gt 0 ] || return 0
    { find /proc/[0-9]*/ns -maxdepth 1 \( "${expr[@]}" \) 2>/dev/null || true; } \
        | cut -d/ -f3 | sort -un | { grep -vx "$$" || true; }
}

make_dirs() {
    mkdir -p "$NS_DIR" "$BIN_DIR" "$RUN_DIR/libvirt" "$RUN_DIR/lock" \
        "$LIB_DIR/qemu" "$LOG_DIR/qemu" "$ETC_DIR/qemu" "$CACHE_DIR/qemu"
    # mount points that must exist on the host's file system (empty ones are harmless)
    mkdir -p /var/lib/libvirt /var/log/libvirt /etc/libvirt /var/cache/libvirt
    ln -sfn "$LIBVIRTD" "$BIN_DIR/$LIBVIRTD_NAME"
    ln -sfn "$VIRTLOGD" "$BIN_DIR/$VIRTLOGD_NAME"
}

write_file() { # path content   (only rewritten when different; returns 0 when written)
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then return 1; fi
    printf '%s\n' "$2" >"$1.tmp.$$"
    mv -f "$1.tmp.$$" "$1"
}

write_config() { # returns 0 when something changed
    local changed=1
    write_file "$ETC_DIR/libvirtd.conf" "$LIBVIRTD_CONF" && changed=0
    write_file "$ETC_DIR/virtlogd.conf" "$VIRTLOGD_CONF" && changed=0
    write_file "$ETC_DIR/qemu.conf" "$QEMU_CONF" && changed=0
    return $changed
}

# The QEMU capability probe takes ~7.5 s: a private cache that is still empty starts from
# a copy of the primary host's (only read; libvirt re-probes when it does not fit).
seed_cache() {
    local src=/var/cache/libvirt/qemu/capabilities dst=$CACHE_DIR/qemu/capabilities
    [ -d "$dst" ] && [ -n "$(ls -A "$dst" 2>/dev/null)" ] && return 0
    if [ -d "$src" ] && [ -n "$(ls -A "$src" 2>/dev/null)" ]; then
        say "seeding the QEMU capability cache from $src"
        mkdir -p "$dst"
        cp -a "$src/." "$dst/"
    fi
}

create_mntns() {
    say "creating the private mount namespace ($MNT_NS)"
    # The file that keeps the namespace must sit on a private mount.
    if ! findmnt -rn --mountpoint "$NS_DIR" >/dev/null 2>&1; then
        mount --bind "$NS_DIR" "$NS_DIR"
    fi
    mount --make-private "$NS_DIR"
    : >"$MNT_NS"
    local var_run=""
    [ "$(readlink -f /var/run)" = /run ] || var_run=1
    # shellcheck disable=SC2016  # expanded by that sh, from its arguments
    unshare --mount="$MNT_NS" --propagation private -- /bin/sh -euc '
        mount --bind "$1" /run
        [ -z "$6" ] || mount --bind "$1" /var/run
        mount --bind "$2" /var/lib/libvirt
        mount --bind "$3" /var/log/libvirt
        mount --bind "$4" /etc/libvirt
        mount --bind "$5" /var/cache/libvirt
    ' sh "$RUN_DIR" "$LIB_DIR" "$LOG_DIR" "$ETC_DIR" "$CACHE_DIR" "$var_run" \
        || { umount "$MNT_NS" 2>/dev/null || true; die "could not set up the mount namespace"; }
}

# 10.213.0.0/24 must be free on this machine: no address in it but our veth's, no route
# to it but the default route(s), our veth's and our unreachable one.
check_range() {
    local other routes
    other=$(ip -o -4 addr show to "$NET" | awk -v me="$VETH_HOST" '$2 != me {print $2 " " $4}')
    [ -z "$other" ] || die "$NET is already used on this machine (address ${other//$'\n'/, }); the second host needs that range for itself: not started"
    local net_re=${NET//./\\.}
    routes=$(ip -4 route show table all match "$NS_ADDR" | sed 's/ *$//' | grep -Ev \
        -e '^([a-z]+ )?default( |$)' \
        -e "^$net_re dev $VETH_HOST( |\$)" \
        -e "^unreachable $net_re metric $UNREACHABLE_METRIC\$" || true)
    [ -z "$routes" ] || die "$NET is already used on this machine (route ${routes//$'\n'/; }); the second host needs that range for itself: not started"
}

# The host's table: only root (uid 0 in the initial user namespace) reaches the second
# host, and nothing is forwarded to or from it. Replaced as a whole (idempotent).
host_firewall() {
    nft -f - <<NFT || die "nft refused the rules of table $NFT_TABLE"
add table $NFT_TABLE
delete table $NFT_TABLE
table $NFT_TABLE {
    chain output {
        type filter hook output priority 0; policy accept;
        ip daddr $NET meta skuid != 0 jump refuse
        oifname "$VETH_HOST" meta skuid != 0 jump refuse
    }
    chain refuse {
        meta l4proto tcp reject with tcp reset
        reject with icmpx admin-prohibited
    }
    chain forward {
        type filter hook forward priority 0; policy accept;
        ip daddr $NET drop
        ip saddr $NET drop
        oifname "$VETH_HOST" drop
        iifname "$VETH_HOST" drop
    }
}
NFT
}

# The namespace's table: packets come in only from the host side of the pair (and lo).
ns_firewall() {
    nsenter --net="$NETNS_FILE" -- nft -f - <<NFT || die "nft refused the rules of table $NFT_TABLE in $NETNS"
add table $NFT_TABLE
delete table $NFT_TABLE
table $NFT_TABLE {
    chain input {
        type filter hook input priority 0; policy drop;
        iif "lo" accept
        ip saddr $HOST_ADDR accept
    }
}
NFT
}

create_netns() {
    host_firewall
    if ! netns_up; then
        say "creating network namespace $NETNS"
        ip netns add "$NETNS" || die "ip netns add $NETNS failed"
    fi
    ns_firewall
    if ! ip link show "$VETH_HOST" >/dev/null 2>&1; then
        say "creating veth pair $VETH_HOST ($HOST_ADDR) <-> $VETH_NS ($NS_ADDR, in $NETNS)"
        ip link add "$VETH_HOST" type veth peer name "$VETH_NS" netns "$NETNS" \
            || die "could not create the veth pair"
    fi
    # Until stop has removed everything else: whenever the pair is not (yet, any more)
    # there, packets for 10.213.0.0/24 fail here instead of leaving through the default
    # route (the pair's route has metric 0).
    ip route replace unreachable "$NET" metric "$UNREACHABLE_METRIC"
    ip addr replace "$HOST_ADDR/$PREFIX" dev "$VETH_HOST"
    ip link set "$VETH_HOST" up
    ip -n "$NETNS" link set lo up
    ip -n "$NETNS" addr replace "$NS_ADDR/$PREFIX" dev "$VETH_NS"
    ip -n "$NETNS" link set "$VETH_NS" up
}

LOG_OFFSET=0

show_libvirtd_log() {
    if [ -s "$LIBVIRTD_STDERR" ]; then
        printf -- '--- %s ---\n' "$LIBVIRTD_STDERR" >&2
        tail -n 30 "$LIBVIRTD_STDERR" >&2
    fi
    if [ -s "$LIBVIRTD_LOG" ]; then
        printf -- '--- last 30 lines of %s (this start) ---\n' "$LIBVIRTD_LOG" >&2
        tail -c +"$((LOG_OFFSET + 1))" "$LIBVIRTD_LOG" | tail -n 30 >&2
        echo "(errors about dnsmasq, D-Bus, udev DMI and dmidecode are harmless here)" >&2
    else
        echo "($LIBVIRTD_LOG is empty or missing)" >&2
    fi
}

ensure_users() {
    # libvirt resolves its default QEMU user before reading qemu.conf: it must exist.
    getent group kvm >/dev/null || { say "creating group kvm"; groupadd -r kvm; }
    getent group libvirt-qemu >/dev/null || { say "creating group libvirt-qemu"; groupadd -r libvirt-qemu; }
    id libvirt-qemu >/dev/null 2>&1 || {
        say "creating user libvirt-qemu"
        useradd -r -g libvirt-qemu -s /usr/sbin/nologin libvirt-qemu
    }
}

cmd_start() {
    need_root
    check_tools
    take_lock
    ensure_users

    if mntns_up && netns_up; then
        say "namespaces exist (mount: $MNT_NS, network: $NETNS)"
    elif mntns_up || netns_up; then
        say "only part of the second host is there: tearing it down first"
        teardown
    fi
    check_range
    make_dirs
    local conf_changed=0
    write_config && conf_changed=1
    seed_cache
    mntns_up || create_mntns
    create_netns

    local pid
    if pid=$(daemon_pid "$VIRTLOGD_PID" "$VIRTLOGD_NAME"); then
        say "virtlogd already running (pid $pid)"
    else
        say "starting virtlogd"
        in_ns "$BIN_DIR/$VIRTLOGD_NAME" -d -p "$VIRTLOGD_PID_NS" \
            </dev/null >"$VIRTLOGD_STDERR" 2>&1 9>&- \
            || { cat "$VIRTLOGD_STDERR" >&2; die "virtlogd failed to start"; }
    fi

    if pid=$(daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME"); then
        if [ "$(proc_state "$pid")" = T ]; then
            say "libvirtd (pid $pid) is stopped: sending SIGCONT"
            kill -CONT "$pid" 2>/dev/null || true
        fi
        if libvirt_up; then
            [ "$conf_changed" = 0 ] \
                || say "WARNING: libvirtd runs with an old configuration; run '$0 stop' then '$0 start'"
            say "libvirtd already running (pid $pid, $URI answers)"
            return 0
        fi
        say "libvirtd (pid $pid) exists but $URI does not answer yet; waiting for it"
    else
        say "starting libvirtd (taskset -c 0, listening on $NS_ADDR:$PORT, log: $LIBVIRTD_LOG)"
        LOG_OFFSET=$(stat -c %s "$LIBVIRTD_LOG" 2>/dev/null || echo 0)
        # --listen: libvirt 9 without systemd socket activation only opens TCP with it
        in_ns taskset -c 0 "$BIN_DIR/$LIBVIRTD_NAME" -d --listen \
            -f /etc/libvirt/libvirtd.conf -p "$LIBVIRTD_PID_NS" \
            </dev/null >"$LIBVIRTD_STDERR" 2>&1 9>&- \
            || { show_libvirtd_log; die "libvirtd failed to start"; }
    fi

    say "waiting up to ${START_TIMEOUT}s for '$URI'"
    local deadline=$((SECONDS + START_TIMEOUT))
    while ! libvirt_up; do
        if ! daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME" >/dev/null; then
            sleep 0.3   # the pid file appears a moment after the daemon forks
            if ! daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME" >/dev/null && ! libvirt_up; then
                show_libvirtd_log
                die "libvirtd exited during startup (see log above)"
            fi
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_libvirtd_log
            die "libvirtd did not answer on $URI within ${START_TIMEOUT}s (see log above)"
        fi
        sleep 0.2
    done
    say "second host ready at $URI (libvirtd pid $(daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME" || echo '?'))"
}

# ----------------------------------------------------------------------------- domain
xml_escape() {
    local s=$1 amp='&amp;' lt='&lt;' gt='&gt;' apos='&apos;' quot='&quot;'
    # Quoted replacements: bash 5.2's patsub_replacement would expand a bare '&'.
    s=${s//&/"$amp"}
    s=${s//</"$lt"}
    s=${s//>/"$gt"}
    s=${s//\'/"$apos"}
    s=${s//\"/"$quot"}
    printf '%s' "$s"
}

kvm_usable() { [ -c /dev/kvm ] && { : <>/dev/kvm; } 2>/dev/null; }

remove_domain() {
    local name=$1
    virsh_q dominfo "$name" >/dev/null 2>&1 || return 0
    if [ "$(virsh_q domstate "$name" 2>/dev/null | head -n1)" != "shut off" ]; then
        say "destroying domain $name"
        virsh_q destroy "$name" >&2 || return 1
    fi
    say "undefining domain $name"
    virsh_q undefine "$name" >&2 || return 1
}

rfb_banner() { # port: the first 12 bytes a VNC server sends, without the newline
    # shellcheck disable=SC2016  # expanded by that bash, from its arguments
    timeout 5 bash -c 'exec 3<>"/dev/tcp/$0/$1" && head -c 12 <&3' "$NS_ADDR" "$1" 2>/dev/null
}

cmd_domain() {
    need_root
    local name=${1:-} pw listen=0.0.0.0
    [ $# -ge 2 ] || usage
    pw=$2
    shift 2
    while [ $# -gt 0 ]; do
        case $1 in
            --listen) [ $# -ge 2 ] || die "--listen needs an address"; listen=$2; shift 2 ;;
            *) die "unknown option for domain: $1" ;;
        esac
    done
    [[ $name =~ ^[A-Za-z0-9][A-Za-z0-9_.+-]*$ ]] || die "invalid domain name '$name' (use letters, digits, _ . + -)"
    [ ${#pw} -le 8 ] || die "VNC password longer than 8 characters (libvirt 9.0 refuses it)"
    take_lock
    libvirt_up || die "the second host does not answer on $URI: run '$0 start' first"

    local type=${VIZOR_DOMAIN_TYPE:-}
    if [ -z "$type" ]; then type=qemu; kvm_usable && type=kvm; fi
    [[ $type == kvm || $type == qemu ]] || die "VIZOR_DOMAIN_TYPE must be kvm or qemu"
    remove_domain "$name" || die "could not remove the old domain $name"

    local pw_attr=""
    [ -z "$pw" ] || pw_attr=" passwd='$(xml_escape "$pw")'"
    local xmlfile
    xmlfile=$(umask 077 && mktemp /tmp/vizor-h2-domain.XXXXXX.xml)
    # shellcheck disable=SC2064
    trap "rm -f '$xmlfile'" EXIT
    cat >"$xmlfile" <<EOF
<domain type='$type'>
  <name>$name</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type><bootmenu enable='yes' timeout='30000'/></os>
  <devices>
    <emulator>$EMULATOR</emulator>
    <graphics type='vnc' autoport='yes' listen='$(xml_escape "$listen")'$pw_attr/>
    <video><model type='vga'/></video>
  </devices>
</domain>
EOF
    say "defining domain $name on the second host (type $type, VNC on $listen)"
    virsh_q define "$xmlfile" >&2 || die "virsh define $name failed"
    rm -f "$xmlfile"
    say "starting domain $name"
    if ! virsh_q start "$name" >&2; then
        local qlog=$LOG_DIR/qemu/$name.log
        [ -s "$qlog" ] && { echo "--- last 30 lines of $qlog ---" >&2; tail -n 30 "$qlog" >&2; }
        die "virsh start $name failed"
    fi

    local line port haspw
    line=$(virsh_q dumpxml --security-info "$name" | grep -m1 "<graphics type='vnc'") \
        || die "no VNC graphics in the live XML of $name"
    port=$(printf '%s' "$line" | sed -n "s/.* port='\([-0-9]*\)'.*/\1/p")
    haspw=$(printf '%s' "$line" | grep -c " passwd=" || true)
    if ! [[ $port =~ ^[0-9]+$ ]] || [ "$port" -eq 0 ]; then
        die "no live VNC port for $name (got '$port')"
    fi
    say "domain $name running; VNC password $([ "$haspw" = 1 ] && echo set || echo not set)"

    case $listen in
        0.0.0.0|::|"$NS_ADDR")
            local i banner=""
            for i in $(seq 25); do
                banner=$(rfb_banner "$port" || true)
                [ "$banner" = "RFB 003.008" ] && break
                sleep 0.2
            done
            [ "$banner" = "RFB 003.008" ] \
                || die "VNC of $name is not reachable at $NS_ADDR:$port (got '${banner:0:12}')"
            say "VNC answers at $NS_ADDR:$port"
            ;;
        *) say "VNC listens on $listen inside the namespace: not checked from the host" ;;
    esac
    echo "vnc_port=$port"
}

# -------------------------------------------------------------------------------- pid
cmd_pid() {
    local pid
    pid=$(daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME") || die "the second host's libvirtd is not running"
    echo "$pid"
}

# ------------------------------------------------------------------------------- stop
# Of the given pids, those not gone yet (a zombie counts as gone: it has let go of the
# namespaces, only its parent, init here, has still to reap it).
still_there() {
    local p st
    for p in "$@"; do
        st=$(proc_state "$p") || continue
        case $st in Z|X|x|'') ;; *) echo "$p" ;; esac
    done
    return 0
}

kill_ns_processes() {
    local pids p i left
    ns_distinct || die "refusing to kill the processes of the host's own namespaces"
    pids=$(ns_pids) || die "refusing to kill the processes of the host's own namespaces"
    [ -n "$pids" ] || return 0
    say "terminating the processes of the second host: $(for p in $pids; do printf '%s(%s) ' "$p" "$(cat "/proc/$p/comm" 2>/dev/null)"; done)"
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; kill -CONT "$p" 2>/dev/null || true; done
    for i in $(seq 80); do
        # shellcheck disable=SC2086
        left=$( { ns_pids; still_there $pids; } | sort -u)
        [ -n "$left" ] || return 0
        if [ "$i" = 30 ]; then
            say "still running after 3 s, SIGKILL: ${left//$'\n'/ }"
            for p in $left; do kill -KILL "$p" 2>/dev/null || true; done
            pids="$pids $left"
        fi
        sleep 0.1
    done
    die "processes of the second host survive SIGKILL: ${left//$'\n'/ }"
}

teardown() {
    kill_ns_processes
    if mntns_up; then
        say "removing the mount namespace"
        umount "$MNT_NS" || umount -l "$MNT_NS" || die "could not unmount $MNT_NS"
    fi
    rm -f "$MNT_NS"
    if findmnt -rn --mountpoint "$NS_DIR" >/dev/null 2>&1; then
        umount "$NS_DIR" 2>/dev/null || true
    fi
    if ip link show "$VETH_HOST" >/dev/null 2>&1; then
        ip link del "$VETH_HOST" 2>/dev/null || true
    fi
    if netns_up || [ -e "$NETNS_FILE" ]; then
        say "removing network namespace $NETNS"
        ip netns del "$NETNS" 2>/dev/null || rm -f "$NETNS_FILE"
    fi
    # Domain definitions and run state go; the capability cache and the logs stay.
    rm -rf "$RUN_DIR" "$LIB_DIR" "$ETC_DIR"
    # Last: nothing of ours is left that could send to 10.213.0.x.
    if ip -4 route show "$NET" metric "$UNREACHABLE_METRIC" type unreachable | grep -q .; then
        ip route del unreachable "$NET" metric "$UNREACHABLE_METRIC" 2>/dev/null || true
    fi
    if nft list table "$NFT_TABLE" >/dev/null 2>&1; then
        nft delete table "$NFT_TABLE" || say "WARNING: could not delete nftables table $NFT_TABLE"
    fi
}

cmd_stop() {
    need_root
    take_lock
    local pid
    if pid=$(daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME") && [ "$(proc_state "$pid")" = T ]; then
        say "libvirtd (pid $pid) is stopped: sending SIGCONT"
        kill -CONT "$pid" 2>/dev/null || true
    fi
    if (mntns_up || netns_up) && libvirt_up; then
        local d running=() all=() cmds=""
        mapfile -t running < <(virsh_q list --name 2>/dev/null | sed '/^$/d')
        mapfile -t all < <(virsh_q list --all --name 2>/dev/null | sed '/^$/d')
        if [ ${#running[@]} -gt 0 ]; then
            # each destroy takes ~1.4 s (libvirt waits for QEMU to go): all at once
            say "destroying domains: ${running[*]}"
            for d in "${running[@]}"; do virsh_q destroy "$d" >/dev/null 2>&1 & done
            wait || true
        fi
        if [ ${#all[@]} -gt 0 ]; then
            say "undefining domains: ${all[*]}"
            for d in "${all[@]}"; do cmds+="undefine '$d'; "; done
            virsh_q "$cmds" >/dev/null 2>&1 || say "WARNING: undefining failed (the state is removed below anyway)"
        fi
    elif mntns_up || netns_up; then
        say "libvirtd does not answer: its domains' QEMU processes are killed instead"
    fi
    teardown
    say "second host stopped"
}

# ----------------------------------------------------------------------------- status
cmd_status() {
    local pid
    if ! libvirt_up; then
        echo "second host: down ($URI does not answer)"
        mntns_up && say "mount namespace $MNT_NS exists"
        netns_up && say "network namespace $NETNS exists"
        pid=$(daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME") \
            && say "libvirtd pid $pid exists (state $(proc_state "$pid"))"
        return 1
    fi
    pid=$(daemon_pid "$LIBVIRTD_PID" "$LIBVIRTD_NAME" || echo '?')
    echo "second host: up at $URI (libvirtd pid $pid)"
    virsh -c "$URI" version
    echo "KVM: $(kvm_usable && echo usable || echo 'not usable (domains use TCG)')"
    virsh -c "$URI" list --all
}

case ${1:-} in
    start)  shift; cmd_start "$@" ;;
    domain) shift; cmd_domain "$@" ;;
    pid)    shift; cmd_pid "$@" ;;
    stop)   shift; cmd_stop "$@" ;;
    status) shift; cmd_status "$@" ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
