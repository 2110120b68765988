from pathlib import Path

import pytest

from models.scenes.backends import TransformersBackend
from models.scenes.evaluate import below_threshold, evaluate, table

CHECKPOINT = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "mmgpt-scenes"


@pytest.mark.skipif(
    not (CHECKPOINT / "model.safetensors").exists(),
    reason=f"no shipped checkpoint at {CHECKPOINT}; train it with models.scenes.train",
)
def test_shipped_checkpoint_meets_thresholds_on_held_out_scenes() -> None:
    scores = evaluate(TransformersBackend(CHECKPOINT, batch_size=64), num_scenes=200)
    assert all(score.total > 0 for score in scores.values())
    assert below_threshold(scores) == [], table(scores)
