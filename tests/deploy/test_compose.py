"""docker-compose.yml, as `docker compose config` resolves it."""

from __future__ import annotations

import json
import os
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.conftest import DOCKER_DIR, REPO_ROOT, missing_tool, require_tool

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
# Variables of the shell that would change what the file resolves to.
STACK_VARIABLES = ("MMGPT_", "PROMETHEUS_", "GRAFANA_", "PUBLISH_ADDRESS", "COMPOSE_")


@cache
def compose_command() -> tuple[str, ...]:
    docker = require_tool("docker")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
    )
    if version.returncode != 0:
        missing_tool("the docker compose v2 plugin")
    return (docker, "compose", "--project-directory", str(REPO_ROOT), "-f", str(COMPOSE_FILE))


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    shell = {k: v for k, v in os.environ.items() if not k.startswith(STACK_VARIABLES)}
    shell.update(env or {})
    profile_args = [arg for profile in profiles for arg in ("--profile", profile)]
    command = [*compose_command(), *profile_args, "config", "--format", "json"]
    result = subprocess.run(
        command, capture_output=True, text=True, env=shell, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def test_default_stack_is_mmgpt_prometheus_grafana() -> None:
    services = compose_config()["services"]
    assert set(services) == {"mmgpt", "prometheus", "grafana"}
    assert services["mmgpt"]["environment"]["MMGPT_DEVICE"] == "cpu"
    assert services["mmgpt"]["build"]["args"]["TORCH_VARIANT"] == "cpu"


def test_start_order_waits_for_health() -> None:
    services = compose_config()["services"]
    assert services["prometheus"]["depends_on"]["mmgpt"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"
    for name in ("mmgpt", "prometheus", "grafana"):
        assert services[name]["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    probe = services["mmgpt"]["healthcheck"]["test"]
    assert probe[-1] == "/usr/local/bin/mmgpt-healthcheck"  # docker/healthcheck.py, on /ready


def test_gpu_profile_reserves_a_gpu() -> None:
    services = compose_config("gpu")["services"]
    gpu = services["mmgpt-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia"
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu["environment"]["MMGPT_DEVICE"] == "cuda"
    assert gpu["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert "deploy" not in services["mmgpt"]


def test_models_folder_is_mounted_and_can_be_swapped() -> None:
    mounts = compose_config()["services"]["mmgpt"]["volumes"]
    assert {(m["source"], m["target"], m["read_only"]) for m in mounts} == {
        (str(REPO_ROOT / "models"), "/models", True)
    }
    other = compose_config(env={"MMGPT_MODELS_DIR": "/srv/checkpoints"})
    assert other["services"]["mmgpt"]["volumes"][0]["source"] == "/srv/checkpoints"


def image_environment() -> dict[str, str]:
    """The MMGPT_* variables that the Dockerfile's ENV sets, with their values."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    pairs = re.findall(r"\b(MMGPT_\w+)=(\S+)", text)
    return dict(pairs)


def test_settings_come_from_the_environment() -> None:
    unset = compose_config()["services"]["mmgpt"]["environment"]
    assert unset["MMGPT_API_KEYS"] is None  # passed through only when set
    # A bare name would drop the image's value, so those the image sets get its default.
    for name, value in image_environment().items():
        assert unset.get(name, value) == value, name
    assert image_environment()["MMGPT_MODEL"] == "/opt/mmgpt/checkpoints/mmgpt-scenes"
    env = {"MMGPT_MODEL": "/models/checkpoints/other", "MMGPT_API_KEYS": "k1,k2"}
    for service in compose_config("gpu", env=env)["services"].values():
        if service["image"].startswith("mmgpt:"):
            assert service["environment"]["MMGPT_MODEL"] == "/models/checkpoints/other"
            assert service["environment"]["MMGPT_API_KEYS"] == "k1,k2"


def test_published_ports_listen_on_the_loopback_by_default() -> None:
    for name, service in compose_config("gpu")["services"].items():
        for port in service["ports"]:
            assert port["host_ip"] == "127.0.0.1", name


def test_monitoring_configs_are_mounted_where_they_are_read() -> None:
    services = compose_config()["services"]
    prometheus_mounts = {m["target"]: m["source"] for m in services["prometheus"]["volumes"]}
    config_flag = next(a for a in services["prometheus"]["command"] if "--config.file=" in a)
    config_path = config_flag.split("=", 1)[1]
    assert prometheus_mounts[config_path] == str(DOCKER_DIR / "prometheus" / "prometheus.yml")

    grafana = services["grafana"]
    grafana_mounts = {m["target"]: m["source"] for m in grafana["volumes"]}
    provisioning = DOCKER_DIR / "grafana" / "provisioning"
    assert grafana_mounts["/etc/grafana/provisioning"] == str(provisioning)
    provider = yaml.safe_load((provisioning / "dashboards" / "mmgpt.yml").read_text())
    dashboards_path = provider["providers"][0]["options"]["path"]
    assert grafana_mounts[dashboards_path] == str(DOCKER_DIR / "grafana" / "dashboards")
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_path + "/")
    assert (DOCKER_DIR / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file()


def test_compose_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: healthy")
    broken.write_text(text)
    docker, compose = compose_command()[:2]
    command = [docker, compose, "--project-directory", str(REPO_ROOT), "-f", str(broken)]
    result = subprocess.run(
        [*command, "config", "--quiet"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0
