#!/usr/bin/env bash
# profile.sh: where s3vol's time goes in one benchmark workload. Starts a fresh Garage
# (bench/garage.sh), mounts s3vol (release build) with --metrics-addr, runs the workload once
# with `perf record -g` attached to the s3vol process, then prints:
#   - the workload's time and the wall time of the mount process split into user/system CPU,
#   - s3vol's per-request metrics (count, total and mean latency per S3 operation),
#   - the hottest symbols of the s3vol process (perf report, self time).
#
# Usage (root): bench/profile.sh seqread|seqwrite|randread|create|ls|stat [SIZE_MIB|COUNT]
# S3VOL_MOUNT_ARGS adds options to the mount (e.g. "--payload-signing never");
# PROFILE_CALL_GRAPH=dwarf records call graphs through the release build (slower).
# Also the Garage server's CPU over the same interval (it shares the machine's cores).
# Output also goes to $BENCH_HOME/profile/<workload>/ (perf.data, report.txt, metrics.txt).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
BENCH_HOME=${BENCH_HOME:-/opt/s3vol-bench}
export AWS_EC2_METADATA_DISABLED=true
w=${1:?usage: profile.sh seqread|seqwrite|randread|create|ls|stat [SIZE_MIB|COUNT]}
n=${2:-}
OUT=$BENCH_HOME/profile/$w
MNT=$BENCH_HOME/profile/mnt
S3VOL=${S3VOL_BIN:-$REPO/target/release/s3vol}
METRICS=127.0.0.1:9810
command -v perf >/dev/null || apt-get install -y -qq linux-perf >/dev/null
[[ -x $S3VOL ]] || (cd "$REPO" && cargo build --release --locked -p s3vol)
rm -rf "$OUT" && mkdir -p "$OUT" "$MNT"

pid=
cleanup() {
	umount "$MNT" 2>/dev/null || umount -l "$MNT" 2>/dev/null || true
	[[ -n $pid ]] && kill "$pid" 2>/dev/null
	bash "$BENCH/garage.sh" stop
}
trap cleanup EXIT
eval "$(bash "$BENCH/garage.sh" start prof)"
export BENCH_BUCKET=prof
py() { python3 "$BENCH/bench.py" "$@"; }

SRC=$BENCH_HOME/work/src.bin
case $w in
seqread | seqwrite | randread)
	n=${n:-1024}
	if [[ ! -f $SRC || $(stat -c %s "$SRC") -ne $((n << 20)) ]]; then
		mkdir -p "$(dirname "$SRC")"
		head -c $((n << 20)) /dev/urandom >"$SRC"
	fi
	[[ $w != seqwrite ]] && py upload big "$SRC"
	;;
ls | stat)
	n=${n:-10000}
	py populate ls/ "$n" 4096 --dir-marker
	;;
create) n=${n:-1000} ;;
*) echo "unknown workload $w" >&2 && exit 2 ;;
esac

setsid "$S3VOL" mount prof "$MNT" --endpoint-url "$BENCH_ENDPOINT" --force-path-style --region "$BENCH_REGION" \
	-f --cache-dir "$BENCH_HOME/profile/cache" --metrics-addr "$METRICS" --log-level warn ${S3VOL_MOUNT_ARGS:-} \
	</dev/null >"$OUT/s3vol.log" 2>&1 &
pid=$!
for ((i = 0; i < 300; i++)); do
	mountpoint -q "$MNT" && break
	sleep 0.1
