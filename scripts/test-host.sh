#!/usr/bin/env bash
# test-host.sh — set up a real libvirtd + QEMU test host for vizor's integration tests.
#
# Follows the verified recipe in /work/shared/libvirt-test-host.md ("A real libvirt + QEMU
# host on these machines"): Debian 12, run as root, no systemd. libvirtd and virtlogd are
# started by hand (libvirtd pinned to CPU 0 so the QEMU capability cache survives restarts),
# and disk-less test domains with VNC/SPICE are (re)defined on qemu:///system. Domains use
# type 'kvm' when /dev/kvm is usable, else 'qemu' (TCG).
#
# Usage:
#   test-host.sh install      apt-get install the packages (only those missing)
#   test-host.sh start        users, test CA, qemu.conf, dirs; start virtlogd + libvirtd
#                            if not running. The test CA (/var/lib/vizor-test/pki: ca-cert.pem, server-*
#                            for 127.0.0.1, client-* for vizor) serves SPICE's TLS port
#                            (spice_tls = 1: every SPICE domain gets a tlsPort beside its
#                            plain port) and --vnc-tls domains.
#   test-host.sh domain NAME [--vnc-passwd P] [--spice-passwd P] [--vnc-socket PATH | --vnc-listen ADDR]
#                            [--no-spice] [--spice-uncompressed] [--shutoff]
#                            [--mode-switch-disk | --animate-disk | --pattern-disk]
#                            [--vnc-tls | --vnc-tls-verify] [--vnc-keymap K]
#                            --vnc-tls makes QEMU's VNC server VeNCrypt X.509 only (the
#                            test CA's server certificate, as libvirt's vnc_tls = 1 does);
#                            --vnc-tls-verify also demands a client certificate of that CA
#                            --spice-uncompressed turns SPICE image compression off
#                            (<image compression='off'/>): drawings go as raw bitmaps
#                            --vnc-listen ADDR: VNC listens there (default 127.0.0.1)
#                            --vnc-keymap gives the VNC graphics libvirt's keymap
#                            attribute (QEMU's -k: keys by keysym, even extended ones)
#                            --mode-switch-disk boots a 512-byte sector that switches the
#                            VGA to 320x200 graphics (mode 13h): a guest reset then makes
#                            QEMU resize the VNC desktop, for tests of resize framing;
#                            --animate-disk boots one that fills the 320x200 screen with
#                            the next colour 18 times a second (benchmarks of a changing
#                            screen); --pattern-disk changes every pixel 18 times a
#                            second with a pattern that does not compress to nothing
#                            (re)define and start a test domain; last stdout line is
#                            vnc_port=N (vnc_socket=PATH with --vnc-socket, vnc_port=-1 with
#                            --shutoff)
#   test-host.sh vnc-port NAME   print the live VNC TCP port of a running domain
#   test-host.sh restart-libvirtd   stop libvirtd (domains keep running) and start it again
#   test-host.sh stall-port PORT    drop every loopback TCP packet to or from PORT (nftables
#                            table inet vizor_test): the network to a console stalls
#   test-host.sh unstall-port       drop nothing any more (removes that table)
#   test-host.sh stop         remove vizor-test-*/vizor-demo* domains, stop libvirtd + virtlogd
#   test-host.sh status       libvirt version and domain list
#
# Domain type: 'kvm' when /dev/kvm opens read-write, else 'qemu' (TCG); VIZOR_DOMAIN_TYPE
# overrides. Progress goes to stderr; stdout only carries the results named above.
# Passwords are never printed.
set -euo pipefail

