#!/usr/bin/env bash
# failover-overhead.sh: what supervision costs on the paths that matter for speed — creating
# small files, `ls -l` of a directory, and (with --write-mib) a sequential write — measured as
# a supervised mount (`--supervise`, the default as root: the session journal, part buffers in
# the supervisor's memory file) against an unsupervised one (`--no-supervise`: no journal,
# part buffers on the heap), alternating, on the same S3 server.
#
# Usage (as root; the S3 server of scripts/s3-server.sh in the environment):
#   bench/failover-overhead.sh [--files N] [--runs R] [--bin PATH] [--cache-root DIR]
#                              [--write-mib M]
# Defaults: 500 files of 4 KiB, 5 runs of each mode, cache directories under /tmp, no write.
# --write-mib M also writes an M MiB file sequentially (dd, 1 MiB blocks, closed) and reports
# MiB/s and the CPU seconds of the mount's processes per GiB written (utime + stime, read
# from /proc just before the unmount).
# --cache-root puts the cache directories elsewhere: the cost of staging files is mostly the
# cache filesystem's inode allocation, which depends on how full and how churned it is, so
# compare builds on the same (ideally a fresh) filesystem. Prints files/s for create (each file
# written and closed before the next) and entries/s for `ls -l` on a fresh mount (cold: one
# LIST and a HEAD per entry), per run and the median per mode, and the difference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

files=500 runs=5 bin="" cache_root="" write_mib=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --files) files=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --cache-root) cache_root=$2; shift 2 ;;
        --write-mib) write_mib=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ -z $bin ]]; then
    bin=target/release/s3vol
    [[ -x $bin ]] || bin=target/debug/s3vol
fi
: "${S3VOL_TEST_ENDPOINT:?start the S3 server first (scripts/s3-server.sh)}"

work=$(mktemp -d /tmp/s3vol-overhead-XXXXXX)
mnt=$work/mnt
mkdir -p "$mnt"
src=$work/src; head -c 4096 /dev/urandom >"$src"
mounted=""
caches=()
cleanup() {
    [[ -n $mounted ]] && { umount "$mnt" 2>/dev/null || umount -l "$mnt"; }
    rm -rf "$work" "${caches[@]}"
}
trap cleanup EXIT

mount_it() { # mode bucket
    local extra=(--no-supervise)
    [[ $1 == supervised ]] && extra=(--supervise)
    local cache
    cache=$(mktemp -d "${cache_root:-$work}/cache-XXXXXX"); chmod 700 "$cache"
    caches+=("$cache")
    "$bin" mount "$2" "$mnt" --endpoint-url "$S3VOL_TEST_ENDPOINT" --region us-east-1 \
        --force-path-style --cache-dir "$cache" "${extra[@]}"
    mounted=1
}
unmount_it() { umount "$mnt"; mounted=""; sleep 0.5; }

now() { date +%s.%N; }
# CPU seconds (utime + stime) of the processes serving the mount at $mnt.
mount_cpu() {
    local total=0 pid
    for pid in $(pgrep -f -- "mount .*$mnt" || true); do
        [[ -r /proc/$pid/stat ]] || continue
        total=$((total + $(awk '{ print $14 + $15 }' "/proc/$pid/stat")))
    done
    echo "$total / $(getconf CLK_TCK)" | bc -l
}
declare -A create ls write wcpu
for run in $(seq "$runs"); do
    for mode in supervised unsupervised; do
        bucket=overhead-$mode-$run-$(date +%s%N | tail -c 7)
        python3 -c "import os,boto3,sys; boto3.client('s3',endpoint_url=os.environ['S3VOL_TEST_ENDPOINT'],region_name='us-east-1').create_bucket(Bucket=sys.argv[1])" "$bucket"
        mount_it "$mode" "$bucket"
        mkdir "$mnt/d"
        t0=$(now)
        for i in $(seq "$files"); do cp "$src" "$mnt/d/f$i"; done
        t1=$(now)
        unmount_it
        mount_it "$mode" "$bucket"
        t2=$(now)
        n=$(ls -l "$mnt/d" | tail -n +2 | wc -l)
        t3=$(now)
        unmount_it
        [[ $n -eq $files ]] || { echo "ls -l saw $n entries, not $files" >&2; exit 1; }
        c=$(echo "$files / ($t1 - $t0)" | bc -l); l=$(echo "$files / ($t3 - $t2)" | bc -l)
        printf '%-12s run %d: create %7.1f files/s, ls -l %8.1f entries/s' "$mode" "$run" "$c" "$l"
        create[$mode]+="$c "; ls[$mode]+="$l "
        if [[ $write_mib -gt 0 ]]; then
            mount_it "$mode" "$bucket"
            c0=$(mount_cpu); t4=$(now)
            dd if=/dev/zero of="$mnt/big" bs=1M count="$write_mib" conv=fsync status=none
            t5=$(now); c1=$(mount_cpu)
            unmount_it
            w=$(echo "$write_mib / ($t5 - $t4)" | bc -l)
            p=$(echo "($c1 - $c0) * 1024 / $write_mib" | bc -l)
            printf ', write %6.1f MiB/s, %5.2f CPU-s/GiB' "$w" "$p"
            write[$mode]+="$w "; wcpu[$mode]+="$p "
        fi
        echo
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
whats=(create ls)
[[ $write_mib -gt 0 ]] && whats+=(write wcpu)
for what in "${whats[@]}"; do
    declare -n m=$what
    s=$(echo "${m[supervised]}" | median); u=$(echo "${m[unsupervised]}" | median)
    # create: files/s, ls: entries/s, write: MiB/s, wcpu: CPU seconds per GiB written.
    printf '%-6s median: supervised %.2f, unsupervised %.2f, supervised/unsupervised %.3f\n' \
        "$what" "$s" "$u" "$(echo "$s / $u" | bc -l)"
done
