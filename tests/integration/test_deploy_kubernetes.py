"""The Kubernetes manifests render with `kubectl kustomize` and every object is valid offline:
built-in kinds against the Kubernetes JSON schemas (kubernetes-validate, strict), the Prometheus
Operator's ServiceMonitor and PrometheusRule against their CRDs' schemas (vendored)."""

from __future__ import annotations

import copy
import runpy

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_checks import DEPLOY, by_kind, crd_schemas, kustomize, unknown_settings
from deploy_checks import validate_object as validate

pytestmark = pytest.mark.integration

KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ("ingest", "workers")
EXTERNAL_SECRETS = {"strokegate-database", "strokegate-tls", "strokegate-broker"}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict]]:
    return request.param, kustomize(request.param)


def test_every_rendered_object_is_valid(rendered: tuple[str, list[dict]]) -> None:
    _, objects = rendered
    crds = crd_schemas()
    kinds = sorted(o["kind"] for o in objects)
    for kind in ("ConfigMap", "Deployment", "PersistentVolumeClaim", "PrometheusRule", "Service", "ServiceMonitor"):
        assert kind in kinds
    for obj in objects:
        validate(obj, crds)
        assert obj["metadata"].get("namespace", "strokegate") == "strokegate"


def test_the_validation_catches_mistakes(rendered: tuple[str, list[dict]]) -> None:
    _, objects = rendered
    crds = crd_schemas()
    deployment = copy.deepcopy(by_kind(objects, "Deployment")["strokegate-ingest"])
    deployment["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError, match="'replica' was unexpected"):
        validate(deployment, crds)
    monitor = copy.deepcopy(by_kind(objects, "ServiceMonitor")["strokegate"])
    monitor["spec"]["endpoints"][0]["intervall"] = "30s"
    with pytest.raises(jsonschema.ValidationError, match="'intervall' was unexpected"):
        validate(monitor, crds)
    monitor["spec"]["endpoints"][0] = {"port": "http", "interval": "half a minute"}
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        validate(monitor, crds)


def test_references_resolve_and_secrets_are_the_documented_ones(rendered: tuple[str, list[dict]]) -> None:
    _, objects = rendered
    config_maps, claims = by_kind(objects, "ConfigMap"), by_kind(objects, "PersistentVolumeClaim")
    service = by_kind(objects, "Service")["strokegate"]
    secrets = set()
    for deployment in by_kind(objects, "Deployment").values():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps
            secrets |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", []) if "valueFrom" in e}
            mounted = {m["name"] for m in container["volumeMounts"]}
            assert mounted == {v["name"] for v in pod["volumes"]}
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims
            if "secret" in volume:
                secrets.add(volume["secret"]["secretName"])
    assert secrets <= EXTERNAL_SECRETS
    assert {"strokegate-database", "strokegate-tls"} <= secrets
    dicom = by_kind(objects, "Service")["strokegate-dicom"]
    ingest = by_kind(objects, "Deployment")["strokegate-ingest"]
    pod_labels = ingest["spec"]["template"]["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod_labels and dicom["spec"]["selector"].items() <= pod_labels
    # The API stays inside the cluster; only DICOM is offered to the PACS outside.
    assert "type" not in service["spec"] and [p["name"] for p in service["spec"]["ports"]] == ["http"]
    assert dicom["spec"]["type"] == "LoadBalancer" and [p["port"] for p in dicom["spec"]["ports"]] == [11112]
    monitor = by_kind(objects, "ServiceMonitor")["strokegate"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert not monitor["spec"]["selector"]["matchLabels"].items() <= dicom["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == "http"


def test_the_pods_get_real_settings_listen_on_the_pod_network_and_prometheus_has_a_token(
    rendered: tuple[str, list[dict]]
) -> None:
    _, objects = rendered
    config = by_kind(objects, "ConfigMap")
    for name, config_map in config.items():
        assert unknown_settings(config_map["data"]) == [], name
    settings = next(iter(config.values()))["data"]
    assert settings["STROKEGATE_HOST"] == settings["STROKEGATE_HTTP_HOST"] == "0.0.0.0"
    for name, deployment in by_kind(objects, "Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            assert unknown_settings(e["name"] for e in container.get("env", [])) == [], name
    endpoint = by_kind(objects, "ServiceMonitor")["strokegate"]["spec"]["endpoints"][0]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "strokegate-metrics-token", "key": "token"}}


def test_ingest_is_one_replica_replaced_not_rolled(rendered: tuple[str, list[dict]]) -> None:
    _, objects = rendered
    ingest = by_kind(objects, "Deployment")["strokegate-ingest"]
    assert ingest["spec"]["replicas"] == 1
    assert ingest["spec"]["strategy"] == {"type": "Recreate"}  # the receive journal belongs to one process
    container = ingest["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"


def test_the_workers_overlay_adds_gpu_workers_on_shared_volumes() -> None:
    objects = kustomize("workers")
    worker = by_kind(objects, "Deployment")["strokegate-worker"]
    container = worker["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["worker"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("strokegate-gpu:0.1.0")
    assert all(c["spec"]["accessModes"] == ["ReadWriteMany"] for c in by_kind(objects, "PersistentVolumeClaim").values())
    config = next(iter(by_kind(objects, "ConfigMap").values()))
    assert config["data"]["STROKEGATE_JOB_QUEUE"] == "celery"
    ingest = kustomize("ingest")
    assert "strokegate-worker" not in by_kind(ingest, "Deployment")
    assert next(iter(by_kind(ingest, "ConfigMap").values()))["data"]["STROKEGATE_JOB_QUEUE"] == "database"


def test_the_prometheus_rule_is_the_shipped_rule_file() -> None:
    rendered = runpy.run_path(str(KUBERNETES / "sync_prometheusrule.py"))["render"]()
    assert (KUBERNETES / "base" / "prometheusrule.yaml").read_text() == rendered, (
        "deploy/kubernetes/base/prometheusrule.yaml differs from the rule file: run python deploy/kubernetes/sync_prometheusrule.py"
    )
    rule = yaml.safe_load((KUBERNETES / "base" / "prometheusrule.yaml").read_text())
    assert rule["spec"]["groups"] == yaml.safe_load((DEPLOY / "prometheus" / "rules" / "strokegate.rules.yml").read_text())["groups"]
