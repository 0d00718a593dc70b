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
#     Pod Security "restricted"; and each check is shown to fail on a broken copy.
# The last line is pytest's summary; the exit status is pytest's.
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
exec "$VENV/bin/python" -m pytest deploy/tests -p no:cacheprovider -q -rfEs --durations=5
