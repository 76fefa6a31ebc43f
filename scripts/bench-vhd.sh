#!/usr/bin/env bash
# Side-by-side conversion benchmark: `viridian vhd convert` vs `qemu-img convert`.
#   raw -> dynamic VHDX and VHDX -> raw, on 1 GiB of random data and a 1 GiB sparse file
#   (8 MiB of random data in 8 places). Same files, same block size (32 MiB), page cache warm.
#   qemu-img convert runs twice: with its default cache mode for convert ("unsafe": it never
#   flushes, the data may still be only in the page cache when it exits) and with -t writeback
#   (flushes on close, like viridian, which always fsyncs the result before exiting).
#   Reports the median of RUNS runs and throughput ratios viridian/qemu-img (>1 = faster).
# Usage: scripts/bench-vhd.sh [workdir]   (env: RUNS=3, SIZE_MIB=1024, VIRIDIAN=path)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/bench-vhd}
runs=${RUNS:-3}
size_mib=${SIZE_MIB:-1024}
mkdir -p "$work"
if [[ -z "${VIRIDIAN:-}" ]]; then
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
    cargo build --release -q -p cli
    VIRIDIAN=$CARGO_TARGET_DIR/release/viridian
fi
command -v qemu-img >/dev/null || { echo "qemu-img missing (apt-get install qemu-utils)"; exit 1; }

random=$work/random.raw
sparse=$work/sparse.raw
if [[ ! -f $random || $(stat -c %s "$random") != $((size_mib << 20)) ]]; then
    head -c $((size_mib << 20)) /dev/urandom > "$random"
fi
if [[ ! -f $sparse || $(stat -c %s "$sparse") != $((size_mib << 20)) ]]; then
    rm -f "$sparse"; truncate -s $((size_mib << 20)) "$sparse"
    for i in 0 1 2 3 4 5 6 7; do
        head -c $((1 << 20)) /dev/urandom |
            dd of="$sparse" bs=1M seek=$((i * size_mib / 8 + 3)) conv=notrunc status=none
    done
fi

# median of the times of `runs` executions of "$@" (output file removed before each run)
time_median() {
    local out=$1; shift
    local ts=()
    for _ in $(seq "$runs"); do
        rm -f "$out"
        local t0 t1
        t0=$(date +%s.%N)
        "$@" >/dev/null
        t1=$(date +%s.%N)
        ts+=("$(echo "$t1 - $t0" | bc -l)")
    done
    printf '%s\n' "${ts[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}

printf '%-26s %9s %9s %9s %10s %10s %10s\n' case "qemu s" "qemu-wb s" "ours s" "ours MiB/s" "vs qemu" "vs qemu-wb"
row() {
    local name=$1 tq=$2 tw=$3 tv=$4
    printf '%-26s %9.3f %9.3f %9.3f %10.0f %10.2f %10.2f\n' "$name" "$tq" "$tw" "$tv" \
        "$(echo "$size_mib / $tv" | bc -l)" "$(echo "$tq / $tv" | bc -l)" "$(echo "$tw / $tv" | bc -l)"
}

for src in random sparse; do
    in=$work/$src.raw
    # raw -> dynamic VHDX
    tw=$(time_median "$work/q.vhdx" qemu-img convert -t writeback -f raw -O vhdx -o subformat=dynamic,block_size=32M "$in" "$work/q.vhdx")
    tq=$(time_median "$work/q.vhdx" qemu-img convert -f raw -O vhdx -o subformat=dynamic,block_size=32M "$in" "$work/q.vhdx")
    tv=$(time_median "$work/v.vhdx" "$VIRIDIAN" vhd convert "$in" "$work/v.vhdx" --dynamic --block-size 32M)
    qemu-img compare -q -f vhdx -F raw "$work/v.vhdx" "$in"
    qemu-img check -q -f vhdx "$work/v.vhdx"
    row "$src raw->VHDX dynamic" "$tq" "$tw" "$tv"
    # VHDX -> raw (both read the VHDX that qemu-img made)
    tw=$(time_median "$work/q.raw" qemu-img convert -t writeback -f vhdx -O raw "$work/q.vhdx" "$work/q.raw")
    tq=$(time_median "$work/q.raw" qemu-img convert -f vhdx -O raw "$work/q.vhdx" "$work/q.raw")
    tv=$(time_median "$work/v.img" "$VIRIDIAN" vhd convert "$work/q.vhdx" "$work/v.img")
    cmp "$work/v.img" "$in"
    row "$src VHDX->raw" "$tq" "$tw" "$tv"
    rm -f "$work/q.vhdx" "$work/v.vhdx" "$work/q.raw" "$work/v.img"
done
