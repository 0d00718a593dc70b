#!/usr/bin/env bash
# Runs every check s3vol's CI runs, on a fresh Debian 12 machine or a developer's:
#   1. installs what the tests need, as root with apt-get: fuse3, attr (xattr tools), s3fs
#      (a test reads and writes the same bucket through s3fs) and fio (the failover tests'
#      write-and-verify load); the moto S3 server comes from
#      PyPI into .s3-server/ (scripts/s3-server.sh),
#   2. starts the local S3 server on 127.0.0.1 (SigV4 checking on) unless one is running,
#   3. runs the stages: cargo fmt --check, clippy -D warnings, every test (unit, conformance
#      against the real server, FUSE mounts, CSI, COSI), doc tests, rustdoc -D warnings, the
#      deployment checks, and the quick benchmark.
# The quick benchmark (bench/run.sh --quick) INSTALLS s3fs (apt) and rclone (PyPI) when they
# are missing, and DROPS THE PAGE CACHE OF THE WHOLE MACHINE (echo 3 > /proc/sys/vm/drop_caches)
# before its read workloads: other programs on the machine lose their cached files.
#
# A stage that fails does not stop the others: every stage runs, a table of stages and results
# ends the output, and the exit status is non-zero when any stage failed.
#
# The first run compiles about 360 crates, the test binaries included: about 11 CPU-minutes,
# 10 or more minutes on 2 idle cores, much longer on a busy machine. cargo shows its progress.
#
# Usage: scripts/test.sh            (CI runs exactly this, from .ci/run)
#        scripts/test.sh -- FILTER  (only tests matching FILTER, skipping the other stages)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*" >&2; }

filter=()
if [[ "${1:-}" == "--" ]]; then
    shift
    filter=("$@")
fi

if [[ $(id -u) -eq 0 ]]; then
    missing=()
    command -v fusermount3 >/dev/null || missing+=(fuse3)
    command -v getfattr >/dev/null || missing+=(attr)
    command -v s3fs >/dev/null || missing+=(s3fs)
    command -v fio >/dev/null || missing+=(fio)
    if [[ ${#missing[@]} -gt 0 ]]; then
        log "installing ${missing[*]} (apt-get)"
        apt-get update -qq >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
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

# Each stage: a name and a command. Its result and duration go into the summary.
names=() results=() times=()
stage() {
    local name=$1
    shift
    log "$name"
    local start=$SECONDS status=0
    "$@" || status=$?
    names+=("$name")
    times+=("$((SECONDS - start)) s")
    if [[ $status -eq 0 ]]; then
        results+=(ok)
    else
        results+=("FAILED (exit $status)")
        log "$name FAILED (exit $status); going on with the other stages"
    fi
}

doc() { RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked; }
quick_bench() {
    # The binary the tests just built: `cargo build -p s3vol` alone would unify features
    # differently and rebuild most dependencies.
    [[ -x target/debug/s3vol ]] && export S3VOL_BIN="$PWD/target/debug/s3vol"
    bash bench/run.sh --quick
}

stage "cargo fmt --check" cargo fmt --all -- --check
stage "cargo clippy" cargo clippy --workspace --all-targets --locked -- -D warnings
stage "tests" run_tests
stage "doc tests" cargo test --workspace --locked --doc
stage "rustdoc" doc
stage "deployment checks" bash scripts/check-deploy.sh
stage "quick benchmark (checks data, not speed)" quick_bench

failed=0
printf '\n%-45s %-8s %s\n' "stage" "time" "result"
for i in "${!names[@]}"; do
    printf '%-45s %-8s %s\n' "${names[$i]}" "${times[$i]}" "${results[$i]}"
    [[ ${results[$i]} == ok ]] || failed=$((failed + 1))
done
if [[ $failed -gt 0 ]]; then
    printf '\n%d of %d stages failed\n' "$failed" "${#names[@]}"
    exit 1
fi
printf '\nall %d stages passed\n' "${#names[@]}"
