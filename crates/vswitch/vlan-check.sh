#!/usr/bin/env bash
# Runs crates/vswitch's kernel tests, the VLAN ones included, under Debian's cloud kernel
# (bridge VLAN filtering built in) in QEMU, for hosts whose own kernel lacks
# CONFIG_BRIDGE_VLAN_FILTERING (the VLAN tests are ignored there). It uses what the lab
# already keeps in its cache (the kernel, busybox, QEMU): run the lab once first
# (`cargo test --release -p cli --test lab`) if the cache is empty. It takes the lab's lock, so
# it waits for a lab run in progress. The Default Switch test is left out (no nft or dnsmasq
# in the VM). Usage: crates/vswitch/vlan-check.sh [TEST-FILTER...]
set -euo pipefail
cd "$(dirname "$0")/../.."
cache=${VIRIDIAN_CACHE:-/var/cache/viridian}
pkgs=$cache/packages
kdir=$(ls -d "$pkgs"/linux-image-*-cloud-amd64 2>/dev/null | sort -V | tail -1)
qemu=$pkgs/qemu-system-x86/usr/bin/qemu-system-x86_64
busybox=$pkgs/busybox-static/bin/busybox
for f in "$kdir" "$qemu" "$busybox" "$cache/qemu-firmware"; do
  [ -e "$f" ] || { echo "vlan-check: $f is missing; run the lab once to fill $cache" >&2; exit 1; }
done
kver=${kdir##*/linux-image-}
mods=$kdir/lib/modules/$kver/kernel

test_bin=$(nice -n 10 cargo test -p vswitch --test kernel --no-run --message-format=json 2>/dev/null | python3 -c '
import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kernel":
        print(m["executable"])')

root=$(mktemp -d)
image=$(mktemp)
trap 'rm -rf "$root" "$image"' EXIT
mkdir -p "$root"/{bin,modules,lib64,tmp,proc,sys,dev}
cp "$busybox" "$root/bin/"
cp "$test_bin" "$root/kernel-test"
for m in net/llc/llc.ko net/802/stp.ko net/bridge/bridge.ko drivers/net/veth.ko; do
  cp "$mods/$m" "$root/modules/"
done
# The test binary's shared libraries, at the paths ldd names.
ldd "$test_bin" | grep -o '/[^ ]*' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
filters="$*"
cat > "$root/init" <<EOF
#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in llc stp bridge veth; do insmod /modules/\$m.ko || echo "VLAN-CHECK insmod \$m failed"; done
cd /tmp
/kernel-test --include-ignored --skip without_vlan_filtering --skip default_switch --test-threads=1 $filters 2>&1
echo "VLAN-CHECK rc=\$?"
poweroff -f
EOF
chmod +x "$root/init"
# A newc cpio archive of the tree (the format the kernel unpacks as its initramfs).
python3 - "$root" "$image" <<'EOF'
import os, stat, sys
root, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as f:
    ino = 1
    def entry(name, mode, data=b""):
        global ino
        nb = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0]
        f.write(("070701" + "".join("%08x" % v for v in fields)).encode() + nb)
        f.write(b"\0" * (-(110 + len(nb)) % 4) + data + b"\0" * (-len(data) % 4))
        ino += 1
    for d, _, files in os.walk(root):
        rel = os.path.relpath(d, root)
        if rel != ".":
            entry(rel, 0o040755)
        for name in files:
            p = os.path.join(d, name)
            mode = stat.S_IFREG | (os.stat(p).st_mode & 0o777)
            entry(os.path.normpath(os.path.join(rel, name)), mode, open(p, "rb").read())
    entry("TRAILER!!!", 0)
EOF
log=$(mktemp)
flock "$cache/lab.lock" timeout 600 nice -n 10 \
  env QEMU_MODULE_DIR="$pkgs/qemu-system-common/usr/lib/x86_64-linux-gnu/qemu" "$qemu" \
  -accel tcg,thread=multi -cpu max -m 1536 -smp 2 -nographic -vga none -no-reboot -nic none \
  -L "$cache/qemu-firmware" -kernel "$kdir/boot/vmlinuz-$kver" -initrd "$image" \
  -append "console=ttyS0 panic=-1 quiet" </dev/null >"$log" 2>&1 || true
grep -aE '^(test |test result|thread |VLAN-CHECK)' "$log" | cut -c1-400
grep -aq 'VLAN-CHECK rc=0' "$log"
