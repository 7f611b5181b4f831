#!/usr/bin/env bash
# serial-guest.sh — a tiny Linux guest whose shell answers on its serial port, for the
# serial console's tests (issue 22; docs/serial-design.md §5).
#
# Debian's kernel and an initramfs of busybox-static whose /init runs a login shell on
# ttyS0 with job control (setsid cttyhack), so Ctrl+C interrupts a command. No disk, no
# modules, 128 MiB. TCG, not KVM: Debian's kernel hung under KVM on these machines.
#
# Usage:
#   serial-guest.sh build          download the kernel and busybox-static (apt-get
#                                  download: no kernel postinst), build the initramfs;
#                                  idempotent. Files in /var/lib/libvirt/boot/.
#   serial-guest.sh domain NAME    build if needed, then (re)define and start NAME on
#                                  qemu:///system with a pty serial port and console;
#                                  last stdout line: serial=NAME
#   serial-guest.sh check NAME     wait for the guest's prompt on its console (virsh
#                                  console), type `echo vizor-$((6*7))`, expect vizor-42
#
# Needs scripts/test-host.sh start first (libvirtd). Progress goes to stderr.
set -euo pipefail

URI="qemu:///system"
BOOT=/var/lib/libvirt/boot
KERNEL=$BOOT/vizor-serial-vmlinuz
INITRD=$BOOT/vizor-serial-initrd.gz
WORK=/var/lib/vizor-test/serial-guest

say() { echo "serial-guest: $*" >&2; }
die() { say "$*"; exit 1; }

build() {
    if [[ -s $KERNEL && -s $INITRD ]]; then
        say "kernel and initramfs present ($BOOT)"
        return
    fi
    mkdir -p "$WORK" "$BOOT"
    cd "$WORK"
    rm -rf debs root extract
    mkdir -p debs root extract
    # apt-get download drops privileges to _apt where it can.
    chown _apt debs 2>/dev/null || true
    # The kernel package linux-image-amd64 depends on, without installing it.
    local kpkg
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    [[ -n $kpkg ]] || { apt-get update -q >&2; kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
    [[ -n $kpkg ]] || die "no kernel package behind linux-image-amd64"
    say "downloading $kpkg and busybox-static"
    (cd debs && apt-get download -q "$kpkg" busybox-static >&2)
    for deb in debs/*.deb; do dpkg-deb -x "$deb" extract; done
    local vmlinuz
    vmlinuz=$(ls extract/boot/vmlinuz-* | head -n 1)
    [[ -s $vmlinuz ]] || die "no vmlinuz in $kpkg"
    install -m 0644 "$vmlinuz" "$KERNEL"

    mkdir -p root/bin root/proc root/sys root/dev root/tmp root/etc
    install -m 0755 extract/bin/busybox root/bin/busybox
    cat > root/init <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "guest ready: $(cat /sys/class/tty/console/active)"
while true; do
  setsid cttyhack sh -l
done
EOF
    chmod 0755 root/init
    echo 'export PS1="guest# " TERM=${TERM:-linux}' > root/etc/profile
    (cd root && find . | ../extract/bin/busybox cpio -o -H newc 2>/dev/null | gzip -9) > "$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    chmod 0644 "$INITRD"
    rm -rf debs extract
    say "built $KERNEL and $INITRD"
}

domain() {
    local name=$1
    build
    if virsh -c "$URI" dominfo "$name" >/dev/null 2>&1; then
        virsh -c "$URI" destroy "$name" >/dev/null 2>&1 || true
        virsh -c "$URI" undefine "$name" >/dev/null
    fi
    local xml
    xml=$(mktemp)
    cat > "$xml" <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>$KERNEL</kernel>
    <initrd>$INITRD</initrd>
    <cmdline>console=ttyS0 panic=-1</cmdline>
  </os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
  </devices>
</domain>
EOF
    virsh -c "$URI" define "$xml" >/dev/null
    rm -f "$xml"
    virsh -c "$URI" start "$name" >/dev/null
    say "domain $name started"
    echo "serial=$name"
}

check() {
    local name=$1
    python3 - "$URI" "$name" <<'EOF'
import os, pty, select, sys, time
uri, name = sys.argv[1], sys.argv[2]
pid, fd = pty.fork()
if pid == 0:
    os.execvp("virsh", ["virsh", "-c", uri, "console", name, "--force"])
out = b""
def until(token, seconds):
    global out
    end = time.time() + seconds
    while time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                return False
            out += data
            if token in out:
                return True
    return False
# QEMU drops output while no one holds the console: press Enter until a prompt shows.
ok = False
for _ in range(60):
    os.write(fd, b"\r")
    if until(b"guest# ", 1):
        ok = True
        break
if not ok:
    sys.exit("serial-guest: no prompt on %s's console; it printed: %r" % (name, out[-300:]))
os.write(fd, b"echo vizor-$((6*7))\r")
if not until(b"vizor-42", 10):
    sys.exit("serial-guest: no answer from %s's shell: %r" % (name, out[-300:]))
os.write(fd, b"\x1d")  # Ctrl+] leaves virsh console
print("serial-guest: %s's shell answers on its serial console" % name, file=sys.stderr)
EOF
}

case "${1:-}" in
    build) build ;;
    domain) [[ $# -eq 2 ]] || die "usage: $0 domain NAME"; domain "$2" ;;
    check) [[ $# -eq 2 ]] || die "usage: $0 check NAME"; check "$2" ;;
    *) die "usage: $0 build | domain NAME | check NAME" ;;
esac
