"""Render the s3vol Helm chart offline with Helm's own template engine.

No helm binary can be installed here, so this uses `helm-sdkpy` (PyPI), which bundles the
Helm v4 Go library as a shared object. Its API offers install/upgrade (which need a
cluster) and lint, but no `template`. Lint renders every template with the chart's real
engine and values (checking values.schema.json too) without a cluster, so the chart is
rendered through lint:

1. copy the chart to a temporary directory and merge the extra values into values.yaml;
2. move the manifest templates out of templates/ into a plain directory (`_render/`),
   leaving the helpers (`_*.tpl`) in place;
3. add one template that renders each moved file with `tpl` in the normal context
   (with .Release.Name/.Release.Namespace set) and passes the result, base64-encoded, to
   `fail`. In lint mode Helm logs the message of `fail` instead of aborting; the log line
   goes to stderr, where this script picks it up.

Run as a separate process (the Go runtime writes to fd 2):
    python helm_render.py CHART VALUES_JSON NAMESPACE RELEASE > rendered.yaml
Exit status 0 on success; 1 with a message when lint reports an error or nothing was
rendered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

DUMP_TEMPLATE = r"""{{- $ctx := dict "Values" .Values "Chart" .Chart "Capabilities" .Capabilities "Template" .Template "Files" .Files "Release" (dict "Name" "%(release)s" "Namespace" "%(namespace)s" "Service" "Helm" "IsInstall" true "IsUpgrade" false "Revision" 1) }}
{{- $out := "" }}
{{- range $path, $_ := .Files.Glob "_render/*" }}
{{- $out = printf "%%s\n---\n# Source: %%s\n%%s" $out (base $path) (tpl ($.Files.Get $path) $ctx) }}
{{- end }}
{{- fail (printf "S3VOL-RENDER-BEGIN%%sS3VOL-RENDER-END" ($out | b64enc)) }}
"""

SEVERITY_ERROR = 3  # helm's support.ErrorSev; 2 is a warning


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def prepare(chart: Path, values: dict, namespace: str, release: str, workdir: Path) -> Path:
    dst = workdir / chart.name
    shutil.copytree(chart, dst)
    merged = deep_merge(yaml.safe_load((dst / "values.yaml").read_text()) or {}, values)
    (dst / "values.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    render = dst / "_render"
    render.mkdir()
    for tpl in sorted((dst / "templates").iterdir()):
        if tpl.suffix in (".yaml", ".yml"):
            tpl.rename(render / tpl.name)
    (dst / "templates" / "zz-render.yaml").write_text(
        DUMP_TEMPLATE % {"namespace": namespace, "release": release}
    )
    return dst


def lint(chart: Path) -> dict:
    import helm_sdkpy  # imported late: loading the Go runtime is the slow part

    cfg = helm_sdkpy.Configuration(namespace="default")
    return asyncio.run(helm_sdkpy.Lint(cfg).run(str(chart)))


def main() -> int:
    if len(sys.argv) == 2 and sys.argv[1] == "--lint-child":
        # Child mode: lint the prepared chart; stdout = lint result JSON.
        print(json.dumps(lint(Path(os.environ["S3VOL_RENDER_CHART"]))))
        return 0
    chart, values_json, namespace, release = sys.argv[1:5]
    values = json.loads(values_json)
    with tempfile.TemporaryDirectory(prefix="s3vol-helm-") as tmp:
        prepared = prepare(Path(chart).resolve(), values, namespace, release, Path(tmp))
        proc = subprocess.run(
            [sys.executable, __file__, "--lint-child"],
            env={**os.environ, "S3VOL_RENDER_CHART": str(prepared)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        print(f"helm lint failed to run (exit {proc.returncode})", file=sys.stderr)
        return 1
    result = json.loads(proc.stdout)
    errors = [m for m in result.get("Messages") or [] if m.get("Severity", 0) >= 2]
    if errors or result.get("Errors"):
        # helm-sdkpy serializes the Go error values as {}, so only the path is known.
        paths = ", ".join(sorted({m.get("Path", "?") for m in errors})) or "?"
        print(
            f"helm lint reported {len(errors)} error(s)/warning(s) in: {paths}. "
            "A template failed to render or values do not match values.schema.json.",
            file=sys.stderr,
        )
        return 1
    found = re.findall(r"S3VOL-RENDER-BEGIN([A-Za-z0-9+/=]*)S3VOL-RENDER-END", proc.stderr)
    if len(found) != 1:
        sys.stderr.write(proc.stderr[-4000:])
        print("rendered output not found in helm's log", file=sys.stderr)
        return 1
    sys.stdout.write(base64.b64decode(found[0]).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
