#!/usr/bin/env bash
# soak-csi-failover.sh: every failover event of a CSI volume, N times in a row, under load.
#
# Runs the failover tests of the CSI driver (crates/s3vol/tests/support/csi_failover.rs) and of
# a supervised `s3vol mount` with S3VOL_FAILOVER_ROUNDS=N: a volume staged and published by
# `s3vol csi` + `s3vol mounter`, with a create / rename / unlink / mkdir / ls -l loop, a file
# kept open and appended to, a reader of an existing file, and fio jobs that write files
# sequentially and at random and verify every block, all running while
#   - the serving process is killed with SIGKILL, N times;
#   - the mounter's container (mounter and serving process) is killed, the mounter alone is
#     killed, the mounter is upgraded (SIGTERM, then a different binary), and the node plugin
#     is killed and restarted, N rounds of the four;
#   - the kernel's OOM killer ends the serving process in a 1 MiB cgroup-v1 memory cage, N
#     times (skipped where no cgroup v1 memory controller can be written);
# and a supervised `s3vol mount`'s serving process is killed 20 times.
# Each test fails on any application error, a call that stalls 5 s, an object in the bucket
# that differs from what the applications wrote (fio's blocks are checked by fio), or any
# process or session directory left behind; the script prints each test's latencies and
# takeover times and ends non-zero if one failed.
#
# Usage (as root with /dev/fuse; fio installed; builds the tests first):
#   lines=$(bash scripts/s3-server.sh start) && eval "$lines"
#   bench/soak-csi-failover.sh [--rounds N] [--release] [--out DIR]
# Defaults: 20 rounds, debug build, output in a new /tmp/s3vol-csi-soak-* directory.
# Bounded: every test stops its load after 300 s and fails a call that does not return.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rounds=20 profile=() out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) rounds=$2; shift 2 ;;
        --release) profile=(--cargo-profile release); shift ;;
        --out) out=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "--rounds wants a positive number" >&2; exit 2; }
: "${S3VOL_TEST_ENDPOINT:?start the S3 server first: lines=\$(bash scripts/s3-server.sh start) && eval \"\$lines\"}"
command -v fio >/dev/null || { echo "fio is needed (apt-get install fio)" >&2; exit 2; }
command -v cargo-nextest >/dev/null || { echo "cargo-nextest is needed (cargo install cargo-nextest --locked)" >&2; exit 2; }
export AWS_EC2_METADATA_DISABLED=true
out=${out:-$(mktemp -d /tmp/s3vol-csi-soak-XXXXXX)}
mkdir -p "$out"

tests='(binary(csi) & test(/failover::csi_volume_survives/)) | (binary(mount_failover) & test(/twenty_kills/))'
echo "building the tests (${profile[*]:-debug})" >&2
cargo nextest run "${profile[@]}" --workspace --locked --no-run -E "$tests" >&2

echo "running with S3VOL_FAILOVER_ROUNDS=$rounds; full output in $out/run.log" >&2
start=$(date +%s)
set +e
S3VOL_FAILOVER_ROUNDS=$rounds cargo nextest run "${profile[@]}" --workspace --locked \
    --no-fail-fast --test-threads 1 --no-capture -E "$tests" >"$out/run.log" 2>&1
rc=$?
set -e

{
    echo "# s3vol CSI failover soak: $rounds rounds per event, $(date -u +%FT%TZ), $(git rev-parse --short HEAD), ${profile[*]:-debug} build, $(($(date +%s) - start)) s"
    echo
    grep -E '^(through|[0-9]+ application calls|successor serving|mounter end to|kill to successor|latency| +(PASS|FAIL|SKIP) )|skipped:|panicked' "$out/run.log" || true
} | tee "$out/summary.txt"
if [[ $rc -ne 0 ]]; then
    echo "FAILED (exit $rc): see $out/run.log" >&2
fi
exit $rc
