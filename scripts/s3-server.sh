#!/usr/bin/env bash
# s3-server.sh: run a local S3-compatible server (moto in server mode) for
# s3vol's tests, on loopback, with SigV4 signature checking switched on.
#
# Usage:
#   scripts/s3-server.sh start    install moto if needed, start it in the
#                                 background, create the test credentials and
#                                 print the env lines (below) on stdout
#   scripts/s3-server.sh stop     stop the server that `start` started
#   scripts/s3-server.sh status   say whether it runs (exit 0: running and the
#                                 saved key works; 1: running, key does not
#                                 work; 3: not running)
#   scripts/s3-server.sh env      print the env lines of the running server
#
#   eval "$(scripts/s3-server.sh start)"
#   scripts/s3-server.sh start >/dev/null && . .s3-server/env
# (eval "$(...)" returns 0 even when start failed; in scripts prefer
#  lines=$(scripts/s3-server.sh start) && eval "$lines", or the second form.)
#
# The env lines (also written to <state>/env):
#   export S3VOL_TEST_ENDPOINT=http://127.0.0.1:9100
#   export S3VOL_TEST_REGION=us-east-1
#   export S3VOL_TEST_ACCESS_KEY_ID=...
#   export S3VOL_TEST_SECRET_ACCESS_KEY=...
# Only these lines go to stdout; progress and errors go to stderr.
# Clients must use path-style addressing (http://127.0.0.1:9100/bucket/key).
#
# Settings (environment):
#   S3VOL_S3_PORT           port on 127.0.0.1 (default 9100)
#   S3VOL_S3_STATE          state directory (default <repo>/.s3-server): holds
#                           moto.pid, port, moto.log, env
#   S3VOL_S3_START_TIMEOUT  seconds to wait for the server to listen (default 60)
#   S3VOL_PYTHON            python interpreter to use (default python3)
#   S3VOL_MOTO_VERSION      moto version to install (default: the pin below)
#
# How authentication is switched on: moto checks nothing until it has served
# INITIAL_NO_AUTH_ACTION_COUNT requests. The counter is a class attribute
# (moto/core/authorization.py, ActionAuthenticatorMixin.request_count) that is
# bumped once per request that reaches an S3/IAM/... handler's auth check while
# it is below the limit; once it equals the limit, every such request has its
# SigV4 signature recomputed and compared, and the key's IAM policies applied.
# Requests to /moto-api/* and bare TCP connections do not count, so readiness
# is probed with a TCP connect only. s3_server_setup.py then spends exactly
# the budget (3 requests: CreateUser, CreateAccessKey, PutUserPolicy with an
# allow-all policy, without retries) and checks that a wrong secret and an
# unknown key are rejected. Do not call /moto-api/reset (it wipes the IAM user
# too) or /moto-api/reset-auth (it turns checking off or resets the counter).
#
# Fixes to moto: the server is moto's own (moto.server.main, what the
# moto_server command runs), started through s3_server_setup.py, which first
# patches moto 5.2.1 in memory where it breaks correct S3 clients:
#  - it computes S3 signatures from the raw request line. Unpatched, moto
#    signs werkzeug's partly decoded URL, so correctly signed requests for
#    keys with + : = , ; @ % \ or non-ASCII characters, or a listing with
#    delimiter=/, fail with SignatureDoesNotMatch;
#  - it does not parse PUT bodies as forms. Unpatched, a PUT with
#    Content-Type application/x-www-form-urlencoded or multipart/form-data
#    stores an empty object and answers 200.
# And STS web identity made to behave as AWS's (_patch_sts_web_identity):
#  - AssumeRoleWithWebIdentity is taken unsigned (unpatched: a 500 once
#    authentication is on);
#  - its token must be a JWT whose "exp" lies in the future, and the role
#    must exist (unpatched: any token, any role);
#  - assumed-role credentials are refused (ExpiredToken) after their
#    Expiration (unpatched: valid forever).
# The role's policies apply to its assumed-role credentials unpatched.
#
# Concurrency and size: moto's server main (moto/server.py) calls werkzeug's
# run_simple(threaded=True), so every connection gets its own thread and no
# option is needed; werkzeug answers each request with "Connection: close"
# (no keep-alive). Objects live in the server process: bodies above about
# 5 MiB (MOTO_S3_DEFAULT_KEY_BUFFER_SIZE) spill into unlinked files in $TMPDIR,
# and nothing survives a stop. 100 MiB objects and multipart uploads with
# 8 MiB parts need no option: moto's 50 MiB form size limit
# (MOTO_MAX_FORM_MEMORY_SIZE) only applies to POSTed forms once PUT bodies are
# no longer parsed as forms (see above).
set -euo pipefail

