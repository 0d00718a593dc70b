#!/usr/bin/env bash
# garage.sh: the S3 server of s3vol's full benchmark: Garage (a real object store, crates.io
# `garage` 2.5.0), one node on 127.0.0.1 with a single-node layout, region `garage`,
# path-style addressing, data compression off (so that the benchmark's random data costs the
# server no zstd time and compressible data would get no unfair advantage).
#
# Usage:
#   bench/garage.sh install     build garage into $BENCH_HOME/garage unless it is already there
#                               (cargo install garage --version 2.5.0 --locked; ~30 min)
#   bench/garage.sh start B…    start a fresh server (state wiped), create a key and buckets B…,
#                               print the env lines below on stdout
#   bench/garage.sh stop        stop the server this script started
#
# The env lines:
#   export BENCH_ENDPOINT=http://127.0.0.1:3900 BENCH_REGION=garage
#   export AWS_ACCESS_KEY_ID=GK… AWS_SECRET_ACCESS_KEY=…
#
# Settings (environment): BENCH_HOME (default /opt/s3vol-bench), GARAGE_S3_PORT (3900),
# GARAGE_RPC_PORT (3901), GARAGE_ADMIN_PORT (3903).
set -euo pipefail

BENCH_HOME=${BENCH_HOME:-/opt/s3vol-bench}
GARAGE_VERSION=2.5.0
GARAGE=$BENCH_HOME/garage/bin/garage
STATE=$BENCH_HOME/garage-run
S3_PORT=${GARAGE_S3_PORT:-3900}
RPC_PORT=${GARAGE_RPC_PORT:-3901}
ADMIN_PORT=${GARAGE_ADMIN_PORT:-3903}
CONF=$STATE/garage.toml

log() { printf 'garage: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

cmd_install() {
	if [[ -x $GARAGE ]] && "$GARAGE" --version 2>/dev/null | grep -q "$GARAGE_VERSION"; then
		return 0
	fi
	log "building garage $GARAGE_VERSION into $BENCH_HOME/garage (this takes a while)"
	mkdir -p "$BENCH_HOME"
	CARGO_TARGET_DIR=$BENCH_HOME/target/garage \
		cargo install garage --version "$GARAGE_VERSION" --locked --root "$BENCH_HOME/garage" \
		>"$BENCH_HOME/garage-build.log" 2>&1 || die "build failed, see $BENCH_HOME/garage-build.log"
}

running_pid() {
	local pid
	[[ -f $STATE/pid ]] || return 1
	pid=$(<"$STATE/pid")
	kill -0 "$pid" 2>/dev/null || return 1
	[[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$GARAGE" ]] || return 1
	printf '%s\n' "$pid"
}

cmd_stop() {
	local pid i
	if pid=$(running_pid); then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
	fi
	rm -f "$STATE/pid"
}

g() { "$GARAGE" -c "$CONF" "$@"; }

cmd_start() {
	local pid node i out key_id secret b
	[[ -x $GARAGE ]] || cmd_install
	cmd_stop
	port_open "$S3_PORT" && die "port $S3_PORT is in use (set GARAGE_S3_PORT)"
	rm -rf "$STATE"
	mkdir -p "$STATE/meta" "$STATE/data"
	cat >"$CONF" <<EOF
metadata_dir = "$STATE/meta"
data_dir = "$STATE/data"
db_engine = "lmdb"
replication_factor = 1
compression_level = "none"
rpc_bind_addr = "127.0.0.1:$RPC_PORT"
rpc_public_addr = "127.0.0.1:$RPC_PORT"
rpc_secret = "$(od -An -tx1 -N32 /dev/urandom | tr -d ' \n')"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3_PORT"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:$ADMIN_PORT"
EOF
	chmod 600 "$CONF"
	RUST_LOG=warn setsid "$GARAGE" -c "$CONF" server </dev/null >"$STATE/garage.log" 2>&1 &
	pid=$!
	echo "$pid" >"$STATE/pid"
	for ((i = 0; i < 300; i++)); do
		port_open "$S3_PORT" && break
		kill -0 "$pid" 2>/dev/null || {
			tail -20 "$STATE/garage.log" >&2
			die "garage exited"
		}
		sleep 0.1
	done
	port_open "$S3_PORT" || die "garage did not listen on $S3_PORT"
	for ((i = 0; i < 100; i++)); do
		node=$(g node id -q 2>/dev/null | cut -d@ -f1) && [[ -n $node ]] && break
		sleep 0.2
	done
	[[ -n ${node:-} ]] || die "cannot read the node id"
	g layout assign -z dc1 -c 100G "$node" >/dev/null
	g layout apply --version 1 >/dev/null
	out=$(g key create s3vol-bench)
	key_id=$(sed -n 's/^Key ID: *//p' <<<"$out" | head -1)
	secret=$(sed -n 's/^Secret key: *//p' <<<"$out" | head -1)
	[[ -n $key_id && -n $secret ]] || die "cannot parse the key: $out"
	for b in "$@"; do
		g bucket create "$b" >/dev/null
		g bucket allow --read --write --owner "$b" --key s3vol-bench >/dev/null
	done
	log "garage $GARAGE_VERSION running (pid $pid) on http://127.0.0.1:$S3_PORT, buckets: $*"
	cat <<EOF
export BENCH_ENDPOINT=http://127.0.0.1:$S3_PORT BENCH_REGION=garage
export AWS_ACCESS_KEY_ID=$key_id AWS_SECRET_ACCESS_KEY=$secret
EOF
}

case ${1:-} in
install) cmd_install ;;
start)
	shift
	cmd_start "$@"
	;;
stop) cmd_stop ;;
*)
	sed -n '2,20p' "$0" >&2
	exit 2
	;;
esac
