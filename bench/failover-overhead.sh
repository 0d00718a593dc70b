#!/usr/bin/env bash
# failover-overhead.sh: what supervision costs on the paths that matter for speed — creating
# small files and `ls -l` of a directory — measured as a supervised mount (`--supervise`: the
# session journal, writes through staging files) against the default unsupervised mount (no
# journal, new files streamed from memory), alternating, on the same S3 server.
#
# Usage (as root; the S3 server of scripts/s3-server.sh in the environment):
#   bench/failover-overhead.sh [--files N] [--runs R] [--bin PATH] [--cache-root DIR]
# Defaults: 500 files of 4 KiB, 5 runs of each mode, cache directories under /tmp.
# --cache-root puts the cache directories elsewhere: the cost of staging files is mostly the
# cache filesystem's inode allocation, which depends on how full and how churned it is, so
# compare builds on the same (ideally a fresh) filesystem. Prints files/s for create (each file
# written and closed before the next) and entries/s for `ls -l` on a fresh mount (cold: one
# LIST and a HEAD per entry), per run and the median per mode, and the difference.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

files=500 runs=5 bin="" cache_root=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --files) files=$2; shift 2 ;;
        --runs) runs=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --cache-root) cache_root=$2; shift 2 ;;
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
    local extra=()
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
declare -A create ls
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
        printf '%-12s run %d: create %7.1f files/s, ls -l %8.1f entries/s\n' "$mode" "$run" "$c" "$l"
        create[$mode]+="$c "; ls[$mode]+="$l "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
for what in create ls; do
    declare -n m=$what
    s=$(echo "${m[supervised]}" | median); u=$(echo "${m[unsupervised]}" | median)
    printf '%-6s median: supervised %.1f/s, unsupervised %.1f/s, supervised/unsupervised %.3f\n' \
        "$what" "$s" "$u" "$(echo "$s / $u" | bc -l)"
done
