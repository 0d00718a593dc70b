#!/usr/bin/env bash
# Checks everything under deploy/: the kustomize base and overlays, the Helm chart, the
# examples. Needs python3 and pip, nothing else: the pinned tools
# (deploy/tests/requirements.txt) go into a virtualenv under .deploy-check/.
#
#   bash scripts/check-deploy.sh            # CI runs exactly this
#
# What it verifies (each a pytest test under deploy/tests/):
#   - every rendered install set (kustomize base/overlays, chart with each values file
#     in deploy/helm/s3vol/ci/) and every example validates against the Kubernetes
#     OpenAPI schemas, strict, for the oldest supported and the newest Kubernetes;
#     the COSI examples against structural schemas of objectstorage.k8s.io/v1alpha1
#   - yamllint --strict on all YAML that is YAML before rendering
#   - the chart's values (and each ci/ values file) against values.schema.json, which also
#     rejects known-bad values; every .Values reference in the templates exists
#   - the chart renders with Helm's own engine and matches the kustomize manifests
#   - the security properties in docs/privileges.md: only the node plugin container is
#     privileged, allowlisted host paths, no host namespaces, least-privilege RBAC, no
#     secrets, non-root, read-only root filesystems, resources; workload examples pass
#     Pod Security "restricted"; and each check is shown to fail on a broken copy
#   - no hostPath can pin copies of volume mounts (propagation), the mounter's shutdown
#     timeout fits its grace period, the node plugin is told its kubelet directory
# Then, as root with /dev/fuse and the test S3 server (scripts/test.sh provides them), the
# mounter runs as deployed: deploy/tests/runtime_spec.py reads the rendered manifests and the
# CSI test csi_as_deployed_* runs the real binary under exactly that user, those groups,
# capabilities and volumes, as PID 1 of its own PID namespace, without /dev/fuse, stages a
# volume through it, kills its serving process once (a successor takes over) and drains it
# with SIGTERM. The exit status is non-zero if any part fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
STATE="${S3VOL_DEPLOY_CHECK_DIR:-.deploy-check}"
VENV="$STATE/venv"
REQS=deploy/tests/requirements.txt
HELM_SDK=helm-sdkpy==0.1.32
STAMP="$VENV/.installed-$( (cat "$REQS"; echo "$HELM_SDK") | sha256sum | cut -c1-16)"

install_tools() {
    echo "== installing pinned tools into $VENV"
    rm -rf "$VENV"
    mkdir -p "$STATE"
    # Debian without python3-venv has no ensurepip: create the venv without pip and let
    # the system pip install into it.
    if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        python3 -m venv --without-pip "$VENV"
        python3 -m pip --python "$VENV/bin/python" install -q --disable-pip-version-check pip
    fi
    local pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
    "${pip[@]}" -r "$REQS"
    if [ "$(uname -m)" = x86_64 ]; then
        "${pip[@]}" --no-deps --ignore-requires-python "$HELM_SDK"
    else
        echo "   $HELM_SDK ships linux-amd64 only: chart rendering tests will be skipped"
    fi
    touch "$STAMP"
}

[ -f "$STAMP" ] || install_tools
export PATH="$VENV/bin:$PATH"
export PYTHONDONTWRITEBYTECODE=1

echo "== s3vol deploy checks ($(kubectl version --client 2>/dev/null | head -n1); $(yamllint --version))"
status=0
"$VENV/bin/python" -m pytest deploy/tests -p no:cacheprovider -q -rfEs --durations=5 || status=$?

echo "== the mounter as deployed (rendered manifests; PID 1; no /dev/fuse)"
if [ "$(id -u)" -ne 0 ] || [ ! -e /dev/fuse ] || [ -z "${S3VOL_TEST_ENDPOINT:-}" ]; then
    echo "   skipped: needs root, /dev/fuse and the test S3 server (scripts/test.sh provides them)"
else
    sets=(kustomize)
    [ "$(uname -m)" = x86_64 ] && sets+=(helm)
    for set in "${sets[@]}"; do
        spec="$PWD/$STATE/runtime-spec-$set.json"
        if "$VENV/bin/python" deploy/tests/runtime_spec.py "$set" > "$spec"; then
            echo "   $set: $spec"
            # --workspace: the same features as the test run, so nothing is rebuilt.
            S3VOL_DEPLOYED_SPEC="$spec" cargo test --workspace --locked --test csi -q -- \
                --exact deployed::csi_as_deployed_mounter_serves_without_dev_fuse_as_pid_1_and_drains_on_sigterm \
                || status=$?
        else
            status=1
        fi
    done
fi
exit $status
