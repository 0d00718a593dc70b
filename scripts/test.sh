#!/usr/bin/env bash
# Runs every check s3vol's CI runs, on a fresh Debian 12 machine or a developer's:
#   1. installs what the tests need (FUSE and xattr tools, the moto S3 server),
#   2. starts the local S3 server on 127.0.0.1 (SigV4 checking on) unless one is running,
#   3. cargo fmt --check, clippy -D warnings, every test (unit, conformance against the real
#      server, FUSE mounts, CSI, COSI), rustdoc -D warnings, and the deployment checks.
# Usage: scripts/test.sh            (CI runs exactly this, from .ci/run)
#        scripts/test.sh -- FILTER  (only tests matching FILTER, skipping the other checks)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

filter=()
if [[ "${1:-}" == "--" ]]; then
    shift
    filter=("$@")
fi

if [[ $(id -u) -eq 0 ]] && { ! command -v fusermount3 >/dev/null || ! command -v getfattr >/dev/null; }; then
    log "installing fuse3 and attr"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fuse3 attr >/dev/null
fi

# The SDK must never go looking for instance metadata: tests talk to loopback only.
export AWS_EC2_METADATA_DISABLED=true
export CARGO_TERM_COLOR=never

started_server=0
if ! bash scripts/s3-server.sh status >/dev/null 2>&1; then
    started_server=1
fi
log "starting the local S3 server"
lines=$(bash scripts/s3-server.sh start)
eval "$lines"
if [[ $started_server -eq 1 ]]; then
    trap 'bash scripts/s3-server.sh stop >/dev/null 2>&1 || true' EXIT
fi

run_tests() {
    if cargo nextest --version >/dev/null 2>&1; then
        cargo nextest run --workspace --locked --no-fail-fast "${filter[@]}"
    else
        cargo test --workspace --locked --no-fail-fast -- "${filter[@]}"
    fi
}

if [[ ${#filter[@]} -gt 0 ]]; then
    log "tests matching: ${filter[*]}"
    run_tests
    exit
fi

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "tests"
run_tests
log "doc tests"
cargo test --workspace --locked --doc
log "rustdoc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
log "deployment checks"
bash scripts/check-deploy.sh
# The binary the tests above just built: `cargo build -p s3vol` alone would unify features
# differently and rebuild most dependencies.
[[ -x target/debug/s3vol ]] && export S3VOL_BIN="$PWD/target/debug/s3vol"
log "benchmark harness, quick mode (checks data, not speed)" && bash bench/run.sh --quick
