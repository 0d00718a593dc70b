"""Every manifest validates against the Kubernetes OpenAPI schemas (offline, via the
pinned `kubernetes-validate`), lints clean, and the chart matches the plain manifests."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import (CHART, DEPLOY, EXAMPLES, HELM_VALUES, INSTALL_SETS, REPO, example_docs,
                      helm_render, helm_render_raw, rendered)

# The oldest Kubernetes s3vol supports (Chart.yaml kubeVersion; native sidecars in the
# sidecar example) and the newest kubernetes-validate knows.
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
COSI_GROUP = "objectstorage.k8s.io/v1alpha1"


def k8s_validate(doc: dict) -> list[str]:
    errors = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{version}: {e.message} at {'/'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{version}: no schema for {doc.get('apiVersion')} {doc.get('kind')}")
    return errors


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_install_set_validates(name):
    docs = rendered(name)
    assert docs, "nothing rendered"
    errors = {f"{d['kind']}/{d['metadata']['name']}": e for d in docs if (e := k8s_validate(d))}
    assert errors == {}


def core_examples():
    return [(p, d) for p, d in example_docs() if d.get("apiVersion") != COSI_GROUP]


@pytest.mark.parametrize("path,doc", core_examples(),
                         ids=lambda x: getattr(x, "name", None) or f"{x['kind']}/{x['metadata']['name']}")
def test_example_validates(path, doc):
    assert k8s_validate(doc) == []


# COSI objects are custom resources: the core OpenAPI schemas do not know them. These
# structural schemas follow the objectstorage.k8s.io/v1alpha1 CRDs (COSI v0.2) for the
# fields s3vol's examples use: required fields, enums and no unknown fields.
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "minLength": 1},
                                                                  "namespace": {"type": "string"}}}
_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
_PROTOCOL = {"enum": ["S3", "Azure", "GCP"]}


def _top(kind, props, required, namespaced=False):
    meta = dict(_META, required=["name", "namespace"] if namespaced else ["name"])
    return {"type": "object", "additionalProperties": False,
            "required": ["apiVersion", "kind", "metadata", *required],
            "properties": {"apiVersion": {"const": COSI_GROUP}, "kind": {"const": kind},
                           "metadata": meta, **props}}


COSI_SCHEMAS = {
    "BucketClass": _top("BucketClass", {
        "driverName": {"type": "string", "minLength": 1},
        "deletionPolicy": {"enum": ["Retain", "Delete"]},
        "parameters": _PARAMS}, ["driverName", "deletionPolicy"]),
    "BucketAccessClass": _top("BucketAccessClass", {
        "driverName": {"type": "string", "minLength": 1},
        "authenticationType": {"enum": ["Key", "IAM"]},
        "parameters": _PARAMS}, ["driverName", "authenticationType"]),
    "BucketClaim": _top("BucketClaim", {"spec": {
        "type": "object", "additionalProperties": False, "required": ["protocols"],
        "properties": {"bucketClassName": {"type": "string"}, "existingBucketName": {"type": "string"},
                       "protocols": {"type": "array", "minItems": 1, "items": _PROTOCOL}}}},
        ["spec"], namespaced=True),
    "BucketAccess": _top("BucketAccess", {"spec": {
        "type": "object", "additionalProperties": False,
        "required": ["bucketAccessClassName", "credentialsSecretName"],
        "properties": {"bucketClaimName": {"type": "string"}, "bucketAccessClassName": {"type": "string"},
                       "credentialsSecretName": {"type": "string"}, "protocol": _PROTOCOL,
                       "serviceAccountName": {"type": "string"}}}}, ["spec"], namespaced=True),
}


def cosi_examples():
    return [(p, d) for p, d in example_docs() if d.get("apiVersion") == COSI_GROUP]


def test_cosi_examples_cover_every_kind():
    assert sorted({d["kind"] for _, d in cosi_examples()}) == sorted(COSI_SCHEMAS)


@pytest.mark.parametrize("path,doc", cosi_examples(), ids=lambda x: getattr(x, "name", None) or x["kind"])
def test_cosi_example_structure(path, doc):
    errors = [e.message for e in jsonschema.Draft7Validator(COSI_SCHEMAS[doc["kind"]]).iter_errors(doc)]
    assert errors == []
    if doc["kind"] in ("BucketClass", "BucketAccessClass"):
        assert doc["driverName"] == "cosi.s3vol.io"


def test_cosi_examples_refer_to_each_other():
    by = {(d["kind"], d["metadata"]["name"]) for _, d in cosi_examples()}
    for _, d in cosi_examples():
        spec = d.get("spec", {})
        if "bucketClassName" in spec:
            assert ("BucketClass", spec["bucketClassName"]) in by
        if "bucketClaimName" in spec:
            assert ("BucketClaim", spec["bucketClaimName"]) in by
        if "bucketAccessClassName" in spec:
            assert ("BucketAccessClass", spec["bucketAccessClassName"]) in by


# StorageClass examples carry what each store needs ------------------------------------

STORES = {
    "storageclass-aws-s3.yaml": {"region": "us-east-1"},
    "storageclass-minio.yaml": {"forcePathStyle": "true"},
    "storageclass-ceph-rgw.yaml": {"forcePathStyle": "true"},
    "storageclass-tencent-cos.yaml": {"endpoint": re.compile(r"^https://cos\.[a-z0-9-]+\.myqcloud\.com$"),
                                      "region": "ap-guangzhou", "forcePathStyle": "false",
                                      "bucket": re.compile(r"-\d{10}$")},
    "storageclass-alibaba-oss.yaml": {"endpoint": re.compile(r"^https://oss-[a-z0-9-]+\.aliyuncs\.com$"),
                                      "region": "cn-hangzhou", "forcePathStyle": "false"},
    "storageclass-huawei-obs.yaml": {"endpoint": re.compile(r"^https://obs\.[a-z0-9-]+\.myhuaweicloud\.com$"),
                                     "region": "cn-north-4", "forcePathStyle": "false"},
    "storageclass-bucket-per-volume.yaml": {"mode": "bucket"},
    "storageclass-prefix-per-volume.yaml": {"mode": "prefix"},
}
SC_PARAMS = {"mode", "bucket", "bucketPrefix", "endpoint", "region", "forcePathStyle", "failover",
             *(f"csi.storage.k8s.io/{k}-secret-{f}" for k in ("provisioner", "controller-expand", "node-stage")
               for f in ("name", "namespace"))}


@pytest.mark.parametrize("filename", sorted(STORES))
def test_storageclass_example(filename):
    sc = yaml.safe_load((EXAMPLES / filename).read_text())
    p = sc["parameters"]
    assert sc["provisioner"] == "csi.s3vol.io"
    assert set(p) <= SC_PARAMS, f"unknown parameters {set(p) - SC_PARAMS}"
    assert p["mode"] in ("bucket", "prefix") and (p["mode"] == "bucket" or p.get("bucket"))
    assert all(isinstance(v, str) for v in p.values()), "parameters must be strings"
    for key, want in STORES[filename].items():
        got = p.get(key, "")
        assert (want.search(got) if hasattr(want, "search") else got == want), f"{key}={got!r}"
    # The same Secret for creating, resizing and mounting; the controller's sidecars may read
    # Secrets only in the driver's namespace.
    assert p["csi.storage.k8s.io/provisioner-secret-name"] == p["csi.storage.k8s.io/node-stage-secret-name"]
    assert p["csi.storage.k8s.io/controller-expand-secret-name"] == p["csi.storage.k8s.io/provisioner-secret-name"]
    assert p["csi.storage.k8s.io/provisioner-secret-namespace"] == "s3vol"
    assert p["csi.storage.k8s.io/controller-expand-secret-namespace"] == "s3vol"
    # Resizing a claim completes (ControllerExpandVolume records the size).
    assert sc["allowVolumeExpansion"] is True


# yamllint ------------------------------------------------------------------------------

def test_yamllint():
    targets = [DEPLOY / "kubernetes", EXAMPLES, CHART / "values.yaml", CHART / "Chart.yaml", CHART / "ci"]
    proc = subprocess.run(
        [sys.executable, "-m", "yamllint", "--strict", "-c", str(DEPLOY / ".yamllint.yaml"),
         *map(str, targets)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Helm chart ----------------------------------------------------------------------------

def chart_values(extra=None):
    from helm_render import deep_merge
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return deep_merge(values, extra or {})


def schema_errors(values):
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return [f"{'/'.join(map(str, e.path))}: {e.message}"
            for e in jsonschema.Draft7Validator(schema).iter_errors(values)]


@pytest.mark.parametrize("name", list(HELM_VALUES))
def test_values_match_schema(name):
    extra = yaml.safe_load(HELM_VALUES[name].read_text()) if HELM_VALUES[name] else {}
    assert schema_errors(chart_values(extra)) == []


@pytest.mark.parametrize("bad", [
    {"cosi": {"enabled": "yes"}},
    {"mounter": {"runAsUser": 0}},
    {"logLevel": "verbose"},
    {"controller": {"replica": 2}},
    {"storageClasses": [{"name": "x", "mode": "prefix"}]},
    {"storageClasses": [{"name": "x", "mode": "bucket", "bucketPrefix": "Team_A"}]},
    {"sidecars": {"provisioner": {"image": {"tag": "latest"}}}},
    {"node": {"resources": {"requests": {"cpu": "ten"}}}},
], ids=str)
def test_schema_rejects(bad):
    assert schema_errors(chart_values(bad)) != []


VALUE_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def test_template_value_references_exist():
    """Every `.Values.a.b` a template reads is defined in values.yaml."""
    values = chart_values()
    missing = set()
    for tpl in (CHART / "templates").iterdir():
        for ref in VALUE_REF.findall(tpl.read_text()):
            node = values
            for part in ref.strip(".").split("."):
                if not isinstance(node, dict) or part not in node:
                    missing.add(f"{tpl.name}: .Values{ref}")
                    break
                node = node[part]
    assert missing == set()


def test_render_fails_on_a_broken_template(tmp_path):
    import shutil
    helm_render("helm:default")  # skips where Helm's engine is not available
    chart = tmp_path / "s3vol"
    shutil.copytree(CHART, chart)
    node = chart / "templates" / "node.yaml"
    text = node.read_text()
    assert "{{ $n.maxUnavailable }}" in text
    node.write_text(text.replace("{{ $n.maxUnavailable }}", "{{ $n.maxUnavailable.nope }}"))
    assert helm_render_raw(chart, {}).returncode != 0


def test_render_fails_on_values_outside_the_schema():
    helm_render("helm:default")
    assert helm_render_raw(CHART, {"cosi": {"enabled": "yes"}}).returncode != 0


def normalize(objs):
    """The parts of the objects that must agree between chart and plain manifests."""
    out = {}
    for o in objs:
        if o["kind"] == "Namespace":
            continue  # the chart installs into the release namespace instead
        o = json.loads(json.dumps(o))
        o["metadata"].pop("labels", None)
        o["metadata"].pop("annotations", None)
        if o["kind"] in ("Deployment", "DaemonSet"):
            o["spec"]["template"]["metadata"].pop("labels", None)
        out[(o["kind"], o["metadata"]["name"])] = o
    return out


@pytest.mark.parametrize("kustomize,helm", [("kustomize:default", "helm:default"),
                                            ("kustomize:overlays/cosi", "helm:ci/cosi-values")])
def test_chart_matches_plain_manifests(kustomize, helm):
    k, h = normalize(rendered(kustomize)), normalize(rendered(helm))
    assert sorted(k) == sorted(h)
    for key in k:
        assert k[key] == h[key], f"{key} differs between {kustomize} and {helm}"
