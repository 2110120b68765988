"""Prometheus' scrape config and Grafana's provisioning agree with the compose stack."""

from __future__ import annotations

import subprocess
from typing import Any
from urllib.parse import urlparse

import yaml

from tests.deploy.conftest import DOCKER_DIR, REPO_ROOT, require_tool

PROMETHEUS_CONFIG = DOCKER_DIR / "prometheus" / "prometheus.yml"
PROVISIONING = DOCKER_DIR / "grafana" / "provisioning"


def load_yaml(path: Any) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = load_yaml(REPO_ROOT / "docker-compose.yml")["services"]
    return services


def container_port(service: dict[str, Any]) -> int:
    return int(service["ports"][0].rsplit(":", 1)[1])


def test_prometheus_config_is_valid() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_mmgpt_service_on_its_port() -> None:
    jobs = {job["job_name"]: job for job in load_yaml(PROMETHEUS_CONFIG)["scrape_configs"]}
    mmgpt = jobs["mmgpt"]
    assert mmgpt["metrics_path"] == "/metrics"
    discovery = mmgpt["dns_sd_configs"][0]
    services = compose_services()
    model_services = {name for name in services if name.startswith("mmgpt")}
    assert set(discovery["names"]) == model_services == {"mmgpt", "mmgpt-gpu"}
    for name in model_services:
        assert container_port(services[name]) == discovery["port"]


def test_datasource_points_at_the_prometheus_service() -> None:
    datasources = load_yaml(PROVISIONING / "datasources" / "prometheus.yml")["datasources"]
    assert len(datasources) == 1
    source = datasources[0]
    assert source["type"] == "prometheus"
    url = urlparse(source["url"])
    assert url.hostname == "prometheus"
    assert url.port == container_port(compose_services()["prometheus"])
    scrape_interval = load_yaml(PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape_interval


def test_dashboard_provider_loads_the_dashboard_folder() -> None:
    providers = load_yaml(PROVISIONING / "dashboards" / "mmgpt.yml")["providers"]
    assert [p["type"] for p in providers] == ["file"]
    path = providers[0]["options"]["path"]
    mounts = dict(
        volume.split(":")[:2][::-1] for volume in compose_services()["grafana"]["volumes"]
    )
    host_folder = REPO_ROOT / mounts[path]
    assert host_folder == DOCKER_DIR / "grafana" / "dashboards"
    assert sorted(p.name for p in host_folder.glob("*.json")) == ["mmgpt.json"]
