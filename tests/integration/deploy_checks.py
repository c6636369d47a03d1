"""What the deployment tests share: where deploy/ is, finding the tools that check it (installed by
`deploy/setup.sh --test`: promtool and prometheus from Debian, kubectl and helm into .venv/bin,
hadolint from PyPI), and loading the vendored schemas."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
SCHEMAS = DEPLOY / "schemas"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes release the manifests must work on
RULES = DEPLOY / "prometheus" / "rules" / "strokegate.rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "strokegate.json"


def find_tool(name: str) -> str | None:
    """``name`` from the virtual environment's bin folder (where setup.sh puts kubectl, helm and
    hadolint) or else from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def require_tool(name: str, install: str) -> str:
    """The tool's path, or skip the test saying how to install it."""
    path = find_tool(name)
    if path is None:
        pytest.skip(f"{name} not installed ({install}; `bash deploy/setup.sh --test` does it)")
    return path


def run(command: list[str], timeout: float = 60, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    """Run a checker; its output is in the assertion message when it fails."""
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema made strict the way `kubectl apply --validate=strict` is: an object
    with listed properties refuses unknown ones, unless it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict JSON schema, from the vendored Prometheus Operator CRDs."""
    schemas = {}
    for path in sorted((SCHEMAS / "prometheus-operator").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


def validate_object(obj: dict, crds: dict[tuple[str, str], dict]) -> None:
    """Raise if ``obj`` is not a valid object of its kind: built-in kinds against the Kubernetes
    schemas (strict), the Prometheus Operator's kinds against ``crds`` (from crd_schemas())."""
    key = (obj["apiVersion"], obj["kind"])
    if key in crds:
        # Not checked as a schema first: the CRDs' patterns are Go regular expressions, a few of
        # which Python's re cannot compile (they are used only when their field is present).
        jsonschema.Draft7Validator(crds[key]).validate(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def by_kind(objects: list[dict], kind: str) -> dict[str, dict]:
    """The objects of one kind, by name."""
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def kustomize(overlay: str) -> list[dict]:
    """`kubectl kustomize` (or a standalone `kustomize build`) of an overlay, as objects."""
    folder = str(DEPLOY / "kubernetes" / "overlays" / overlay)
    kubectl, standalone = find_tool("kubectl"), find_tool("kustomize")
    if kubectl:
        command = [kubectl, "kustomize", folder]
    elif standalone:
        command = [standalone, "build", folder]
    else:
        pytest.skip("neither kubectl nor kustomize installed (`bash deploy/setup.sh --test` installs kubectl on x86_64)")
    result = run(command)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def unknown_settings(names: Any) -> list[str]:
    """The STROKEGATE_* variable names among ``names`` that are no setting of the service (a typo
    or an old name would be ignored by it, silently); ``..._FILE`` names a file with the value
    (docker-entrypoint.sh), ``A__B`` a nested field."""
    from service.config import Settings

    known = set(Settings.model_fields)
    unknown = []
    for name in names:
        if not name.startswith("STROKEGATE_"):
            continue
        field = name.removeprefix("STROKEGATE_").removesuffix("__FILE").split("__")[0].lower()
        if field not in known:
            unknown.append(name)
    return sorted(unknown)
