"""What the rendered manifests give the s3vol containers at run time, as JSON.

    python runtime_spec.py [kustomize|helm] > spec.json

Renders the install set (`kubectl kustomize deploy/kubernetes`, or the chart with its default
values through helm_render.py) and prints, for the mounter DaemonSet and the node plugin
DaemonSet, what a container runtime would apply: the effective user, group and supplementary
groups (container securityContext over the pod's, the image's USER when neither sets one),
the capabilities, no_new_privs, the read-only root filesystem, every volume mount with the
host path or emptyDir behind it and its propagation, the init containers, the args and
environment, and the termination grace period.

The CSI test `csi_as_deployed_*` (crates/s3vol/tests/support/csi_deployed.rs, in the `csi`
test binary) runs the real binary under exactly these settings; scripts/check-deploy.sh
produces this file for it. Nothing here is a copy of the manifests: change them and the test
runs the new settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# The image's `USER 65532:65532` (deploy/Dockerfile), used when no securityContext sets one.
IMAGE_USER = 65532
IMAGE_GROUP = 65532


def kubectl() -> str:
    local = Path(sys.executable).parent / "kubectl"
    return str(local) if local.exists() else "kubectl"


def render(kind: str) -> list[dict]:
    if kind == "kustomize":
        cmd = [kubectl(), "kustomize", str(REPO / "deploy" / "kubernetes")]
    else:
        cmd = [sys.executable, str(Path(__file__).with_name("helm_render.py")),
               str(REPO / "deploy" / "helm" / "s3vol"), "{}", "s3vol", "s3vol"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def container_spec(pod: dict, c: dict) -> dict:
    psc = pod.get("securityContext") or {}
    csc = c.get("securityContext") or {}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    caps = csc.get("capabilities") or {}
    mounts = []
    for m in c.get("volumeMounts") or []:
        v = volumes[m["name"]]
        mounts.append({
            "mountPath": m["mountPath"],
            "readOnly": bool(m.get("readOnly", False)),
            "propagation": m.get("mountPropagation", "None"),
            "hostPath": (v.get("hostPath") or {}).get("path"),
            "hostPathType": (v.get("hostPath") or {}).get("type", ""),
            "emptyDir": "emptyDir" in v,
        })
    return {
        "name": c["name"],
        "command": c.get("command"),
        "args": c.get("args") or [],
        "env": {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e},
        "user": csc.get("runAsUser", psc.get("runAsUser", IMAGE_USER)),
        "group": csc.get("runAsGroup", psc.get("runAsGroup", IMAGE_GROUP)),
        "supplementalGroups": sorted(set(psc.get("supplementalGroups") or [])
                                     | ({psc["fsGroup"]} if "fsGroup" in psc else set())),
        "privileged": bool(csc.get("privileged", False)),
        "capsAdd": [x.lower() for x in caps.get("add") or []],
        "capsDropAll": "ALL" in (caps.get("drop") or []),
        "noNewPrivs": csc.get("allowPrivilegeEscalation", True) is False,
        "readOnlyRootFilesystem": bool(csc.get("readOnlyRootFilesystem", False)),
        "mounts": mounts,
    }


def daemonset(docs: list[dict], component: str) -> dict:
    for d in docs:
        labels = d.get("metadata", {}).get("labels", {})
        if d.get("kind") == "DaemonSet" and labels.get("app.kubernetes.io/component") == component:
            pod = d["spec"]["template"]["spec"]
            return {
                "terminationGracePeriodSeconds": pod.get("terminationGracePeriodSeconds", 30),
                "hostPID": bool(pod.get("hostPID", False)),
                "hostNetwork": bool(pod.get("hostNetwork", False)),
                "init": [container_spec(pod, c) for c in pod.get("initContainers") or []],
                "containers": [container_spec(pod, c) for c in pod["containers"]],
            }
    sys.exit(f"no DaemonSet with component {component} in the rendered manifests")


def main() -> None:
    kind = sys.argv[1] if len(sys.argv) > 1 else "kustomize"
    docs = render(kind)
    json.dump({"source": kind, "mounter": daemonset(docs, "mounter"),
               "node": daemonset(docs, "node")}, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