MOTO_PIN=5.2.1

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")
HELPER=$SCRIPT_DIR/s3_server_setup.py

STATE_DIR=${S3VOL_S3_STATE:-$REPO_DIR/.s3-server}
PORT=${S3VOL_S3_PORT:-9100}
START_TIMEOUT=${S3VOL_S3_START_TIMEOUT:-60}
PYTHON=${S3VOL_PYTHON:-python3}
MOTO_VERSION=${S3VOL_MOTO_VERSION:-$MOTO_PIN}

HOST=127.0.0.1
REGION=us-east-1
ENDPOINT=http://$HOST:$PORT
PID_FILE=$STATE_DIR/moto.pid
PORT_FILE=$STATE_DIR/port
LOG_FILE=$STATE_DIR/moto.log
ENV_FILE=$STATE_DIR/env

log() { printf 's3-server: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

usage() {
	# The header comment up to the notes on authentication.
	awk 'NR > 1 && (!/^#/ || /^# How authentication/) { exit } NR > 1 { sub(/^# ?/, ""); print }' \
		"${BASH_SOURCE[0]}" >&2
	exit 2
}

check_settings() {
	if ! [[ $PORT =~ ^[1-9][0-9]*$ ]] || ((PORT < 1 || PORT > 65535)); then
		die "S3VOL_S3_PORT must be a port number, not '$PORT'"
	fi
	[[ $START_TIMEOUT =~ ^[0-9]+$ ]] ||
		die "S3VOL_S3_START_TIMEOUT must be a number of seconds, not '$START_TIMEOUT'"
	command -v "$PYTHON" >/dev/null || die "$PYTHON not found (set S3VOL_PYTHON)"
}

# Serialise start/stop of concurrent callers on the same state directory.
lock_state() {
	mkdir -p "$STATE_DIR"
	if command -v flock >/dev/null; then
		exec 9>"$STATE_DIR/lock"
		flock -w 300 9 || die "timed out waiting for $STATE_DIR/lock"
	fi
}

# Prints the pid of the moto server this script started, if it still runs.
running_pid() {
	local pid cmdline
	[[ -f $PID_FILE ]] || return 1
	pid=$(<"$PID_FILE")
	[[ $pid =~ ^[0-9]+$ ]] || return 1
	kill -0 "$pid" 2>/dev/null || return 1
	# Guard against a recycled pid: it must still be our server.
	cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
	[[ $cmdline == *s3_server_setup.py" serve "* ]] || return 1
	printf '%s\n' "$pid"
}

running_port() { cat "$PORT_FILE" 2>/dev/null || true; }

# True if something accepts TCP connections on the port. A bare connection
# is not an HTTP request, so it does not use up moto's no-auth budget.
port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }

key_works() {
	local endpoint key secret
	[[ -f $ENV_FILE ]] || return 1
	endpoint=$(sed -n 's/^export S3VOL_TEST_ENDPOINT=//p' "$ENV_FILE")
	key=$(sed -n 's/^export S3VOL_TEST_ACCESS_KEY_ID=//p' "$ENV_FILE")
	secret=$(sed -n 's/^export S3VOL_TEST_SECRET_ACCESS_KEY=//p' "$ENV_FILE")
	[[ -n $endpoint && -n $key && -n $secret ]] || return 1
	"$PYTHON" "$HELPER" check "$endpoint" "$REGION" "$key" "$secret" >&2
}

moto_installed_version() {
	"$PYTHON" - <<'EOF' 2>/dev/null
import importlib.metadata as md
import boto3, flask, flask_cors, moto.server  # noqa: F401  (all that moto_server needs)
print(md.version("moto"))
EOF
}

ensure_moto() {
	local have out
	have=$(moto_installed_version) || have=
	[[ $have == "$MOTO_VERSION" ]] && return 0
	log "installing moto[server]==$MOTO_VERSION (found: ${have:-none})"
	local pip=("$PYTHON" -m pip install --disable-pip-version-check --quiet "moto[server]==$MOTO_VERSION")
	if ! out=$("${pip[@]}" 2>&1); then
		if [[ $out == *externally-managed-environment* ]]; then
			# Debian's own python3 (PEP 668): install beside its packages.
			log "retrying with --break-system-packages (externally managed python)"
			"${pip[@]}" --break-system-packages >&2 || die "pip install failed"
		else
			printf '%s\n' "$out" >&2
			die "pip install 'moto[server]==$MOTO_VERSION' failed"
		fi
	elif [[ -n $out ]]; then
		printf '%s\n' "$out" >&2
	fi
	have=$(moto_installed_version) || have=
	[[ $have == "$MOTO_VERSION" ]] || die "moto $MOTO_VERSION still not importable by $PYTHON (found: ${have:-none})"
}

