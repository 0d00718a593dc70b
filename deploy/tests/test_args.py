"""The manifests start s3vol with flags and environment variables that exist.

Every container running the s3vol image with a subcommand (`csi`, `mounter`, `cosi`) may
only pass flags that subcommand has, in `--flag=value` form, and only the S3VOL_* /
COSI_* variables it reads (any other variable, e.g. AWS_*, belongs to the AWS SDK). The
flags come from `s3vol <sub> --help` of a built binary when one is there
(target/{debug,release}/s3vol, or $S3VOL_BIN), else from the copy below, taken from
`s3vol <sub> --help` of 0.1.0.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

import pytest

from conftest import INSTALL_SETS, REPO, example_docs, rendered
import checks

GLOBAL_FLAGS = {"--log-level": True, "--log-format": True, "--help": False}
S3_FLAGS = {"--endpoint-url": True, "--region": True, "--force-path-style": False,
            "--profile": True, "--no-sign-request": False, "--full-checksums": False,
            "--max-attempts": True}
# flag -> takes a value
KNOWN_FLAGS = {
    "csi": {"--endpoint": True, "--node-id": True, "--mode": True, "--driver-name": True,
            "--state-dir": True, "--mounter-socket": True, "--s3-endpoint": True,
            "--s3-region": True, "--mount-timeout": True, "--metrics-addr": True},
    "mounter": {"--socket": True, "--cache-dir": True, "--ready-timeout": True,
                "--metrics-addr": True},
    "cosi": {"--endpoint": True, "--driver-name": True, "--iam-endpoint": True,
             "--secrets-dir": True, **S3_FLAGS},
    "mount": {"--read-only": False, "--uid": True, "--gid": True, "--file-mode": True,
              "--dir-mode": True, "--allow-other": False, "--metadata-ttl": True,
              "--cache-dir": True, "--cache-size": True, "--memory-limit": True,
              "--part-size": True, "--foreground": False, "-f": False, "-o": True,
              "--fuse-fd": True, "--credentials-fd": True, "--ready-fd": True,
              "--log-file": True, "--metrics-addr": True, **S3_FLAGS},
}
KNOWN_ENV = {
    "csi": {"S3VOL_S3_ENDPOINT", "S3VOL_S3_REGION"},
    "mounter": set(),
    "cosi": {"COSI_ENDPOINT", "S3VOL_COSI_DRIVER_NAME", "S3VOL_COSI_IAM_ENDPOINT",
             "S3VOL_COSI_SECRETS_DIR"},
    "mount": set(),
}
GLOBAL_ENV = {"S3VOL_LOG_LEVEL", "S3VOL_LOG_FORMAT"}
OURS = re.compile(r"^(S3VOL_|COSI_)")


def binary() -> Path | None:
    for p in (os.environ.get("S3VOL_BIN"), REPO / "target/debug/s3vol", REPO / "target/release/s3vol"):
        if p and Path(p).is_file() and os.access(p, os.X_OK):
            return Path(p)
    return None


@cache
def help_of(sub: str) -> str | None:
    b = binary()
    if b is None:
        return None
    proc = subprocess.run([str(b), sub, "--help"], capture_output=True, text=True, timeout=30)
    return proc.stdout if proc.returncode == 0 else None


@cache
def flags_of(sub: str) -> dict[str, bool]:
    text = help_of(sub)
    if text is None:
        return {**KNOWN_FLAGS[sub], **GLOBAL_FLAGS}
    out = {}
    for m in re.finditer(r"^\s+(?:(-\w), )?(--[a-z0-9-]+|-\w)( <[^>]+>)?", text, re.M):
        short, long, value = m.groups()
        out[long] = bool(value)
        if short:
            out[short] = bool(value)
    return out


@cache
def env_of(sub: str) -> set[str]:
    text = help_of(sub)
    if text is None:
        return KNOWN_ENV[sub] | GLOBAL_ENV
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", text))


def s3vol_containers(objs):
    for wl, _, spec in checks.workloads(objs):
        for _, c in checks.containers(spec):
            name = c["name"]
            image = c.get("image", "")
            args = c.get("args") or []
            if image.split(":")[0].endswith("/s3vol") and args and args[0] in KNOWN_FLAGS:
                yield f"{wl}/{name}", args[0], args[1:], c.get("env") or []


def arg_problems(objs) -> list[str]:
    out = []
    for where, sub, args, env in s3vol_containers(objs):
        known = flags_of(sub)
        for a in args:
            flag, eq, value = a.partition("=")
            if flag not in known:
                out.append(f"{where}: s3vol {sub} has no flag {flag}")
            elif known[flag] and not (eq and value):
                out.append(f"{where}: write {flag}=VALUE (one list item), not {a!r}")
            elif not known[flag] and eq:
                out.append(f"{where}: {flag} takes no value")
        for e in env:
            if OURS.match(e["name"]) and e["name"] not in env_of(sub):
                out.append(f"{where}: s3vol {sub} does not read {e['name']}")
    return out


def test_the_fallback_lists_match_the_binary():
    if binary() is None or any(help_of(s) is None for s in KNOWN_FLAGS):
        pytest.skip("no s3vol binary built")
    for sub in KNOWN_FLAGS:
        missing = set(KNOWN_FLAGS[sub]) - set(flags_of(sub))
        assert not missing, f"s3vol {sub} no longer has {sorted(missing)}"


@pytest.mark.parametrize("name", INSTALL_SETS)
def test_install_set_passes_existing_flags(name):
    assert list(s3vol_containers(rendered(name))), "no s3vol container found"
    assert arg_problems(rendered(name)) == []


def mount_command_problems(docs) -> list[str]:
    """`s3vol mount` inside a shell command (the sidecar example): flags as separate words."""
    out = []
    known = flags_of("mount")
    for wl, _, spec in checks.workloads(docs):
        for _, c in checks.containers(spec):
            name = c["name"]
            script = " ".join(c.get("command") or [])
            m = re.search(r"\bs3vol mount\b(.*)", script, re.S)
            if not m:
                continue
            words = shlex.split(m.group(1))
            positional = []
            i = 0
            while i < len(words):
                w = words[i]
                flag = w.partition("=")[0]
                if w.startswith("-"):
                    if flag not in known:
                        out.append(f"{wl}/{name}: s3vol mount has no flag {flag}")
                    elif known[flag] and "=" not in w:
                        i += 1
                else:
                    positional.append(w)
                i += 1
            if len(positional) != 2:
                out.append(f"{wl}/{name}: s3vol mount wants BUCKET[/PREFIX] MOUNTPOINT, got {positional}")
    return out


def test_examples_pass_existing_flags():
    docs = [d for _, d in example_docs()]
    assert arg_problems(docs) == []
    assert mount_command_problems(docs) == []
    assert any(True for _ in checks.workloads(docs))


def test_flag_check_catches_mistakes():
    objs = rendered("kustomize:overlays/cosi")
    assert arg_problems(objs) == []
    for bad_arg, env in [("--s3-endpoint=http://x", None), ("--mode", None),
                         ("--driver-name", None), ("--force-path-style=true", None),
                         (None, "S3VOL_S3_ENDPOINT")]:
        broken = copy.deepcopy(objs)
        dep = next(o for o in broken
                   if o["kind"] == "Deployment" and o["metadata"]["name"] == "s3vol-cosi")
        c = dep["spec"]["template"]["spec"]["containers"][0]
        if bad_arg:
            c["args"].append(bad_arg)
        if env:
            c.setdefault("env", []).append({"name": env, "value": "x"})
        assert arg_problems(broken) != [], (bad_arg, env)
    sidecar = [d for _, d in example_docs()]
    assert mount_command_problems(sidecar) == []
    broken = copy.deepcopy(sidecar)
    for wl, _, spec in checks.workloads(broken):
        for _, c in checks.containers(spec):
            if "s3vol mount" in " ".join(c.get("command") or []):
                c["command"][-1] = c["command"][-1].replace("--uid", "--owner")
    assert mount_command_problems(broken) != []


@pytest.mark.parametrize("name", [n for n in INSTALL_SETS if "cosi" in n or "full" in n])
def test_cosi_credentials_are_readable_by_the_driver(name):
    """The credentials Secret is written root-owned; a non-root driver reads it through
    fsGroup and a group-readable mode."""
    objs = rendered(name)
    dep = next(o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"] == "s3vol-cosi")
    spec = dep["spec"]["template"]["spec"]
    vol = next(v for v in spec["volumes"] if v["name"] == "cosi-credentials")["secret"]
    user = spec["securityContext"]["runAsUser"]
    assert user != 0
    assert spec["securityContext"].get("fsGroup") is not None
    assert vol["defaultMode"] & 0o040, "group cannot read the credentials"
    assert not vol["defaultMode"] & 0o007, "others can read the credentials"


def test_cosi_access_class_for_a_store_without_iam_grants_static():
    """An access call does not see the BucketClass, so the example BucketAccessClass names
    the same store; the driver defaults to `grant: iam`, which needs the AWS IAM API that
    MinIO and the other non-AWS stores lack."""
    docs = [d for _, d in example_docs()]
    stores = {(d.get("parameters") or {}).get("endpoint", "") for d in docs if d.get("kind") == "BucketClass"}
    classes = [d for d in docs if d.get("kind") == "BucketAccessClass"]
    assert classes
    for d in classes:
        p = d.get("parameters") or {}
        endpoint = p.get("endpoint", "")
        assert endpoint in stores, f"{d['metadata']['name']}: store {endpoint or 'default'} is no BucketClass's"
        if endpoint and "amazonaws.com" not in endpoint:
            assert p.get("grant") == "static", f"{d['metadata']['name']}: grant {p.get('grant', 'iam (default)')}"
