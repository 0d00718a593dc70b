#!/usr/bin/env bash
# attr-cache.sh: metadata speed with default options, against a fresh Garage.
#
#   ls -l of a directory of N files (s3fs metadata on each), cold (a fresh mount):
#     - on a node that never listed it (empty attribute cache),
#     - on a node that listed it before (the attribute cache an earlier mount left),
#   stat(2) of the N files by name on a fresh mount (bench.py stat), both ways;
#   the same with S3VOL_BASE (default: /opt/s3vol-bench/bin/s3vol-main) and s3fs.
#
# Usage (root): bench/attr-cache.sh [N]   (default 10000)
# S3VOL_BIN: the s3vol to measure (default target/release/s3vol). Runs its own Garage on
# ports 3910-3913 under a private BENCH_HOME, so it disturbs no other benchmark.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
N=${1:-10000}
S3VOL=${S3VOL_BIN:-$REPO/target/release/s3vol}
BASE=${S3VOL_BASE:-/opt/s3vol-bench/bin/s3vol-main}
HOME_DIR=$(mktemp -d /tmp/attr-bench-XXXX)
mkdir -p "$HOME_DIR/garage"
ln -s /opt/s3vol-bench/garage/bin "$HOME_DIR/garage/bin"
export BENCH_HOME=$HOME_DIR GARAGE_S3_PORT=3910 GARAGE_RPC_PORT=3911 GARAGE_ADMIN_PORT=3913
export AWS_EC2_METADATA_DISABLED=true
MNT=$HOME_DIR/mnt
mkdir -p "$MNT"
pid=
cleanup() {
	umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
	[[ -n $pid ]] && kill "$pid" 2>/dev/null
	# garage.sh stop knows its server by the binary's path, which the link hides.
	[[ -f $HOME_DIR/garage-run/pid ]] && kill "$(<"$HOME_DIR/garage-run/pid")" 2>/dev/null
	sleep 1
	rm -rf "$HOME_DIR"
}
trap cleanup EXIT
env_lines=$(bash "$BENCH/garage.sh" start attrb) || exit 1
eval "$env_lines"
export BENCH_BUCKET=attrb
py() { python3 "$BENCH/bench.py" "$@"; }
py populate ls/ "$N" 4096 --dir-marker
# Objects written seconds ago, as a directory someone listed "before" would be.
sleep 4

wait_mounted() {
	for ((i = 0; i < 300; i++)); do
		mountpoint -q "$MNT" && return
		sleep 0.1
	done
	echo "mount did not appear" >&2
	exit 1
}
s3vol_mount() { # binary cache-dir [options…]
	local bin=$1 cache=$2
	shift 2
	setsid "$bin" mount attrb "$MNT" --endpoint-url "$BENCH_ENDPOINT" --force-path-style \
		--region "$BENCH_REGION" -f --cache-dir "$cache" --log-level warn "$@" \
		</dev/null >"$HOME_DIR/s3vol.log" 2>&1 &
	pid=$!
	wait_mounted
}
s3fs_mount() {
	printf '%s:%s\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$HOME_DIR/passwd"
	chmod 600 "$HOME_DIR/passwd"
	s3fs attrb "$MNT" -f -o "passwd_file=$HOME_DIR/passwd,url=$BENCH_ENDPOINT,use_path_request_style,endpoint=$BENCH_REGION" \
		-o parallel_count=16,multipart_size=8,max_stat_cache_size=100000,enable_noobj_cache,multireq_max=20,dbglevel=warn \
		</dev/null >"$HOME_DIR/s3fs.log" 2>&1 &
	pid=$!
	wait_mounted
}
stop() {
	# The mount process's CPU, for a machine shared with other work (where it is what counts).
	[[ -r /proc/$pid/stat ]] && awk -v hz="$(getconf CLK_TCK)" '{ printf "    (mount process CPU: user %.2f s, system %.2f s)\n", $14 / hz, $15 / hz }' /proc/$pid/stat
	umount "$MNT"
	wait "$pid" 2>/dev/null || true
	pid=
}
timed_ls() {
	local t0 t1 n
	t0=$(date +%s.%N)
	n=$(ls -l "$MNT/ls" | wc -l)
	t1=$(date +%s.%N)
	[[ $n -eq $((N + 1)) ]] || echo "ls -l printed $n lines, expected $((N + 1))" >&2
	awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.2f", b - a }'
}
timed_stat() { py stat "$MNT/ls" "$N" | sed -n 's/^secs=//p'; }
row() { printf '%-58s %s s\n' "$1" "$2"; }

for client in s3vol base; do
	bin=$S3VOL
	[[ $client == base ]] && bin=$BASE
	[[ -x $bin ]] || continue
	cache=$HOME_DIR/cache-$client
	s3vol_mount "$bin" "$cache"
	row "$client: ls -l, fresh mount, node never listed it" "$(timed_ls)"
	stop
	s3vol_mount "$bin" "$cache"
	row "$client: ls -l, fresh mount, node listed it before" "$(timed_ls)"
	stop
	rm -rf "$cache"
	s3vol_mount "$bin" "$cache"
	row "$client: stat x$N, fresh mount, node never listed it" "$(timed_stat)"
	stop
	s3vol_mount "$bin" "$cache"
	row "$client: stat x$N, fresh mount, node looked them up before" "$(timed_stat)"
	stop
done
if command -v s3fs >/dev/null; then
	s3fs_mount
	row "s3fs: ls -l, fresh mount" "$(timed_ls)"
	stop
	s3fs_mount
	row "s3fs: stat x$N, fresh mount" "$(timed_stat)"
	stop
fi