URI="qemu:///system"
PACKAGES=(qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config openssl nftables iproute2)
QEMU_CONF=/etc/libvirt/qemu.conf
LIBVIRTD=/usr/sbin/libvirtd
VIRTLOGD=/usr/sbin/virtlogd
LIBVIRTD_PID=/run/libvirtd.pid
VIRTLOGD_PID=/run/virtlogd.pid
LOG_DIR=/var/log/libvirt
LIBVIRTD_LOG=$LOG_DIR/libvirtd.log          # daemon log (errors), via LIBVIRT_LOG_OUTPUTS
LIBVIRTD_STDERR=$LOG_DIR/libvirtd.stderr    # anything printed before it daemonizes
VIRTLOGD_STDERR=$LOG_DIR/virtlogd.stderr
START_TIMEOUT=60
EMULATOR=/usr/bin/qemu-system-x86_64

PKI_DIR=/var/lib/vizor-test/pki

QEMU_CONF_CONTENT='user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
spice_tls = 1
spice_tls_x509_cert_dir = "'$PKI_DIR'"'

say() { printf 'test-host: %s\n' "$*" >&2; }
die() { printf 'test-host: ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '/^# Usage:/,/^# Domain type/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

need_root() { [ "$(id -u)" -eq 0 ] || die "must run as root (libvirtd on qemu:///system)"; }

virsh_q() { virsh -q -c "$URI" "$@"; }

libvirt_up() { timeout 5 virsh -c "$URI" version >/dev/null 2>&1; }

pid_alive() { # pidfile name
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# ---------------------------------------------------------------------------------- install
cmd_install() {
    need_root
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "packages already installed: ${PACKAGES[*]}"
        return 0
    fi
    say "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2 || die "apt-get update failed"
    apt-get install -y "${missing[@]}" >&2 \
        || die "apt-get install failed for: ${missing[*]}"
}

# ------------------------------------------------------------------------------------ start
ensure_users() {
    # libvirt resolves its default QEMU user before reading qemu.conf: it must exist.
    getent group kvm >/dev/null || { say "creating group kvm"; groupadd -r kvm; }
    getent group libvirt-qemu >/dev/null || { say "creating group libvirt-qemu"; groupadd -r libvirt-qemu; }
    id libvirt-qemu >/dev/null 2>&1 || {
        say "creating user libvirt-qemu"
        useradd -r -g libvirt-qemu -s /usr/sbin/nologin libvirt-qemu
    }
}

ensure_qemu_conf() { # returns 0 when the file was (re)written
    mkdir -p /etc/libvirt
    if [ -f "$QEMU_CONF" ] && [ "$(cat "$QEMU_CONF")" = "$QEMU_CONF_CONTENT" ]; then
        say "$QEMU_CONF already as the recipe says"
        return 1
    fi
    if [ -f "$QEMU_CONF" ] && [ ! -e "$QEMU_CONF.vizor-orig" ]; then
        say "backing up existing $QEMU_CONF to $QEMU_CONF.vizor-orig"
        cp -p "$QEMU_CONF" "$QEMU_CONF.vizor-orig"
    fi
    say "writing $QEMU_CONF (root, no security driver, no cgroups/namespaces)"
    printf '%s\n' "$QEMU_CONF_CONTENT" >"$QEMU_CONF.tmp.$$"
    mv -f "$QEMU_CONF.tmp.$$" "$QEMU_CONF"
    return 0
}

# A test CA with a server certificate for 127.0.0.1 (QEMU's VNC and SPICE TLS) and a
# client certificate (vizor, for QEMU's verify-peer), made once. Keys are 0600.
ensure_pki() {
    if [ -s "$PKI_DIR/ca-cert.pem" ] && [ -s "$PKI_DIR/server-cert.pem" ] && [ -s "$PKI_DIR/client-cert.pem" ]; then
        return 0
    fi
    command -v openssl >/dev/null || die "openssl not found: run '$0 install' first"
    say "making the test CA and certificates in $PKI_DIR"
    mkdir -p "$PKI_DIR"
    (
        set -e
        cd "$PKI_DIR"
        umask 077
        openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=vizor test CA" \
            -keyout ca-key.pem -out ca-cert.pem \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        issue() { # name subject extensions
            openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
            printf '%s\n' "$3" >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
                -days 3650 -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
            rm -f "$1.csr" "$1.ext"
        }
        issue server "/CN=127.0.0.1" "subjectAltName=IP:127.0.0.1,DNS:localhost
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth"
        issue client "/CN=vizor" "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
        chmod 644 ca-cert.pem server-cert.pem client-cert.pem
    ) || die "making the test CA failed"
}

LOG_OFFSET=0   # size of $LIBVIRTD_LOG before this start: show only what this run wrote

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

cmd_start() {
    need_root
    [ -x "$LIBVIRTD" ] && [ -x "$VIRTLOGD" ] && command -v virsh >/dev/null \
        || die "libvirtd/virtlogd/virsh not found: run '$0 install' first"
    command -v taskset >/dev/null || die "taskset not found (package util-linux)"

    ensure_users
    ensure_pki
    local conf_changed=0
    ensure_qemu_conf && conf_changed=1
    mkdir -p /run/libvirt /run/lock /var/lib/libvirt/qemu "$LOG_DIR/qemu" /var/cache/libvirt/qemu

    if pid_alive "$VIRTLOGD_PID" virtlogd || pgrep -x virtlogd >/dev/null; then
        say "virtlogd already running"
    else
        say "starting virtlogd"
        "$VIRTLOGD" -d -p "$VIRTLOGD_PID" </dev/null >"$VIRTLOGD_STDERR" 2>&1 \
            || { cat "$VIRTLOGD_STDERR" >&2; die "virtlogd failed to start"; }
    fi

    if libvirt_up; then
        if [ "$conf_changed" = 1 ]; then
            say "WARNING: libvirtd is running with the old $QEMU_CONF; run '$0 stop' then '$0 start'"
        fi
        say "libvirtd already running ($URI answers)"
        return 0
    fi
    if pid_alive "$LIBVIRTD_PID" libvirtd || pgrep -x libvirtd >/dev/null; then
        say "libvirtd process exists but $URI does not answer yet; waiting for it"
    else
        say "starting libvirtd (taskset -c 0, log: $LIBVIRTD_LOG)"
        LOG_OFFSET=$(stat -c %s "$LIBVIRTD_LOG" 2>/dev/null || echo 0)
        # Without systemd/journald, errors go to this file; set explicitly so it is certain.
        LIBVIRT_LOG_OUTPUTS="3:file:$LIBVIRTD_LOG" \
            taskset -c 0 "$LIBVIRTD" -d -p "$LIBVIRTD_PID" </dev/null >"$LIBVIRTD_STDERR" 2>&1 \
            || { show_libvirtd_log; die "libvirtd failed to start"; }
    fi

    say "waiting up to ${START_TIMEOUT}s for '$URI' (the first start probes QEMU, ~8 s)"
    local deadline=$((SECONDS + START_TIMEOUT))
    while ! libvirt_up; do
        if ! pid_alive "$LIBVIRTD_PID" libvirtd && ! pgrep -x libvirtd >/dev/null; then
            show_libvirtd_log
            die "libvirtd exited during startup (see log above)"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            show_libvirtd_log
            die "libvirtd did not answer on $URI within ${START_TIMEOUT}s (see log above)"
        fi
        sleep 0.2
    done
    say "libvirtd ready: $(virsh -c "$URI" version 2>/dev/null | sed -n 's/^Running hypervisor: //p')"
}

# ----------------------------------------------------------------------------------- domain
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

check_name() {
    [ -n "${1:-}" ] || usage
    [[ $1 =~ ^[A-Za-z0-9][A-Za-z0-9_.+-]*$ ]] || die "invalid domain name '$1' (use letters, digits, _ . + -)"
}

require_libvirt() { libvirt_up || die "libvirtd does not answer on $URI: run '$0 start' first"; }

domain_exists() { virsh_q dominfo "$1" >/dev/null 2>&1; }

domain_state() { virsh_q domstate "$1" 2>/dev/null | head -n1; }

remove_domain() {
    local name=$1
    domain_exists "$name" || return 0
    if [ "$(domain_state "$name")" != "shut off" ]; then
        say "destroying domain $name"
        virsh_q destroy "$name" >&2 || die "virsh destroy $name failed"
    fi
    say "undefining domain $name"
    virsh_q undefine "$name" >&2 || die "virsh undefine $name failed"
}

# Reads the live XML (with security info, needed to tell whether a password is set) and
# prints "PORT SOCKET HAS_PASSWD" for the VNC graphics; the password itself never leaves.
vnc_info() {
    local xml
    xml=$(virsh_q dumpxml --security-info "$1" 2>/dev/null) || die "virsh dumpxml $1 failed (does it exist?)"
    if command -v python3 >/dev/null; then
        printf '%s' "$xml" | python3 -c '
import sys, xml.etree.ElementTree as ET
g = ET.fromstring(sys.stdin.read()).find("./devices/graphics[@type=\"vnc\"]")
if g is None:
    print("none - 0")
else:
    print(g.get("port", "-1"), g.get("socket") or "-", 1 if g.get("passwd") else 0)
'
    else
        local line port sock
        line=$(printf '%s\n' "$xml" | grep -m1 "<graphics type='vnc'") || { echo "none - 0"; return; }
        port=$(printf '%s' "$line" | sed -n "s/.* port='\([-0-9]*\)'.*/\1/p")
        sock=$(printf '%s' "$line" | sed -n "s/.* socket='\([^']*\)'.*/\1/p")
        printf '%s %s %s\n' "${port:--1}" "${sock:--}" "$(printf '%s' "$line" | grep -c " passwd=")"
    fi
}

# A boot sector, in 16-bit machine code: switch the VGA to mode 13h (320x200, 256
# colours), fill the screen with colour 42, halt.
#   mov ax,0x0013; int 0x10; mov ax,0xa000; mov es,ax; xor di,di; cld
#   mov ax,0x2a2a; mov cx,0x7d00; rep stosw; hlt; jmp $-1
write_modeswitch_sector() {
    write_boot_sector "$1" b81300cd10b800a08ec031fffcb82a2ab9007df3abf4ebfd
}

# A boot sector that keeps the whole screen changing, for measuring what a changing
# screen costs: mode 13h, then each timer tick (18.2 Hz) the screen is filled with the
# next colour.
#   mov ax,0x0013; int 0x10; sti; mov ax,0xa000; mov es,ax; cld
#   l: xor di,di; mov cx,0xfa00; mov al,bl; rep stosb; inc bl; hlt; jmp l
write_animate_sector() {
    write_boot_sector "$1" b81300cd10fbb800a08ec0fc31ffb900fa88d8f3aafec3f4ebf2
}

# A boot sector that changes every pixel each timer tick with a pattern that does not
# compress to nothing (a solid colour does): pixel = (offset low ^ offset high) + frame,
# frame stepping by 37.
#   mov ax,0x0013; int 0x10; sti; mov ax,0xa000; mov es,ax; cld
#   l: xor di,di; mov cx,0xfa00
#   p: mov ax,di; xor al,ah; add al,bl; stosb; loop p
#   add bl,0x25; hlt; jmp l
write_pattern_sector() {
    write_boot_sector "$1" b81300cd10fbb800a08ec0fc31ffb900fa89f830e000d8aae2f780c325f4ebec
}

# A 1 MiB disk image at $1 whose first sector boots the machine code $2 (hex).
write_boot_sector() {
    python3 - "$1" "$2" <<'PY'
import sys
code = bytes.fromhex(sys.argv[2])
sector = code + bytes(510 - len(code)) + b"\x55\xaa"
with open(sys.argv[1], "wb") as f:
    f.write(sector + bytes(1024 * 1024 - 512))
PY
}

cmd_domain() {
    need_root
    local name=${1:-}
    [ $# -gt 0 ] && shift
    check_name "$name"
    local vnc_pw="" spice_pw="" vnc_sock="" spice=1 shutoff=0 modeswitch=0 vnc_tls= keymap= spice_image= vnc_listen=127.0.0.1
    while [ $# -gt 0 ]; do
        case $1 in
            --vnc-passwd)   [ $# -ge 2 ] || die "--vnc-passwd needs a value"; vnc_pw=$2; shift 2 ;;
            --spice-passwd) [ $# -ge 2 ] || die "--spice-passwd needs a value"; spice_pw=$2; shift 2 ;;
            --vnc-socket)   [ $# -ge 2 ] || die "--vnc-socket needs a path"; vnc_sock=$2; shift 2 ;;
            --vnc-listen)   [ $# -ge 2 ] || die "--vnc-listen needs an address"; vnc_listen=$2; shift 2 ;;
            --no-spice)     spice=0; shift ;;
            --spice-uncompressed) spice_image="<image compression='off'/>"; shift ;;
            --shutoff)      shutoff=1; shift ;;
            --mode-switch-disk) modeswitch=1; shift ;;
            --animate-disk) modeswitch=2; shift ;;
            --pattern-disk) modeswitch=3; shift ;;
            --vnc-tls)      vnc_tls=no; shift ;;
            --vnc-tls-verify) vnc_tls=yes; shift ;;
            --vnc-keymap)   [ $# -ge 2 ] || die "--vnc-keymap needs a value"; keymap=$2; shift 2 ;;
            *) die "unknown option for domain: $1" ;;
        esac
    done
    [ ${#vnc_pw} -le 8 ] || die "VNC password longer than 8 characters (libvirt 9.0 refuses it)"
    [ -z "$vnc_sock" ] || [[ $vnc_sock == /* ]] || die "--vnc-socket needs an absolute path"
    require_libvirt

    local type=${VIZOR_DOMAIN_TYPE:-}
    if [ -z "$type" ]; then type=qemu; kvm_usable && type=kvm; fi
    [[ $type == kvm || $type == qemu ]] || die "VIZOR_DOMAIN_TYPE must be kvm or qemu"
    remove_domain "$name"

    local vnc_attrs spice_xml="" pw_attr=""
    [ -n "$vnc_pw" ] && pw_attr=" passwd='$(xml_escape "$vnc_pw")'"
    if [ -n "$vnc_sock" ]; then
        mkdir -p "$(dirname "$vnc_sock")"
        rm -f "$vnc_sock"
        vnc_attrs="socket='$(xml_escape "$vnc_sock")'$pw_attr"
    else
        vnc_attrs="autoport='yes' listen='$(xml_escape "$vnc_listen")'$pw_attr websocket='-1'"
    fi
    [ -z "$keymap" ] || vnc_attrs="$vnc_attrs keymap='$(xml_escape "$keymap")'"
    if [ "$spice" = 1 ]; then
        pw_attr=""
        [ -n "$spice_pw" ] && pw_attr=" passwd='$(xml_escape "$spice_pw")'"
        # A USB redirection channel, as virt-manager adds by default: vizor must not
        # offer or relay it unless configured to.
        spice_xml="    <graphics type='spice' autoport='yes' listen='127.0.0.1'$pw_attr>$spice_image</graphics>
    <redirdev bus='usb' type='spicevmc'/>"
    fi

    local os_xml="<bootmenu enable='yes' timeout='30000'/>" disk_xml=""
    if [ "$modeswitch" != 0 ]; then
        local img=/var/lib/vizor-test/$name-modeswitch.img
        mkdir -p /var/lib/vizor-test
        if [ "$modeswitch" = 2 ]; then
            write_animate_sector "$img"
        elif [ "$modeswitch" = 3 ]; then
            write_pattern_sector "$img"
        else
            write_modeswitch_sector "$img"
        fi
        os_xml="<boot dev='hd'/>"
        disk_xml="    <disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='$img'/><target dev='hda' bus='ide'/></disk>"
    fi

    # VeNCrypt X.509 for this domain alone (libvirt's vnc_tls is for all of them): the
    # credentials object, and -set to give it to the VNC display libvirt configures.
    local tls_args=""
    if [ -n "$vnc_tls" ]; then
        ensure_pki
        tls_args="
    <qemu:arg value='-object'/>
    <qemu:arg value='tls-creds-x509,id=vizor-vnc-tls,dir=$PKI_DIR,endpoint=server,verify-peer=$vnc_tls'/>
    <qemu:arg value='-set'/>
    <qemu:arg value='vnc.default.tls-creds=vizor-vnc-tls'/>"
    fi
    # QEMU's trace of the i8042 turning scan code translation on, from the first
    # instruction: SeaBIOS does that last when it sets the keyboard up, and a key that
    # arrives while it resets the keyboard can make that setup fail for good (measured:
    # keys every 20 ms from boot left translation off in 8 boots of 8). Tests that type
    # into the guest wait for this line in the domain's log before the first key.
    local cmdline_xml="  <qemu:commandline>
    <qemu:arg value='-trace'/>
    <qemu:arg value='ps2_keyboard_set_translation'/>$tls_args
  </qemu:commandline>"

    local xmlfile
    xmlfile=$(umask 077 && mktemp /tmp/vizor-domain.XXXXXX.xml)
    # shellcheck disable=SC2064
    trap "rm -f '$xmlfile'" EXIT
    cat >"$xmlfile" <<EOF
<domain type='$type' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>$name</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>$os_xml</os>
  <devices>
    <emulator>$EMULATOR</emulator>
$disk_xml
    <graphics type='vnc' $vnc_attrs/>
$spice_xml
    <video><model type='vga'/></video>
  </devices>
$cmdline_xml
</domain>
EOF
    say "defining domain $name (type $type$([ -n "$vnc_sock" ] && echo ", VNC socket $vnc_sock")$([ "$spice" = 1 ] || echo ", no SPICE")$([ -n "$vnc_tls" ] && echo ", VNC over VeNCrypt X.509"))"
    virsh_q define "$xmlfile" >&2 || die "virsh define $name failed"
    rm -f "$xmlfile"

    if [ "$shutoff" = 1 ]; then
        say "domain $name defined, left shut off"
        echo "vnc_port=-1"
        return 0
    fi
    say "starting domain $name"
    if ! virsh_q start "$name" >&2; then
        [ -s "$LOG_DIR/qemu/$name.log" ] && { echo "--- last 30 lines of $LOG_DIR/qemu/$name.log ---" >&2; tail -n 30 "$LOG_DIR/qemu/$name.log" >&2; }
        die "virsh start $name failed"
    fi

    local info port sock haspw
    info=$(vnc_info "$name") || exit 1
    read -r port sock haspw <<<"$info"
    say "domain $name running; VNC password $([ "$haspw" = 1 ] && echo set || echo not set)"
    if [ -n "$vnc_sock" ]; then
        local i
        for i in $(seq 50); do [ -S "$vnc_sock" ] && break; sleep 0.1; done
        [ -S "$vnc_sock" ] || die "VNC socket $vnc_sock did not appear"
        echo "vnc_socket=$vnc_sock"
    else
        [[ $port =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] || die "no live VNC port for $name (got '$port')"
        echo "vnc_port=$port"
    fi
}

cmd_vnc_port() {
    local name=${1:-}
    check_name "$name"
    require_libvirt
    local info port sock haspw
    info=$(vnc_info "$name") || exit 1
    read -r port sock haspw <<<"$info"
    [ "$port" != none ] || die "domain $name has no VNC graphics"
    [ "$sock" = - ] || die "domain $name serves VNC on the UNIX socket $sock, not a TCP port"
    [[ $port =~ ^[0-9]+$ ]] && [ "$port" -gt 0 ] \
        || die "domain $name has no live VNC port (state: $(domain_state "$name"))"
    echo "$port"
}

# ------------------------------------------------------------------------------------- stop
signal_daemon() { # name pidfile
    local name=$1 pidfile=$2 pid
    if pid_alive "$pidfile" "$name"; then
        pid=$(cat "$pidfile")
        say "stopping $name (pid $pid)"
        kill "$pid" 2>/dev/null || true
    elif pgrep -x "$name" >/dev/null; then
        say "stopping $name (no pid file: pkill -x $name)"
        pkill -x "$name" || true
    else
        say "$name not running"
    fi
}

wait_daemon_gone() { # name pidfile   (each daemon takes ~2 s to exit on SIGTERM)
    local name=$1 pidfile=$2 i
    for i in $(seq 150); do
        pgrep -x "$name" >/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    say "$name still running after 15 s; sending SIGKILL"
    pkill -KILL -x "$name" || true
    rm -f "$pidfile"
}

# libvirtd alone: running QEMU processes survive it and are taken up again on start.
cmd_restart_libvirtd() {
    need_root
    signal_daemon libvirtd "$LIBVIRTD_PID"
    wait_daemon_gone libvirtd "$LIBVIRTD_PID"
    cmd_start
}

# A stalled network without a second host: nftables drops the packets of one port on
# loopback both ways, so neither end hears the other and nothing is reset or refused.
NFT_TABLE="inet vizor_test"

cmd_stall_port() {
    need_root
    local port=${1:?stall-port needs a TCP port}
    [[ $port =~ ^[0-9]+$ ]] || die "stall-port: not a port: $port"
    command -v nft >/dev/null || die "nft is missing: run test-host.sh install"
    nft -f - <<NFT || die "nft refused the stall rules"
table $NFT_TABLE {
    chain output {
        type filter hook output priority 0; policy accept;
        tcp dport $port drop
        tcp sport $port drop
    }
}
NFT
    say "packets to and from TCP port $port are dropped"
}

cmd_unstall_port() {
    need_root
    if nft list table $NFT_TABLE >/dev/null 2>&1; then
        nft delete table $NFT_TABLE
    fi
    say "no packets are dropped"
}

cmd_stop() {
    need_root
    cmd_unstall_port
    if libvirt_up; then
        local d
        while read -r d; do
            case $d in vizor-test-*|vizor-demo*) remove_domain "$d" ;; esac
        done < <(virsh_q list --all --name)
    else
        say "libvirtd not answering: no domains to remove"
    fi
    # No domains of ours are left, so both daemons can be stopped together.
    signal_daemon libvirtd "$LIBVIRTD_PID"
    signal_daemon virtlogd "$VIRTLOGD_PID"
    wait_daemon_gone libvirtd "$LIBVIRTD_PID"
    wait_daemon_gone virtlogd "$VIRTLOGD_PID"
    say "libvirtd and virtlogd stopped"
}

# ----------------------------------------------------------------------------------- status
cmd_status() {
    if ! libvirt_up; then
        say "libvirtd is not answering on $URI"
        return 1
    fi
    virsh -c "$URI" version
    echo "KVM: $(kvm_usable && echo usable || echo 'not usable (domains use TCG)')"
    virsh -c "$URI" list --all
}

case ${1:-} in
    install)  shift; cmd_install "$@" ;;
    start)    shift; cmd_start "$@" ;;
    domain)   shift; cmd_domain "$@" ;;
    vnc-port) shift; cmd_vnc_port "$@" ;;
    stop)     shift; cmd_stop "$@" ;;
    restart-libvirtd) shift; cmd_restart_libvirtd "$@" ;;
    stall-port)   shift; cmd_stall_port "$@" ;;
    unstall-port) shift; cmd_unstall_port "$@" ;;
    status)   shift; cmd_status "$@" ;;
    -h|--help|help) usage ;;
    *) usage ;;
esac
