"""The Helm chart lints, renders (with and without GPU workers) to valid objects, and renders the
same service as the kustomize manifests: same container settings, probes, security and secrets."""

from __future__ import annotations

import pytest
import yaml

from deploy_checks import DEPLOY, RULES, by_kind, crd_schemas, kustomize, require_tool, run, unknown_settings, validate_object

pytestmark = pytest.mark.integration

CHART = DEPLOY / "helm" / "strokegate"


def helm() -> str:
    return require_tool("helm", "`bash deploy/kube-tools.sh` installs it on x86_64")


def template(*values: str) -> list[dict]:
    command = [helm(), "template", "strokegate", str(CHART), "--namespace", "strokegate"]
    for value in values:
        command += ["--set", value]
    result = run(command)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_chart_lints_clean() -> None:
    result = run([helm(), "lint", "--strict", str(CHART)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", [(), ("workers.enabled=true",)], ids=["embedded", "workers"])
def test_every_rendered_object_is_valid(values: tuple[str, ...]) -> None:
    objects = template(*values)
    crds = crd_schemas()
    for obj in objects:
        validate_object(obj, crds)
    deployments = by_kind(objects, "Deployment")
    assert ("strokegate-worker" in deployments) == bool(values)
    rule = by_kind(objects, "PrometheusRule")["strokegate"]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert unknown_settings(by_kind(objects, "ConfigMap")["strokegate-config"]["data"]) == []
    for name, deployment in deployments.items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert unknown_settings(e["name"] for e in container.get("env", [])) == [], name
    monitor = by_kind(objects, "ServiceMonitor")["strokegate"]["spec"]["endpoints"][0]
    assert monitor["authorization"]["credentials"] == {"name": "strokegate-metrics-token", "key": "token"}


def test_workers_get_a_gpu_each_and_shared_volumes() -> None:
    objects = template("workers.enabled=true", "workers.replicas=3")
    worker = by_kind(objects, "Deployment")["strokegate-worker"]
    assert worker["spec"]["replicas"] == 3
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["worker"] and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {c["spec"]["accessModes"][0] for c in by_kind(objects, "PersistentVolumeClaim").values()} == {"ReadWriteMany"}
    assert by_kind(objects, "ConfigMap")["strokegate-config"]["data"]["STROKEGATE_JOB_QUEUE"] == "celery"


def test_the_chart_renders_the_same_ingest_as_kustomize() -> None:
    kustomized = by_kind(kustomize("ingest"), "Deployment")["strokegate-ingest"]["spec"]["template"]["spec"]
    charted = by_kind(template(), "Deployment")["strokegate-ingest"]["spec"]["template"]["spec"]
    a, b = kustomized["containers"][0], charted["containers"][0]
    for key in ("args", "ports", "startupProbe", "livenessProbe", "readinessProbe", "securityContext", "volumeMounts", "resources"):
        assert a[key] == b[key], key
    assert [e["name"] for e in a["env"]] == [e["name"] for e in b["env"]]
    assert kustomized["securityContext"] == charted["securityContext"]
    assert [v["name"] for v in kustomized["volumes"]] == [v["name"] for v in charted["volumes"]]
    kustomize_config = next(iter(by_kind(kustomize("ingest"), "ConfigMap").values()))["data"]
    assert kustomize_config == by_kind(template(), "ConfigMap")["strokegate-config"]["data"]
    for name in ("strokegate", "strokegate-dicom"):
        a, b = by_kind(kustomize("ingest"), "Service")[name]["spec"], by_kind(template(), "Service")[name]["spec"]
        assert (a.get("type"), a["ports"]) == (b.get("type"), b["ports"]), name
