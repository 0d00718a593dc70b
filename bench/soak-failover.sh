#!/usr/bin/env bash
# soak-failover.sh: a supervised `s3vol mount` under load, its serving process killed with
# SIGKILL once a minute; reports application errors (must be 0) and the stall each kill cost.
#
# Usage (as root; the S3 server of scripts/s3-server.sh, or any, in the environment):
#   export AWS_EC2_METADATA_DISABLED=true; lines=$(bash scripts/s3-server.sh start) && eval "$lines"
#   bench/soak-failover.sh [--minutes N] [--interval SECONDS] [--bin PATH] [--bucket B] [--region R]
# Defaults: 30 minutes, a kill every 60 s, target/release/s3vol (else target/debug/s3vol), a new
# bucket in us-east-1. Against Garage (bench/garage.sh, which makes the buckets):
#   eval "$(bench/garage.sh start soak)"; S3VOL_TEST_ENDPOINT=$BENCH_ENDPOINT \
#   bench/soak-failover.sh --bucket soak --region garage
# Environment: S3VOL_TEST_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (as the test
# server prints them). Bounded: it stops after --minutes whatever happens, unmounts, and
# deletes its bucket's mount point; the bucket is left for inspection.
#
# The load: a loop of mkdir / create+write+close / rename / unlink / ls -l with each file read
# back and compared, and one file kept open and appended to (and read back) for the whole run.
# Each call's duration is timed; the stall of a kill is the longest call that overlapped it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

minutes=30 interval=60 bin="" bucket="" region=us-east-1
while [[ $# -gt 0 ]]; do
    case $1 in
        --minutes) minutes=$2; shift 2 ;;
        --interval) interval=$2; shift 2 ;;
        --bin) bin=$2; shift 2 ;;
        --bucket) bucket=$2; shift 2 ;;
        --region) region=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
if [[ -z $bin ]]; then
    bin=target/release/s3vol
    [[ -x $bin ]] || bin=target/debug/s3vol
fi
[[ -x $bin ]] || { echo "no s3vol binary; cargo build --release first" >&2; exit 2; }
: "${S3VOL_TEST_ENDPOINT:?start the S3 server first (scripts/s3-server.sh)}"

work=$(mktemp -d /tmp/s3vol-soak-XXXXXX)
mnt=$work/mnt cache=$work/cache log=$work/mount.log
mkdir -p "$mnt" "$cache"; chmod 700 "$cache"
if [[ -z $bucket ]]; then
    bucket=soak-failover-$(date +%s)
    python3 - "$bucket" <<'EOF'
import os, sys, boto3
boto3.client("s3", endpoint_url=os.environ["S3VOL_TEST_ENDPOINT"], region_name="us-east-1").create_bucket(Bucket=sys.argv[1])
EOF
fi

"$bin" mount "$bucket" "$mnt" --supervise --endpoint-url "$S3VOL_TEST_ENDPOINT" --region "$region" \
    --force-path-style --cache-dir "$cache" -f 2>"$log" &
sup=$!
cleanup() {
    umount -l "$mnt" 2>/dev/null || true
    sleep 1
    kill "$sup" 2>/dev/null || true
    wait "$sup" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 100); do mountpoint -q "$mnt" && break; sleep 0.1; done
mountpoint -q "$mnt" || { echo "mount failed:"; cat "$log"; exit 1; }

serving() { cut -d' ' -f1 "/proc/$sup/task/$sup/children" 2>/dev/null; }

errors=$work/errors times=$work/times
: >"$errors"; : >"$times"
end=$(( $(date +%s) + minutes * 60 ))

# The load: each call timed (start and duration in ms) into $times, errors into $errors.
load() {
    local i=0
    exec 9>>"$mnt/open-file"
    while (( $(date +%s) < end )); do
        local t0 t1 body
        t0=$(date +%s%3N)
        body="round $i $(head -c 2000 /dev/urandom | base64 -w0)"
        { mkdir "$mnt/d$i" && printf '%s' "$body" >"$mnt/d$i/f" && mv "$mnt/d$i/f" "$mnt/d$i/g" \
            && echo x >"$mnt/s$i" && rm "$mnt/s$i" && ls -l "$mnt" >/dev/null \
            && [[ $(cat "$mnt/d$i/g") == "$body" ]] && printf 'line %s\n' "$i" >&9; } \
            2>>"$errors" || echo "round $i failed" >>"$errors"
        t1=$(date +%s%3N)
        echo "$t0 $((t1 - t0))" >>"$times"
        i=$((i + 1))
    done
    exec 9>&-
    [[ $(wc -l <"$mnt/open-file") -eq $i ]] || echo "open file has $(wc -l <"$mnt/open-file") lines, not $i" >>"$errors"
    echo "$i" >"$work/rounds"
}
load &
loader=$!

kills=()
while (( $(date +%s) + interval < end )); do
    sleep "$interval"
    pid=$(serving)
    [[ -n $pid ]] || { echo "no serving process" >>"$errors"; continue; }
    kills+=("$(date +%s%3N)")
    kill -9 "$pid"
done
wait "$loader"

echo "rounds: $(cat "$work/rounds"), kills: ${#kills[@]}, errors: $(wc -l <"$errors")"
# Stall of each kill: the longest round that overlapped it (a round is ~7 calls).
for k in "${kills[@]}"; do
    awk -v k="$k" '$1 <= k && $1 + $2 >= k { if ($2 > m) m = $2 } END { printf "kill at %s: stall %d ms\n", k, m }' "$times"
done
awk '{ print $2 }' "$times" | sort -n | awk '{ a[NR] = $1 } END { printf "round ms: p50 %d, p99 %d, max %d\n", a[int(NR*0.5)+1], a[int(NR*0.99)+1], a[NR] }'
grep -c 'died without being asked' "$log" | sed 's/^/restarts logged: /'
if [[ -s $errors ]]; then echo "ERRORS:"; head -20 "$errors"; exit 1; fi