stop_server() {
	local pid i
	if pid=$(running_pid); then
		log "stopping moto (pid $pid)"
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		if kill -0 "$pid" 2>/dev/null; then
			log "moto (pid $pid) ignored SIGTERM; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$PID_FILE" "$PORT_FILE" "$ENV_FILE"
}

fail_start() {
	log "error: $*"
	if [[ -s $LOG_FILE ]]; then
		log "last lines of $LOG_FILE:"
		tail -n 30 "$LOG_FILE" >&2
	fi
	stop_server
	exit 1
}

write_env() {
	local key=$1 secret=$2 tmp
	# Secrets are [A-Za-z0-9+/]: safe unquoted in sh and in KEY=VALUE parsers.
	[[ $key =~ ^[A-Za-z0-9]+$ && $secret =~ ^[A-Za-z0-9+/=]+$ ]] ||
		fail_start "unexpected characters in the created access key"
	tmp=$(mktemp "$STATE_DIR/env.XXXXXX")
	cat >"$tmp" <<EOF
export S3VOL_TEST_ENDPOINT=$ENDPOINT
export S3VOL_TEST_REGION=$REGION
export S3VOL_TEST_ACCESS_KEY_ID=$key
export S3VOL_TEST_SECRET_ACCESS_KEY=$secret
EOF
	chmod 600 "$tmp"
	mv -f "$tmp" "$ENV_FILE"
}

cmd_start() {
	local pid budget creds key secret deadline
	check_settings
	lock_state

	if pid=$(running_pid); then
		if [[ $(running_port) != "$PORT" ]]; then
			die "already running on port $(running_port) (pid $pid); run '$0 stop' first"
		fi
		if key_works; then
			log "already running (pid $pid) at $ENDPOINT"
			cat "$ENV_FILE"
			return 0
		fi
		log "running (pid $pid) but the saved key does not answer; restarting"
	fi
	stop_server # also clears files left behind by a server that died

	if port_open "$PORT"; then
		die "port $PORT on $HOST is used by another process (set S3VOL_S3_PORT)"
	fi
	ensure_moto
	budget=$("$PYTHON" "$HELPER" budget)

	log "starting moto $MOTO_VERSION on $ENDPOINT (log: $LOG_FILE)"
	: >"$LOG_FILE"
	# setsid: own session, so the terminal's Ctrl-C for the caller does not
	# reach it; fd 9 (the lock) is closed so the server does not hold it.
	INITIAL_NO_AUTH_ACTION_COUNT=$budget \
		MOTO_PORT=$PORT \
		setsid "$PYTHON" "$HELPER" serve "$HOST" "$PORT" \
		</dev/null >>"$LOG_FILE" 2>&1 9>&- &
	pid=$!
	printf '%s\n' "$pid" >"$PID_FILE"
	printf '%s\n' "$PORT" >"$PORT_FILE"

	deadline=$((SECONDS + START_TIMEOUT))
	until port_open "$PORT"; do
		kill -0 "$pid" 2>/dev/null || fail_start "moto exited before it listened on $ENDPOINT"
		((SECONDS < deadline)) || fail_start "moto did not listen on $ENDPOINT within ${START_TIMEOUT}s"
		sleep 0.2
	done
	running_pid >/dev/null || fail_start "the process listening on $PORT is not the moto we started"

	creds=$("$PYTHON" "$HELPER" setup "$ENDPOINT" "$REGION") ||
		fail_start "creating the test credentials failed"
	read -r key secret <<<"$creds"
	write_env "$key" "$secret"
	log "moto running (pid $pid) at $ENDPOINT, SigV4 checking on"
	cat "$ENV_FILE"
}

cmd_stop() {
	lock_state
	if running_pid >/dev/null; then
		stop_server
	else
		log "not running"
		rm -f "$PID_FILE" "$PORT_FILE" "$ENV_FILE"
	fi
}

cmd_status() {
	local pid
	if ! pid=$(running_pid); then
		log "not running"
		return 3
	fi
	if key_works; then
		log "running (pid $pid) at http://$HOST:$(running_port), test key works"
		return 0
	fi
	log "running (pid $pid) at http://$HOST:$(running_port), but the saved key does not work"
	return 1
}

cmd_env() {
	if ! running_pid >/dev/null || [[ ! -f $ENV_FILE ]]; then
		die "not running; start it with: eval \"\$($0 start)\""
	fi
	cat "$ENV_FILE"
}

case ${1:-} in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
-h | --help | help) usage ;;
*) usage ;;
esac
