"""The shipped default model on held-out scenes: through transformers, and through mmgpt."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from models.scenes.backends import Request, ServerBackend, TransformersBackend
from models.scenes.evaluate import (
    ALL_TASKS,
    TaskScore,
    below_threshold,
    evaluate,
    held_out_requests,
    normalise,
    table,
)
from tests.conftest import ServerProcess, start_server

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "mmgpt-scenes"
NUM_SCENES = 200
NUM_SERVER_SCENES = 40

# Accuracy measured on 1,000 held-out scenes (see the model card), less a margin for the
# sampling noise of 200 scenes: a regression floor, so a broken checkpoint or evaluation fails.
RECORDED_FLOOR = {
    "caption": 0.97,
    "colour": 0.97,
    "shape": 0.98,
    "count": 0.93,
    "existence": 0.97,
    "position": 0.98,
    "size": 0.98,
}

pytestmark = pytest.mark.skipif(
    not (CHECKPOINT / "model.safetensors").exists(),
    reason=f"no shipped checkpoint at {CHECKPOINT}; train it with models.scenes.train",
)


@pytest.fixture(scope="module")
def reference() -> TransformersBackend:
    return TransformersBackend(CHECKPOINT, batch_size=64)


@pytest.fixture(scope="module")
def scores(reference: TransformersBackend) -> dict[str, TaskScore]:
    return evaluate(reference, num_scenes=NUM_SCENES)


def test_every_task_is_scored(scores: dict[str, TaskScore]) -> None:
    assert set(scores) == set(ALL_TASKS)
    assert set(RECORDED_FLOOR) == set(ALL_TASKS)
    assert all(score.total > 0 for score in scores.values())


def test_accuracy_holds_what_the_model_card_records(scores: dict[str, TaskScore]) -> None:
    fallen = [task for task, floor in RECORDED_FLOOR.items() if scores[task].accuracy < floor]
    assert fallen == [], table(scores)


def test_accuracy_meets_the_targets(scores: dict[str, TaskScore]) -> None:
    assert below_threshold(scores) == [], table(scores)


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start_server(CHECKPOINT, tmp_path_factory.mktemp("scenes-logs"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def test_server_answers_exactly_as_transformers(
    reference: TransformersBackend, default_server: ServerProcess
) -> None:
    """Greedy /v1/caption and /v1/qa through the engine reproduce the reference model."""
    requests: list[Request] = held_out_requests(NUM_SERVER_SCENES)
    expected = reference.answer(requests)
    served = ServerBackend(default_server.url, concurrency=16).answer(requests)
    differing = [
        (request.task, want, got)
        for request, want, got in zip(requests, expected, served, strict=True)
        if normalise(want) != normalise(got)
    ]
    # A near-tie between two logits may flip under a different batch layout; allow 1%.
    assert len(differing) <= len(requests) // 100, differing[:10]
