"""Run-time properties of the node plugin and mounter DaemonSets that the CSI driver relies on.

- **No hostPath can pin a volume.** A hostPath mounted without propagation (`None`, i.e.
  rprivate) gets a private copy of every mount under it at container start; the host's later
  unmount never reaches that copy, which keeps the FUSE connection, and so the volume's
  serving process, alive. So a hostPath that contains the kubelet's volume directories
  (`<kubelet>/pods`, `<kubelet>/plugins/kubernetes.io`) must use `Bidirectional` (the node
  plugin, which makes the mounts) or `HostToContainer`; every other hostPath must lie outside
  them. (NodeUnstageVolume also stops the serving process explicitly, see docs/csi.md.)
- **The mounter's shutdown fits the grace period.** On SIGTERM the mounter waits up to
  `--shutdown-timeout` for its serving processes to upload and exit; the pod's
  terminationGracePeriodSeconds must leave it that time plus room to exit.
- **The node plugin knows the kubelet directory** it may touch (`--kubelet-dir`), and it is the
  directory it mounts.
"""

from __future__ import annotations

import copy
from pathlib import PurePosixPath

import pytest

import checks
from conftest import INSTALL_SETS, rendered


def volume_dirs(kdir: str) -> list[PurePosixPath]:
    return [PurePosixPath(kdir) / "pods", PurePosixPath(kdir) / "plugins" / "kubernetes.io"]


def host_paths_cannot_pin_volumes(objs: list[dict]) -> list[str]:
    out = []
    kdir = checks.kubelet_dir(objs)
    for wl, _, spec in checks.workloads(objs):
        host = {v["name"]: v["hostPath"]["path"] for v in spec.get("volumes") or [] if "hostPath" in v}
        for _, c in checks.containers(spec):
            for m in c.get("volumeMounts") or []:
                if m["name"] not in host:
                    continue
                path = PurePosixPath(host[m["name"]])
                holds = [d for d in volume_dirs(kdir) if d == path or path in d.parents]
                inside = [d for d in volume_dirs(kdir) if d in path.parents]
                prop = m.get("mountPropagation", "None")
                if holds and prop not in ("Bidirectional", "HostToContainer"):
                    out.append(f"{wl}/{c['name']}: hostPath {path} holds volume mounts but "
                               f"propagation is {prop}: it would pin copies of them")
                if inside:
                    out.append(f"{wl}/{c['name']}: hostPath {path} lies inside {inside[0]}")
    return out


def by_name(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def pod(objs, name):
    return by_name(objs, "DaemonSet", name)["spec"]["template"]["spec"]


def arg(c: dict, flag: str) -> str | None:
    return next((a.split("=", 1)[1] for a in c.get("args") or [] if a.startswith(flag + "=")), None)


def s3vol_container(spec: dict) -> dict:
    return next(c for c in spec["containers"] if c["name"] == "s3vol")


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_host_paths_cannot_pin_volumes(name):
    assert host_paths_cannot_pin_volumes(rendered(name)) == []


def test_pinning_check_catches_a_private_kubelet_mount():
    objs = copy.deepcopy(rendered("kustomize:default"))
    spec = pod(objs, "s3vol-mounter")
    spec["volumes"].append({"name": "kubelet", "hostPath": {"path": "/var/lib/kubelet"}})
    s3vol_container(spec)["volumeMounts"].append({"name": "kubelet", "mountPath": "/k"})
    assert any("would pin" in v for v in host_paths_cannot_pin_volumes(objs))
    objs = copy.deepcopy(rendered("kustomize:default"))
    for m in s3vol_container(pod(objs, "s3vol-node"))["volumeMounts"]:
        m.pop("mountPropagation", None)
    assert any("would pin" in v for v in host_paths_cannot_pin_volumes(objs))


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_mounter_shutdown_fits_the_grace_period(name):
    spec = pod(rendered(name), "s3vol-mounter")
    timeout = arg(s3vol_container(spec), "--shutdown-timeout")
    assert timeout is not None, "the mounter's --shutdown-timeout is set explicitly"
    assert int(timeout) >= 60, "room to upload what the volumes hold"
    assert int(timeout) + 10 <= spec["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_node_plugin_exit_fits_the_grace_period(name):
    # s3vol-csi: 10 s for calls in progress (server::SHUTDOWN_GRACE), then up to 15 s until a
    # mounter holds the connections the plugin may hold the only copies of
    # (node::keeper::EXIT_WAIT); a kill before that ends those volumes.
    spec = pod(rendered(name), "s3vol-node")
    assert spec.get("terminationGracePeriodSeconds", 30) >= 10 + 15 + 5


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_node_plugin_is_told_its_kubelet_directory(name):
    objs = rendered(name)
    c = s3vol_container(pod(objs, "s3vol-node"))
    kdir = checks.kubelet_dir(objs)
    assert arg(c, "--kubelet-dir") == kdir
    assert any(m["mountPath"] == kdir and m.get("mountPropagation") == "Bidirectional"
               for m in c["volumeMounts"])