done
mountpoint -q "$MNT" || {
	cat "$OUT/s3vol.log" >&2
	exit 1
}
# Supervised (the default as root): the serving process is the supervisor's child.
stat "$MNT" >/dev/null
for t in /proc/"$pid"/task/*; do
	child=$(cat "$t/children" 2>/dev/null || true)
	[[ -n ${child// /} ]] && pid=${child%% *} && break
done
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ u0 s0 _ </proc/$pid/stat
gpid=$(pgrep -f "^$BENCH_HOME/garage/bin/garage .* server" | head -1 || true)
[[ -n $gpid ]] && read -r _ _ _ _ _ _ _ _ _ _ _ _ _ gu0 gs0 _ </proc/$gpid/stat
[[ $w == seqread || $w == randread ]] && sync && echo 3 >/proc/sys/vm/drop_caches
[[ $w == seqwrite ]] && cat "$SRC" >/dev/null
# PROFILE_CALL_GRAPH=dwarf: call graphs through code built without frame pointers (the
# release build), at a larger cost while recording.
perf record -F 999 --call-graph "${PROFILE_CALL_GRAPH:-fp}" -p "$pid" -o "$OUT/perf.data" 2>"$OUT/perf-record.log" &
perf_pid=$!
sleep 1
t0=$(date +%s.%N)
case $w in
seqread) dd if="$MNT/big" of=/dev/null bs=1M status=none ;;
seqwrite) dd if="$SRC" of="$MNT/big" bs=1M conv=fsync status=none ;;
randread)
	FILE=$MNT/big RUNTIME=10 fio --readonly --output-format=json --output="$OUT/fio.json" "$BENCH/fio/randread.fio"
	n=$(python3 "$BENCH/bench.py" fio-iops "$OUT/fio.json")
	;;
create) py create "$MNT/small" "$n" 4096 >/dev/null ;;
ls) ls -l "$MNT/ls" >/dev/null ;;
stat) py stat "$MNT/ls" "$n" >/dev/null ;;
esac
t1=$(date +%s.%N)
kill -INT "$perf_pid" && wait "$perf_pid" || true
read -r _ _ _ _ _ _ _ _ _ _ _ _ _ u1 s1 _ </proc/$pid/stat
[[ -n $gpid ]] && read -r _ _ _ _ _ _ _ _ _ _ _ _ _ gu1 gs1 _ </proc/$gpid/stat
tick=$(getconf CLK_TCK)
{
	awk -v a="$t0" -v b="$t1" -v n="${n}" -v w="$w" 'BEGIN {
		t = b - a
		if (w ~ /^seq/) printf "%s: %.2f s, %.1f MiB/s\n", w, t, n / t
		else if (w == "randread") printf "%s: %.0f IOPS over %.1f s\n", w, n, t
		else printf "%s: %.2f s for %d entries (%.0f per s)\n", w, t, n, n / t }'
	awk -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v hz="$tick" -v a="$t0" -v b="$t1" 'BEGIN {
		printf "s3vol CPU during the workload (plus ~1 s before): user %.2f s, system %.2f s (%.0f%% of one core over the workload)\n",
			u / hz, s / hz, 100 * (u + s) / hz / (b - a) }'
	[[ -n $gpid ]] && awk -v u=$((gu1 - gu0)) -v s=$((gs1 - gs0)) -v hz="$tick" 'BEGIN {
		printf "Garage CPU over the same interval (the server shares the cores): user %.2f s, system %.2f s\n", u / hz, s / hz }'
	echo
	echo "S3 requests (op: count, total seconds, mean ms):"
	curl -s "http://$METRICS/metrics" >"$OUT/metrics.txt" || true
	awk '
		/^s3vol_s3_request_seconds_count/ { match($0, /op="[^"]*"/); op = substr($0, RSTART + 4, RLENGTH - 5); c[op] = $NF }
		/^s3vol_s3_request_seconds_sum/ { match($0, /op="[^"]*"/); op = substr($0, RSTART + 4, RLENGTH - 5); s[op] = $NF }
		END { for (op in c) printf "  %-24s %8d %9.2f %8.2f\n", op, c[op], s[op], c[op] ? 1000 * s[op] / c[op] : 0 }
	' "$OUT/metrics.txt" | sort -k2 -nr
	grep -E '^s3vol_s3_bytes_total|^s3vol_fs_random_reads_total' "$OUT/metrics.txt" | sed 's/^/  /' || true
	echo
	echo "Hottest symbols of the s3vol process (self time):"
	perf report -i "$OUT/perf.data" --no-children --sort dso,sym --stdio 2>/dev/null |
		grep -E '^ +[0-9]' | head -30
} | tee "$OUT/report.txt"
