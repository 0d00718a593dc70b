"""The security properties of s3vol's manifests, as functions that list violations.

Each check takes a list of Kubernetes objects and returns human-readable violations
(empty when the property holds). The tests run them on every manifest set s3vol ships and
on deliberately broken copies, so a check that can no longer fail is noticed too.
"""

from __future__ import annotations

from collections.abc import Iterator

NODE_PLUGIN = ("DaemonSet", "s3vol-node", "s3vol")  # the one privileged container
WORKLOAD_KINDS = {"Pod", "Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job", "CronJob"}

# Host paths each s3vol pod may mount, relative to the kubelet directory where they
# start with "{kubelet}". Anything else is a violation.
ALLOWED_HOST_PATHS = {
    "s3vol-node": {"{kubelet}", "{kubelet}/plugins/csi.s3vol.io", "{kubelet}/plugins_registry",
                   "/dev/fuse", "/var/lib/s3vol/state"},
    "s3vol-mounter": {"{kubelet}/plugins/csi.s3vol.io/mounter", "/var/lib/s3vol/cache"},
}
# Containers that run as uid 0 (without privilege) and why.
ROOT_CONTAINERS = {
    ("s3vol-node", "node-driver-registrar"),  # writes into the root-owned plugins_registry
    ("s3vol-node", "liveness-probe"),  # connects to the root-owned driver socket
    ("s3vol-mounter", "prepare-dirs"),  # chowns the hostPath dirs to the mounter uid
}
# Capabilities a container may add, and why.
ADDED_CAPABILITIES = {("s3vol-mounter", "prepare-dirs"): {"CHOWN"}}
# ClusterRole rules s3vol may hold: (apiGroup, resource) -> allowed verbs.
ALLOWED_CLUSTER_RULES = {
    "s3vol-provisioner": {
        ("", "persistentvolumes"): {"get", "list", "watch", "create", "patch", "delete"},
        ("", "persistentvolumeclaims"): {"get", "list", "watch", "update"},
        ("storage.k8s.io", "storageclasses"): {"get", "list", "watch"},
        ("storage.k8s.io", "csinodes"): {"get", "list", "watch"},
        ("", "nodes"): {"get", "list", "watch"},
        # The resizer: pods in use, a finished resize in the claim's status.
        ("", "pods"): {"get", "list", "watch"},
        ("", "persistentvolumeclaims/status"): {"patch"},
        ("", "events"): {"list", "watch", "create", "update", "patch"},
        # No secrets: the namespaced Role s3vol-controller-secrets grants `get` in the
        # driver's namespace only.
    },
    "s3vol-cosi": {
        **{("objectstorage.k8s.io", r): {"get", "list", "watch", "update", "patch"}
           for r in ("buckets", "bucketaccesses", "bucketclaims")},
        **{("objectstorage.k8s.io", r + "/status"): {"get", "update", "patch"}
           for r in ("buckets", "bucketaccesses", "bucketclaims")},
        **{("objectstorage.k8s.io", r): {"get", "list", "watch"}
           for r in ("bucketclasses", "bucketaccessclasses")},
        ("", "secrets"): {"get", "create", "update", "delete"},
        ("", "events"): {"create", "patch"},
    },
}
ALLOWED_ROLE_RULES = {
    ("coordination.k8s.io", "leases"): {"get", "watch", "list", "create", "update", "patch", "delete"},
    ("", "secrets"): {"get"},
}
FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate"}


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind == "Pod":
        return obj.get("spec", {})
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind in WORKLOAD_KINDS:
        return obj["spec"]["template"]["spec"]
    return None


