"""deploy/ray: the Serve configs and the KubeRay manifest are what Ray and mmgpt accept."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ray_serve = pytest.importorskip("app.ray_serve", reason="needs the ray extra: pip install '.[ray]'")

import ray  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "ray"


def rayservice() -> list[dict[str, Any]]:
    return list(yaml.safe_load_all((DEPLOY / "rayservice.yaml").read_text()))


def serve_configs() -> dict[str, dict[str, Any]]:
    configs = {
        name: yaml.safe_load((DEPLOY / name).read_text())
        for name in ("serve.yaml", "serve-cpu.yaml")
    }
    configs["rayservice.yaml"] = yaml.safe_load(rayservice()[0]["spec"]["serveConfigV2"])
    return configs


@pytest.mark.parametrize("name", ["serve.yaml", "serve-cpu.yaml", "rayservice.yaml"])
def test_serve_config_is_valid_for_ray_and_mmgpt(name: str) -> None:
    config = serve_configs()[name]
    ServeDeploySchema.model_validate(config)
    (application,) = config["applications"]
    assert application["import_path"] == "app.ray_serve:build_app"
    args = ray_serve.RayServeArgs.model_validate(application["args"])
    ray_serve.build_app(args)  # validates the settings
    (deployment,) = application["deployments"]
    assert deployment["name"] == "mmgpt"
    # Every replica on a node must find a metrics port of its own.
    assert deployment["max_replicas_per_node"] <= args.metrics_port_count
    assert deployment["max_ongoing_requests"] >= args.settings.get("max_num_seqs", 1)


def test_rayservice_matches_the_installed_ray_and_declares_the_metrics_ports() -> None:
    service, monitor = rayservice()
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    args = ray_serve.RayServeArgs.model_validate(config["applications"][0]["args"])
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["mmgpt-metrics"] == args.metrics_port
    scraped = {endpoint["port"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped <= set(ports)
    labels = workers["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
