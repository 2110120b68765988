"""The Dockerfiles pass hadolint and keep their promises; .dockerignore keeps the context
small without dropping what the build copies."""

from __future__ import annotations

import fnmatch
import json
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import DOCKER_DIR, REPO_ROOT, require_tool

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERFILES = [DOCKERFILE, DOCKER_DIR / "prometheus" / "Dockerfile"]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = path.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(pair[0].upper(), pair[1] if len(pair) > 1 else "") for pair in pairs]


def arguments(path: Path, instruction: str) -> list[str]:
    return [args for name, args in instructions(path) if name == instruction]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: str(path.parent.name))
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run(
        [hadolint, str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_problem(tmp_path: Path) -> None:
    hadolint = require_tool("hadolint")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = subprocess.run(
        [hadolint, str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode != 0


def test_base_image_is_an_argument_defaulting_to_slim_python() -> None:
    assert "BASE_IMAGE=python:3.11-slim-bookworm" in arguments(DOCKERFILE, "ARG")
    stages = arguments(DOCKERFILE, "FROM")
    assert stages == [
        "${BASE_IMAGE} AS deps",
        "deps AS project",
        "deps AS kernels",
        "${BASE_IMAGE} AS runtime",
    ]


def test_the_runtime_loads_the_kernels_built_beside_its_torch() -> None:
    """The kernels' stage compiles models/cpu_kernels with the deps stage's torch; the
    runtime copies the library and names it, so it needs no compiler."""
    build = " ".join(arguments(DOCKERFILE, "RUN"))
    assert "python -m models.cpu_kernels" in build
    assert "--from=kernels /opt/mmgpt/lib /opt/mmgpt/lib" in arguments(DOCKERFILE, "COPY")
    library = "MMGPT_CPU_KERNELS_LIBRARY=/opt/mmgpt/lib/mmgpt_cpu_kernels.so"
    assert library in " ".join(arguments(DOCKERFILE, "ENV"))


def test_runtime_runs_the_service_as_a_non_root_user() -> None:
    user = arguments(DOCKERFILE, "USER")[-1]
    assert user.split(":")[0] not in ("0", "root")
    assert json.loads(arguments(DOCKERFILE, "CMD")[-1]) == ["mmgpt", "serve"]


def test_default_model_is_inside_and_configured() -> None:
    runs = " ".join(arguments(DOCKERFILE, "RUN"))
    assert "cp -r models/checkpoints/mmgpt-scenes /opt/mmgpt/checkpoints/" in runs
    assert "chmod -R a+rX" in runs  # readable by the non-root user
    assert "--from=project /opt/mmgpt /opt/mmgpt" in arguments(DOCKERFILE, "COPY")
    env = " ".join(arguments(DOCKERFILE, "ENV"))
    assert "MMGPT_MODEL=/opt/mmgpt/checkpoints/mmgpt-scenes" in env
    assert "MMGPT_HOST=0.0.0.0" in env


def test_healthcheck_probes_ready() -> None:
    healthcheck = arguments(DOCKERFILE, "HEALTHCHECK")[-1]
    assert '"/usr/local/bin/mmgpt-healthcheck"' in healthcheck
    assert "docker/healthcheck.py /usr/local/bin/mmgpt-healthcheck" in arguments(DOCKERFILE, "COPY")
    assert "/ready" in (DOCKER_DIR / "healthcheck.py").read_text()


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore leaves `path` out of the context (the last matching rule wins)."""
    excluded = False
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines():
        rule = line.strip()
        if not rule or rule.startswith("#"):
            continue
        negated = rule.startswith("!")
        pattern = rule.lstrip("!")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", ".git/HEAD", "runs/mmgpt-scenes/step.pt", "app/__pycache__/x.pyc",
     ".mypy_cache/x", "models/checkpoints/other/config.json", "tests/conftest.py"],
)  # fmt: skip
def test_dockerignore_leaves_out(path: str) -> None:
    assert dockerignore_excludes(path)


def copied_sources() -> list[str]:
    sources: list[str] = []
    for args in arguments(DOCKERFILE, "COPY"):
        words = [word for word in args.split() if not word.startswith("--")]
        if "--from=" not in args:
            sources.extend(word.rstrip("/") for word in words[:-1])
    return sources


def test_dockerignore_keeps_what_the_build_copies() -> None:
    sources = copied_sources()
    assert "models" in sources
    for source in [*sources, "models/checkpoints/mmgpt-scenes/config.json", "app/cli.py"]:
        assert not dockerignore_excludes(source), source
