#!/usr/bin/env bash
# soak-write.sh: write a big file (default 1 GiB) sequentially through `s3vol mount`, then
# check that the object in S3 is intact and that the mount's resident memory grew by less than
# --memory-limit plus an allowance. Not run in CI: the moto test server is slow with objects
# this size, so CI runs the 100 MiB variant of the same check
# (mount_write_faults::sequential_write_streams_parts_with_bounded_memory).
#
# Usage:
#   eval "$(scripts/s3-server.sh start)"     # or point S3VOL_TEST_* at MinIO, Garage, …
#   bench/soak-write.sh [SIZE_MIB]           # as root (or with fusermount3 available)
#
# Environment:
#   S3VOL_TEST_ENDPOINT, S3VOL_TEST_REGION, S3VOL_TEST_ACCESS_KEY_ID,
#   S3VOL_TEST_SECRET_ACCESS_KEY   the server (what scripts/s3-server.sh prints)
#   MEMORY_LIMIT    --memory-limit of the mount (default 64M)
#   ALLOWANCE_MIB   growth allowed above the limit for buffers outside the budget: FUSE
#                   request buffers, the write payload in flight, allocator slack (default 16)
#   S3VOL           the binary (default target/release/s3vol, built when missing)
# Needs: the aws CLI (to make and remove the bucket and read the object back), openssl (a
# deterministic data stream, so nothing big is kept on local disk but the staging file).
# Exit status: 0 when the object matches and memory stayed bounded, 1 otherwise.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

size_mib=${1:-1024}
memory=${MEMORY_LIMIT:-64M}
allowance_mib=${ALLOWANCE_MIB:-16}
bin=${S3VOL:-target/release/s3vol}
: "${S3VOL_TEST_ENDPOINT:?start a server: eval \"\$(scripts/s3-server.sh start)\"}"
region=${S3VOL_TEST_REGION:-us-east-1}

case $memory in
    *G) memory_mib=$(( ${memory%G} * 1024 )) ;;
    *M) memory_mib=${memory%M} ;;
    *) echo "MEMORY_LIMIT must look like 64M or 1G" >&2; exit 2 ;;
esac

if [[ ! -x $bin ]]; then
    echo "building $bin" >&2
    cargo build --release --locked -p s3vol >&2
fi

export AWS_ACCESS_KEY_ID=$S3VOL_TEST_ACCESS_KEY_ID
export AWS_SECRET_ACCESS_KEY=$S3VOL_TEST_SECRET_ACCESS_KEY
export AWS_REGION=$region AWS_EC2_METADATA_DISABLED=true
unset AWS_PROFILE AWS_ENDPOINT_URL
s3() { aws --endpoint-url "$S3VOL_TEST_ENDPOINT" "$@"; }

# The same bytes every run, generated on the fly (AES-CTR keystream).
# (openssl dies of SIGPIPE when head has enough: not an error.)
data() {
    { openssl enc -aes-128-ctr -pass pass:s3vol-soak -nosalt -pbkdf2 </dev/zero 2>/dev/null || true; } |
        head -c "${size_mib}M"
}

bucket=soak-write-$(date +%s)-$$
work=$(mktemp -d)
mkdir "$work/mnt" "$work/cache"
pid=
cleanup() {
    umount -l "$work/mnt" 2>/dev/null || true
    if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    s3 s3 rb "s3://$bucket" --force >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

s3 s3api create-bucket --bucket "$bucket" >/dev/null
"$bin" mount "$bucket" "$work/mnt" -f \
    --endpoint-url "$S3VOL_TEST_ENDPOINT" --region "$region" --force-path-style \
    --cache-dir "$work/cache" --memory-limit "$memory" 2>"$work/mount.log" &
pid=$!
for _ in $(seq 300); do mountpoint -q "$work/mnt" && break; sleep 0.1; done
mountpoint -q "$work/mnt" || { echo "mount failed:" >&2; cat "$work/mount.log" >&2; exit 1; }

# The baseline: the idle mount after one small write (HTTP client, signing, staging warmed up).
head -c 1M /dev/urandom >"$work/mnt/warmup"
sleep 1
baseline_kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")

echo "writing $size_mib MiB with --memory-limit $memory" >&2
start=$(date +%s.%N)
data | dd of="$work/mnt/big" bs=1M iflag=fullblock status=none
end=$(date +%s.%N)
peak_kib=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")

umount "$work/mnt"
wait "$pid" && mount_status=0 || mount_status=$?
pid=

want=$(data | sha256sum | cut -d' ' -f1)
got=$(s3 s3 cp "s3://$bucket/big" - | sha256sum | cut -d' ' -f1)

growth_mib=$(( (peak_kib - baseline_kib) / 1024 ))
seconds=$(echo "$end - $start" | bc -l)
printf 'size %d MiB in %.1f s (%.1f MiB/s, including close)\n' "$size_mib" "$seconds" \
    "$(echo "$size_mib / $seconds" | bc -l)"
printf 'RSS idle %d MiB, peak %d MiB, growth %d MiB (limit %d MiB + allowance %d MiB)\n' \
    $(( baseline_kib / 1024 )) $(( peak_kib / 1024 )) "$growth_mib" "$memory_mib" "$allowance_mib"

ok=1
if [[ $want != "$got" ]]; then echo "FAIL: the object differs from what was written" >&2; ok=0; fi
if (( growth_mib >= memory_mib + allowance_mib )); then echo "FAIL: memory grew past the limit" >&2; ok=0; fi
if (( mount_status != 0 )); then echo "FAIL: the mount exited $mount_status" >&2; cat "$work/mount.log" >&2; ok=0; fi
(( ok )) && echo PASS || exit 1
