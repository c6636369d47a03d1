"""The service stands alone: it imports nothing from `models`, and its default install has no torch."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def test_no_service_module_imports_models() -> None:
    offenders = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "models" or n.startswith("models.")]
    assert offenders == []


def test_importing_every_service_module_loads_neither_models_nor_torch() -> None:
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "service").rglob("*.py")
                     if "migrations" not in p.parts and p.name != "__main__.py")
    code = ("import importlib, sys\n"
            f"for m in {[m.removesuffix('.__init__') for m in modules]!r}: importlib.import_module(m)\n"
            "print(sorted(n for n in sys.modules if n == 'models' or n.startswith('models.') or n == 'torch' or n.startswith('torch.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution the requirements pull in, following installed metadata (no extras)."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        requirement = todo.pop()
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(requirement.name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            child = Requirement(text)
            if child.marker is None or child.marker.evaluate({"extra": ""}):
                todo.append(child)
    return seen


def test_the_default_install_resolves_to_no_torch() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    default = _closure([Requirement(r) for r in project["dependencies"]])
    assert "onnxruntime" in default  # the service's inference engine is in the default install
    assert not {"torch", "tensorrt", "onnx"} & default
    assert "torch==2.13.0" in project["optional-dependencies"]["train"]  # the pinned CPU build
    assert {"torch", "onnx"} <= _closure([Requirement(r) for r in project["optional-dependencies"]["train"]])