def containers(spec: dict) -> Iterator[tuple[str, dict]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or []:
            yield key, c


def workloads(objs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(workload label, object, pod spec) for every object that runs pods."""
    for o in objs:
        spec = pod_spec(o)
        if spec is not None:
            yield f"{o['kind']}/{o['metadata']['name']}", o, spec


def effective(spec: dict, c: dict, field: str):
    """A securityContext field, container-level overriding pod-level."""
    csc = c.get("securityContext") or {}
    if field in csc:
        return csc[field]
    return (spec.get("securityContext") or {}).get(field)


def kubelet_dir(objs: list[dict]) -> str:
    for _, o, spec in workloads(objs):
        if o["metadata"]["name"] == "s3vol-node":
            for v in spec.get("volumes", []):
                if v["name"] == "kubelet-dir":
                    return v["hostPath"]["path"]
    return "/var/lib/kubelet"


def only_node_plugin_privileged(objs: list[dict]) -> list[str]:
    out = []
    found = False
    for wl, o, spec in workloads(objs):
        for _, c in containers(spec):
            ident = (o["kind"], o["metadata"]["name"], c["name"])
            csc = c.get("securityContext") or {}
            if ident == NODE_PLUGIN:
                found = True
                if csc.get("privileged") is not True:
                    out.append(f"{wl}/{c['name']}: the node plugin must be privileged to mount")
                continue
            if csc.get("privileged"):
                out.append(f"{wl}/{c['name']}: privileged")
            if effective(spec, c, "allowPrivilegeEscalation") is not False:
                out.append(f"{wl}/{c['name']}: allowPrivilegeEscalation is not false")
            if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
                out.append(f"{wl}/{c['name']}: does not drop ALL capabilities")
            added = set((csc.get("capabilities") or {}).get("add") or [])
            allowed = ADDED_CAPABILITIES.get((o["metadata"]["name"], c["name"]), set())
            if added - allowed:
                out.append(f"{wl}/{c['name']}: adds capabilities {sorted(added - allowed)}")
    if not found and any(o["metadata"]["name"] == "s3vol-node" for _, o, _ in workloads(objs)):
        out.append("node plugin container not found")
    return out


def no_host_namespaces(objs: list[dict]) -> list[str]:
    return [f"{wl}: {f}" for wl, _, spec in workloads(objs)
            for f in ("hostNetwork", "hostPID", "hostIPC", "hostUsers") if spec.get(f) is True]


def host_paths_allowlisted(objs: list[dict]) -> list[str]:
    out = []
    kdir = kubelet_dir(objs)
    for wl, o, spec in workloads(objs):
        allowed = {p.replace("{kubelet}", kdir)
                   for p in ALLOWED_HOST_PATHS.get(o["metadata"]["name"], set())}
        for v in spec.get("volumes") or []:
            if "hostPath" in v and v["hostPath"]["path"] not in allowed:
                out.append(f"{wl}: hostPath {v['hostPath']['path']} not allowed")
    return out


def bidirectional_only_in_node_plugin(objs: list[dict]) -> list[str]:
    out = []
    for wl, o, spec in workloads(objs):
        for _, c in containers(spec):
            for m in c.get("volumeMounts") or []:
                if m.get("mountPropagation") == "Bidirectional" and \
                        (o["kind"], o["metadata"]["name"], c["name"]) != NODE_PLUGIN:
                    out.append(f"{wl}/{c['name']}: Bidirectional propagation on {m['mountPath']}")
    return out


def non_root(objs: list[dict]) -> list[str]:
    out = []
    for wl, o, spec in workloads(objs):
        for _, c in containers(spec):
            key = (o["metadata"]["name"], c["name"])
            if (o["kind"], *key) == NODE_PLUGIN or key in ROOT_CONTAINERS:
                continue
            uid = effective(spec, c, "runAsUser")
            if effective(spec, c, "runAsNonRoot") is not True or uid == 0:
                out.append(f"{wl}/{c['name']}: may run as root")
    return out


def read_only_root(objs: list[dict]) -> list[str]:
    return [f"{wl}/{c['name']}: writable root filesystem"
            for wl, _, spec in workloads(objs) for _, c in containers(spec)
            if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True]


def resources_set(objs: list[dict]) -> list[str]:
    out = []
    for wl, _, spec in workloads(objs):
        for _, c in containers(spec):
            r = c.get("resources") or {}
            missing = [f"requests.{k}" for k in ("cpu", "memory") if k not in (r.get("requests") or {})]
            missing += ["limits.memory"] if "memory" not in (r.get("limits") or {}) else []
            if missing:
                out.append(f"{wl}/{c['name']}: missing {', '.join(missing)}")
    return out


# The containers that call the Kubernetes API, per workload; every other container of s3vol
# (the s3vol containers above all, which hold S3 credentials) gets no token.
API_CLIENTS = {
    "s3vol-controller": {"csi-provisioner", "csi-resizer"},
    "s3vol-cosi": {"objectstorage-sidecar"},
    "s3vol-node": set(),
    "s3vol-mounter": set(),
}


def token_volumes(spec: dict) -> set[str]:
    """Names of the pod's volumes that carry a service-account token."""
    return {v["name"] for v in spec.get("volumes") or []
            if any("serviceAccountToken" in src for src in (v.get("projected") or {}).get("sources") or [])}


def api_access_only_where_needed(objs: list[dict]) -> list[str]:
    """No pod of s3vol mounts a token automatically; a projected token reaches only the
    sidecars that call the API."""
    out = []
    for wl, o, spec in workloads(objs):
        name = o["metadata"]["name"]
        if name not in API_CLIENTS:
            continue
        if spec.get("automountServiceAccountToken") is not False:
            out.append(f"{wl}: mounts a service account token into every container")
        tokens = token_volumes(spec)
        for _, c in containers(spec):
            mounted = {m["name"] for m in c.get("volumeMounts") or []} & tokens
            if mounted and c["name"] not in API_CLIENTS[name]:
                out.append(f"{wl}/{c['name']}: mounts the service account token {sorted(mounted)}")
    return out


def rbac_least_privilege(objs: list[dict]) -> list[str]:
    out = []
    for o in objs:
        if o["kind"] not in ("ClusterRole", "Role"):
            continue
        name = o["metadata"]["name"]
        allowed = ALLOWED_CLUSTER_RULES.get(name) if o["kind"] == "ClusterRole" else None
        if o["kind"] == "ClusterRole" and allowed is None:
            out.append(f"ClusterRole/{name}: unexpected ClusterRole")
            continue
        for rule in o.get("rules") or []:
            verbs = set(rule.get("verbs") or [])
            if verbs & FORBIDDEN_VERBS or rule.get("nonResourceURLs") or rule.get("resourceNames") == ["*"]:
                out.append(f"{o['kind']}/{name}: forbidden rule {rule}")
            for g in rule.get("apiGroups") or []:
                for r in rule.get("resources") or []:
                    if "*" in (g, r):
                        out.append(f"{o['kind']}/{name}: wildcard in {rule}")
                    elif o["kind"] == "Role":
                        if (g, r) not in ALLOWED_ROLE_RULES:
                            out.append(f"Role/{name}: unexpected access to {g}/{r}")
                        elif not verbs <= ALLOWED_ROLE_RULES[(g, r)]:
                            out.append(f"Role/{name}: {sorted(verbs - ALLOWED_ROLE_RULES[(g, r)])} on {g or 'core'}/{r}")
                    elif not verbs <= allowed.get((g, r), set()):
                        out.append(f"ClusterRole/{name}: {sorted(verbs - allowed.get((g, r), set()))} on {g or 'core'}/{r}")
    return out


PLACEHOLDER_PREFIXES = ("REPLACE_WITH_", "<")


def no_secrets(objs: list[dict], allow_placeholder_secrets: bool = False) -> list[str]:
    """No Secret objects (or, in examples, only placeholder values) and no literal
    credentials in container environments."""
    out = []
    for o in objs:
        if o.get("kind") == "Secret":
            if not allow_placeholder_secrets:
                out.append(f"Secret/{o['metadata']['name']}: secrets do not belong in manifests")
                continue
            if o.get("data"):
                out.append(f"Secret/{o['metadata']['name']}: base64 data instead of placeholders")
            for k, v in (o.get("stringData") or {}).items():
                if not str(v).startswith(PLACEHOLDER_PREFIXES):
                    out.append(f"Secret/{o['metadata']['name']}: {k} holds a value, not a placeholder")
    for wl, _, spec in workloads(objs):
        for _, c in containers(spec):
            for e in c.get("env") or []:
                name = e["name"].upper()
                if "value" in e and any(w in name for w in ("SECRET", "KEY", "TOKEN", "PASSWORD")):
                    out.append(f"{wl}/{c['name']}: literal value for {e['name']}")
    return out


# Volume types the Pod Security "restricted" profile admits.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def pod_security_restricted(objs: list[dict]) -> list[str]:
    """The Pod Security Standard "restricted" (what an ordinary workload passes)."""
    out = []
    for wl, _, spec in workloads(objs):
        out += [f"{wl}: {f}" for f in ("hostNetwork", "hostPID", "hostIPC") if spec.get(f)]
        for v in spec.get("volumes") or []:
            kinds = set(v) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                out.append(f"{wl}: volume {v['name']} of type {sorted(kinds)}")
        for _, c in containers(spec):
            csc = c.get("securityContext") or {}
            who = f"{wl}/{c['name']}"
            if csc.get("privileged"):
                out.append(f"{who}: privileged")
            if effective(spec, c, "allowPrivilegeEscalation") is not False:
                out.append(f"{who}: allowPrivilegeEscalation is not false")
            if effective(spec, c, "runAsNonRoot") is not True or effective(spec, c, "runAsUser") == 0:
                out.append(f"{who}: not runAsNonRoot")
            caps = csc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
                out.append(f"{who}: capabilities not restricted")
            seccomp = (csc.get("seccompProfile") or (spec.get("securityContext") or {}).get("seccompProfile") or {})
            if seccomp.get("type") not in ("RuntimeDefault", "Localhost"):
                out.append(f"{who}: no RuntimeDefault seccomp profile")
            if c.get("ports") and any(p.get("hostPort") for p in c["ports"]):
                out.append(f"{who}: hostPort")
            for m in c.get("volumeMounts") or []:
                if m.get("mountPropagation") not in (None, "None", "HostToContainer"):
                    out.append(f"{who}: mount propagation {m['mountPropagation']}")
    return out


INSTALL_CHECKS = [
    only_node_plugin_privileged,
    no_host_namespaces,
    host_paths_allowlisted,
    bidirectional_only_in_node_plugin,
    non_root,
    read_only_root,
    resources_set,
    api_access_only_where_needed,
    rbac_least_privilege,
    no_secrets,
]
