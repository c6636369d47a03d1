"""deploy/compose.yaml is a valid Compose file (the Compose Specification's JSON schema, vendored
in deploy/schemas; no container engine runs here, so `docker compose config` cannot), and what it
refers to exists: mounted files, Dockerfiles, secrets as make-dev-secrets.sh makes them, the
scrape target. The container entry point turns secret files into settings."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from deploy_checks import DEPLOY, REPO_ROOT, SCHEMAS, require_tool, run, unknown_settings
from dicom_tools import load_orthanc_config

pytestmark = pytest.mark.integration

COMPOSE = DEPLOY / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dev_secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The secret files make-dev-secrets.sh makes (it needs openssl)."""
    require_tool("openssl", "apt-get install openssl")
    folder = tmp_path_factory.mktemp("secrets")
    result = run(["bash", str(DEPLOY / "secrets" / "make-dev-secrets.sh"), str(folder)])
    assert result.returncode == 0, result.stdout + result.stderr
    return folder


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft7Validator:
    schema = json.loads((SCHEMAS / "compose-spec" / "compose-spec.json").read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_is_valid_by_the_compose_specification(compose: dict, validator: jsonschema.Draft7Validator) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors


def test_the_schema_check_catches_a_mistake(compose: dict, validator: jsonschema.Draft7Validator) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["strokegate"]["imag"] = broken["services"]["strokegate"].pop("image")
    broken["services"]["postgres"]["secrets"] = "db_password"
    messages = {"/".join(map(str, e.absolute_path)): e.message for e in validator.iter_errors(broken)}
    assert messages == {
        "services/strokegate": "'imag' does not match any of the regexes: '^x-'",
        "services/postgres/secrets": "'db_password' is not of type 'array'",
    }


def test_the_stack_has_every_part_with_volumes_secrets_and_profiles(compose: dict) -> None:
    services = compose["services"]
    assert {"strokegate", "postgres", "orthanc", "prometheus", "grafana", "rabbitmq", "worker", "worker-gpu"} <= set(services)
    assert "profiles" not in services["strokegate"] and "scale" in services["worker"]["profiles"]
    assert "scale" in services["rabbitmq"]["profiles"]
    assert services["worker"]["command"] == ["worker"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["worker-gpu"]["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
    mounts = {m.split(":")[1] for m in services["strokegate"]["volumes"]}
    assert mounts == {"/var/lib/strokegate/spool", "/var/lib/strokegate/results"}
    assert "database:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert {"tls_cert", "tls_key", "tls_ca", "database_url"} <= set(services["strokegate"]["secrets"])
    environment = services["strokegate"]["environment"]
    assert environment["STROKEGATE_DATABASE_URL__FILE"] == "/run/secrets/database_url"
    assert environment["STROKEGATE_TLS_CERTIFICATE"] == "/run/secrets/tls_cert"
    assert environment["STROKEGATE_TLS_KEY"] == "/run/secrets/tls_key"
    assert environment["STROKEGATE_TLS_CA"] == "/run/secrets/tls_ca"


def test_every_setting_the_containers_get_is_one_the_service_has(compose: dict) -> None:
    """A misspelt or old name (STROKEGATE_TLS_CERT, a token file) would be ignored silently."""
    for name, service in compose["services"].items():
        assert unknown_settings(service.get("environment", {})) == [], name


def test_the_service_listens_on_the_container_network(compose: dict) -> None:
    """It binds 127.0.0.1 by default, which no other container and no published port reaches."""
    for name in ("strokegate", "worker"):
        environment = compose["services"][name]["environment"]
        assert environment["STROKEGATE_HOST"] == environment["STROKEGATE_HTTP_HOST"] == "0.0.0.0", name


def test_everything_the_compose_file_refers_to_exists(compose: dict, dev_secrets: Path) -> None:
    services = compose["services"]
    for name, service in services.items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
            else:
                assert source in compose["volumes"], f"{name}: volume {source}"
        for secret in service.get("secrets", []):
            assert (secret["source"] if isinstance(secret, dict) else secret) in compose["secrets"], f"{name}: {secret}"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on {dependency}"
        if "build" in service:
            assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
    # Every secret file is one that make-dev-secrets.sh makes.
    for name, secret in compose["secrets"].items():
        relative = Path(secret["file"]).relative_to("secrets")
        assert (dev_secrets / relative).is_file(), f"secret {name}: make-dev-secrets.sh does not make {relative}"


def test_prometheus_scrapes_the_compose_service_on_its_http_port(compose: dict) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "strokegate")
    assert job["static_configs"][0]["targets"] == ["strokegate:8080"]
    assert "127.0.0.1:8080:8080" in compose["services"]["strokegate"]["ports"]
    assert any(v.endswith(":/etc/prometheus/rules:ro") for v in compose["services"]["prometheus"]["volumes"])
    # /metrics needs a reader token (tokens live in the database): Prometheus reads it from its secret
    assert job["authorization"]["credentials_file"] == "/run/secrets/prometheus_token"
    assert "prometheus_token" in compose["services"]["prometheus"]["secrets"]
    # and every worker replica on the metrics port the compose workers are given
    workers = next(j for j in config["scrape_configs"] if j["job_name"] == "strokegate-worker")["dns_sd_configs"][0]
    for name in workers["names"]:
        assert compose["services"][name]["environment"]["STROKEGATE_WORKER_METRICS_PORT"] == str(workers["port"])


def test_the_compose_orthanc_routes_like_the_shipped_rule_but_to_the_strokegate_service() -> None:
    shipped = load_orthanc_config(DEPLOY / "orthanc" / "strokegate.json")
    composed = load_orthanc_config(DEPLOY / "compose" / "orthanc" / "strokegate.json")
    assert composed["DicomModalities"]["strokegate"] == ["STROKEGATE", "strokegate", 11112]
    composed["DicomModalities"]["strokegate"][1] = shipped["DicomModalities"]["strokegate"][1]
    assert composed == shipped


def test_dev_secrets_hold_together(dev_secrets: Path) -> None:
    tmp_path = dev_secrets
    script = str(DEPLOY / "secrets" / "make-dev-secrets.sh")
    password = (tmp_path / "db_password").read_text().strip()
    assert len(password) >= 32
    assert (tmp_path / "database_url").read_text().strip() == f"postgresql://strokegate:{password}@postgres:5432/strokegate"
    verified = run(["openssl", "verify", "-CAfile", str(tmp_path / "tls" / "ca.crt"), str(tmp_path / "tls" / "strokegate.crt")])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert run(["bash", script, str(tmp_path)]).returncode == 0
    assert before == {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}  # a rerun keeps every secret
    assert oct((tmp_path / "tls" / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_the_entry_point_turns_secret_files_into_settings(tmp_path: Path) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "strokegate").write_text('#!/bin/sh\necho "args: $*"\nenv | grep "^STROKEGATE_" | sort\n')
    (fake / "strokegate").chmod(0o755)
    (tmp_path / "database_url").write_text("postgresql://strokegate:s3cret@postgres:5432/strokegate\n")
    env = {"PATH": f"{fake}:{os.environ['PATH']}", "STROKEGATE_DATABASE_URL__FILE": str(tmp_path / "database_url"),
           "STROKEGATE_PORT": "11112"}
    entrypoint = str(DEPLOY / "docker-entrypoint.sh")
    result = subprocess.run(["sh", entrypoint, "serve"], env=env, capture_output=True, text=True, timeout=10, check=True)
    assert result.stdout.splitlines() == [
        "args: serve",
        "STROKEGATE_DATABASE_URL=postgresql://strokegate:s3cret@postgres:5432/strokegate",
        "STROKEGATE_PORT=11112",
    ]
    env["STROKEGATE_DATABASE_URL__FILE"] = str(tmp_path / "missing")
    refused = subprocess.run(["sh", entrypoint, "serve"], env=env, capture_output=True, text=True, timeout=10, check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == f"strokegate: STROKEGATE_DATABASE_URL__FILE names {tmp_path / 'missing'}, which cannot be read; mount the secret there"
    assert REPO_ROOT.joinpath("deploy", "docker-entrypoint.sh").stat().st_mode & 0o111
