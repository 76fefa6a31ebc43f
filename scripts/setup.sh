#!/usr/bin/env bash
# Installs what Viridian's build, tests and lab need on a Debian 12 machine (run as root).
# The lab's own ingredients (kernels, busybox, QEMU for the lab VM) are Debian packages that the
# lab downloads and unpacks into its cache (/var/cache/viridian) without installing them; only
# the shared libraries QEMU links against are installed here, and the tools that build the lab's
# Debian system disk (mmdebstrap, and mke2fs from e2fsprogs).
set -euo pipefail

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install Rust 1.85 or newer (rustup.rs), then run this again" >&2
  exit 1
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup: run as root (it uses apt-get)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "setup: refreshing the package lists"
apt-get update -q >/dev/null

# Libraries of qemu-system-x86 and qemu-system-common, without installing QEMU itself (that would
# replace the newer qemu-utils that the disk-image tests compare against), and of fio, which the
# lab's disk benchmark carries into its guest (crates/lab/src/disk_bench.rs).
libs=$(apt-cache depends --no-recommends --no-suggests --no-enhances qemu-system-x86 qemu-system-common fio \
  | awk '/Depends: lib/ {print $2}' | grep -v '^<' | sort -u)
# nftables and dnsmasq-base (the binary, without Debian's system-wide dnsmasq service): the
# Default Switch's NAT and its guests' DHCP and DNS (crates/vswitch and its tests).
# genisoimage: the ISO images of the lab's DVD checks (crates/lab).
# linux-perf: profiles of the lab VM during its benchmarks (VIRIDIAN_LAB_PERF, crates/lab).
need=(qemu-utils dpkg apt coreutils nftables dnsmasq-base genisoimage mmdebstrap e2fsprogs linux-perf $libs)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# schemathesis, pinned, for the API test in crates/cli/tests/service_api.rs (it skips, saying
# so, without it).
st_version=4.32.5
if ! python3 -m pip show schemathesis 2>/dev/null | grep -qx "Version: $st_version"; then
  if ! python3 -m pip --version >/dev/null 2>&1; then
    echo "setup: installing python3-pip"
    apt-get install -y -q --no-install-recommends python3-pip >/dev/null
  fi
  echo "setup: installing schemathesis $st_version (pip)"
  python3 -m pip install -q "schemathesis==$st_version" 2>/dev/null \
    || python3 -m pip install -q --break-system-packages "schemathesis==$st_version"
fi
echo "setup: done"
