"""Security properties of every manifest set s3vol ships (docs/privileges.md states
them for people; these tests hold the manifests to them)."""

from __future__ import annotations

import copy

import pytest

import checks
from conftest import INSTALL_SETS, example_docs, rendered

SIDECAR_EXAMPLE = "sidecar-mount.yaml"


@pytest.mark.parametrize("check", checks.INSTALL_CHECKS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("name", INSTALL_SETS)
def test_install_property(name, check):
    assert check(rendered(name)) == []


def by_name(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_csidriver_object(name):
    spec = by_name(rendered(name), "CSIDriver", "csi.s3vol.io")["spec"]
    assert spec["attachRequired"] is False
    # File + VOLUME_MOUNT_GROUP: kubelet delegates fsGroup to the driver.
    assert spec["fsGroupPolicy"] == "File"
    # Pod names in log lines about a pod's own identity (docs/identity.md).
    assert spec["podInfoOnMount"] is True
    assert spec["volumeLifecycleModes"] == ["Persistent"]
    # Rotated Secrets and refreshed tokens reach running mounts (docs/identity.md).
    assert spec["requiresRepublish"] is True
    assert spec["tokenRequests"] == [
        {"audience": "sts.amazonaws.com", "expirationSeconds": 3600}
    ]


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_daemonsets_survive_and_schedule_everywhere(name):
    objs = rendered(name)
    mounter = by_name(objs, "DaemonSet", "s3vol-mounter")
    node = by_name(objs, "DaemonSet", "s3vol-node")
    # Replacing a mounter pod stalls the failover volumes it serves: one node at a time.
    assert mounter["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert node["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    for ds in (mounter, node):
        spec = ds["spec"]["template"]["spec"]
        assert spec["priorityClassName"] == "system-node-critical"
        assert {"operator": "Exists"} in spec["tolerations"]
    # No liveness probe on the mounter: a restart cannot repair its mounts.
    for c in mounter["spec"]["template"]["spec"]["containers"]:
        assert "livenessProbe" not in c
    assert by_name(objs, "Deployment", "s3vol-controller")["spec"]["template"]["spec"][
        "priorityClassName"] == "system-cluster-critical"


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_node_plugin_and_mounter_share_the_socket(name):
    objs = rendered(name)
    kdir = checks.kubelet_dir(objs)
    sock = f"{kdir}/plugins/csi.s3vol.io/mounter/mounter.sock"
    node = by_name(objs, "DaemonSet", "s3vol-node")["spec"]["template"]["spec"]
    mounter = by_name(objs, "DaemonSet", "s3vol-mounter")["spec"]["template"]["spec"]
    plugin = next(c for c in node["containers"] if c["name"] == "s3vol")
    serve = next(c for c in mounter["containers"] if c["name"] == "s3vol")
    assert f"--mounter-socket={sock}" in plugin["args"]
    assert f"--socket={sock}" in serve["args"]
    # The node plugin reaches the socket through its Bidirectional kubelet-dir mount.
    assert {"name": "kubelet-dir", "mountPath": kdir, "mountPropagation": "Bidirectional"} \
        in plugin["volumeMounts"]


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_controller_resizes_and_only_its_sidecars_get_a_token(name):
    objs = rendered(name)
    spec = by_name(objs, "Deployment", "s3vol-controller")["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["s3vol", "csi-provisioner", "csi-resizer"]
    resizer = spec["containers"][2]
    assert "--csi-address=/csi/csi.sock" in resizer["args"]
    assert spec["automountServiceAccountToken"] is False
    tokens = checks.token_volumes(spec)
    assert tokens == {"kube-api-access"}
    for c in spec["containers"]:
        mounts = {m["name"] for m in c.get("volumeMounts") or []}
        assert (c["name"] != "s3vol") == bool(mounts & tokens), c["name"]
    # Secrets: `get`, in a namespace, never cluster-wide.
    cluster = by_name(objs, "ClusterRole", "s3vol-provisioner")
    assert not any("secrets" in r.get("resources", []) for r in cluster["rules"])
    role = by_name(objs, "Role", "s3vol-controller-secrets")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_images_pinned(name):
    for wl, _, spec in checks.workloads(rendered(name)):
        for _, c in checks.containers(spec):
            image = c["image"]
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            assert tag and tag != "latest", f"{wl}/{c['name']}: image {image} has no fixed tag"


def test_cosi_is_optional_and_unprivileged():
    for name in ("kustomize:default", "helm:default"):
        assert not any(o["metadata"]["name"] == "s3vol-cosi" for o in rendered(name))
    for name in ("kustomize:overlays/cosi", "helm:ci/cosi-values"):
        objs = rendered(name)
        dep = by_name(objs, "Deployment", "s3vol-cosi")["spec"]["template"]["spec"]
        names = [c["name"] for c in dep["containers"]]
        assert names == ["s3vol", "objectstorage-sidecar"]
        sidecar = dep["containers"][1]
        assert sidecar["image"].split(":")[-1].startswith("v0.2.")
        assert "--driver-addr=unix:///var/lib/cosi/cosi.sock" in sidecar["args"]
        assert "--endpoint=unix:///var/lib/cosi/cosi.sock" in dep["containers"][0]["args"]
        assert {"name": "cosi-socket", "emptyDir": {}} in dep["volumes"]
        # Only the sidecar gets the token.
        assert dep["automountServiceAccountToken"] is False
        assert checks.api_access_only_where_needed(objs) == []
        broken = copy.deepcopy(objs)
        spec = by_name(broken, "Deployment", "s3vol-cosi")["spec"]["template"]["spec"]
        spec["containers"][0]["volumeMounts"].append(
            {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})
        assert checks.api_access_only_where_needed(broken) != []
        assert checks.pod_security_restricted([by_name(objs, "Deployment", "s3vol-cosi")]) == []


# Examples ------------------------------------------------------------------------------

def workload_examples():
    return [(p, d) for p, d in example_docs()
            if d["kind"] in checks.WORKLOAD_KINDS and p.name != SIDECAR_EXAMPLE]


def test_examples_include_workloads():
    assert len(workload_examples()) >= 2


@pytest.mark.parametrize("path,doc", workload_examples(),
                         ids=lambda x: getattr(x, "name", None) or x["metadata"]["name"])
def test_workload_example_requests_no_privileges(path, doc):
    """An application using s3vol volumes passes Pod Security "restricted"."""
    assert checks.pod_security_restricted([doc]) == []


def test_example_secrets_are_placeholders():
    assert checks.no_secrets([d for _, d in example_docs()], allow_placeholder_secrets=True) == []


def test_sidecar_example_spells_out_its_privilege():
    docs = [d for p, d in example_docs() if p.name == SIDECAR_EXAMPLE]
    pod = next(d for d in docs if d["kind"] == "Pod")
    assert "s3vol.io/privileged-sidecar" in pod["metadata"]["annotations"]
    violations = checks.pod_security_restricted([pod])
    # Exactly the sidecar is privileged; the application container is not.
    assert violations and all("/s3vol-mount:" in v for v in violations)
    text = next(p for p, _ in example_docs() if p.name == SIDECAR_EXAMPLE).read_text()
    assert "PRIVILEGED" in text and "docs/privileges.md" in text


# The checks themselves fail on broken manifests ------------------------------------------

def mutate(objs, kind, name, fn):
    objs = copy.deepcopy(objs)
    fn(checks.pod_spec(by_name(objs, kind, name)) if checks.pod_spec(by_name(objs, kind, name)) is not None
       else by_name(objs, kind, name))
    return objs


def first(spec, name="s3vol"):
    return next(c for c in spec["containers"] if c["name"] == name)


MUTATIONS = {
    "privileged mounter": (checks.only_node_plugin_privileged, "DaemonSet", "s3vol-mounter",
                           lambda s: first(s)["securityContext"].update(privileged=True)),
    "unprivileged node plugin": (checks.only_node_plugin_privileged, "DaemonSet", "s3vol-node",
                                 lambda s: first(s)["securityContext"].pop("privileged")),
    "escalation in controller": (checks.only_node_plugin_privileged, "Deployment", "s3vol-controller",
                                 lambda s: first(s)["securityContext"].pop("allowPrivilegeEscalation")),
    "SYS_ADMIN for registrar": (checks.only_node_plugin_privileged, "DaemonSet", "s3vol-node",
                                lambda s: first(s, "node-driver-registrar")["securityContext"]["capabilities"]
                                .update(add=["SYS_ADMIN"])),
    "hostNetwork": (checks.no_host_namespaces, "DaemonSet", "s3vol-mounter",
                    lambda s: s.update(hostNetwork=True)),
    "host root": (checks.host_paths_allowlisted, "DaemonSet", "s3vol-mounter",
                  lambda s: s["volumes"].append({"name": "root", "hostPath": {"path": "/"}})),
    "hostPath in controller": (checks.host_paths_allowlisted, "Deployment", "s3vol-controller",
                               lambda s: s["volumes"].append({"name": "x", "hostPath": {"path": "/var/lib/s3vol/state"}})),
    "Bidirectional in mounter": (checks.bidirectional_only_in_node_plugin, "DaemonSet", "s3vol-mounter",
                                 lambda s: first(s)["volumeMounts"][0].update(mountPropagation="Bidirectional")),
    "root mounter": (checks.non_root, "DaemonSet", "s3vol-mounter",
                     lambda s: s["securityContext"].update(runAsUser=0)),
    "writable root fs": (checks.read_only_root, "Deployment", "s3vol-controller",
                         lambda s: first(s, "csi-provisioner")["securityContext"].pop("readOnlyRootFilesystem")),
    "no memory limit": (checks.resources_set, "DaemonSet", "s3vol-mounter",
                        lambda s: first(s)["resources"]["limits"].pop("memory")),
    "token in mounter": (checks.api_access_only_where_needed, "DaemonSet", "s3vol-mounter",
                         lambda s: s.pop("automountServiceAccountToken")),
    "pod-wide token in controller": (checks.api_access_only_where_needed, "Deployment", "s3vol-controller",
                                     lambda s: s.pop("automountServiceAccountToken")),
    "token in controller's s3vol": (checks.api_access_only_where_needed, "Deployment", "s3vol-controller",
                                    lambda s: first(s)["volumeMounts"].append(
                                        {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount"})),
    "get secrets cluster-wide": (checks.rbac_least_privilege, "ClusterRole", "s3vol-provisioner",
                                 lambda r: r["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]})),
    "list secrets in namespace": (checks.rbac_least_privilege, "Role", "s3vol-controller-secrets",
                                  lambda r: r["rules"][0]["verbs"].append("list")),
    "list secrets": (checks.rbac_least_privilege, "ClusterRole", "s3vol-provisioner",
                     lambda r: r["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]})),
    "wildcard": (checks.rbac_least_privilege, "ClusterRole", "s3vol-provisioner",
                 lambda r: r["rules"].append({"apiGroups": ["*"], "resources": ["*"], "verbs": ["get"]})),
    "literal key": (checks.no_secrets, "Deployment", "s3vol-controller",
                    lambda s: first(s)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"})),
}


@pytest.mark.parametrize("label", list(MUTATIONS))
def test_check_catches(label):
    check, kind, name, fn = MUTATIONS[label]
    base = rendered("kustomize:default")
    assert check(base) == []
    assert check(mutate(base, kind, name, fn)) != [], f"{check.__name__} missed: {label}"


def test_secret_object_caught():
    objs = rendered("kustomize:default") + [{"apiVersion": "v1", "kind": "Secret",
                                              "metadata": {"name": "x"}, "stringData": {"k": "v"}}]
    assert checks.no_secrets(objs)
    assert checks.no_secrets(objs, allow_placeholder_secrets=True)


def test_restricted_check_catches_hostpath_and_root():
    pod = copy.deepcopy(next(d for _, d in workload_examples() if d["kind"] == "Pod"))
    pod["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/etc"}})
    pod["spec"]["securityContext"]["runAsUser"] = 0
    assert len(checks.pod_security_restricted([pod])) >= 2
