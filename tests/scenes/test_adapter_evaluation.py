"""models.scenes.evaluate --adapter: the reference backend answers through peft's adapter."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel

from models.finetune import FinetuneConfig, finetune
from models.scenes.backends import TransformersBackend
from models.scenes.evaluate import evaluate
from models.scenes.finetune_data import TRAIN_SEED_START, write_split

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "mmgpt-scenes"


def test_place_questions_are_scored_through_an_adapter(tmp_path: Path) -> None:
    data = write_split(tmp_path, "train", range(TRAIN_SEED_START, TRAIN_SEED_START + 4))
    adapter = tmp_path / "adapter"
    config = FinetuneConfig(
        model=SHIPPED, data=data, out=adapter, max_steps=1, batch_size=4, progress=False
    )
    finetune(config)
    backend = TransformersBackend(SHIPPED, batch_size=8, adapter=adapter)
    assert isinstance(backend.model, PeftModel)
    scores = evaluate(backend, num_scenes=8, tasks="place")
    assert list(scores) == ["place"] and scores["place"].total == 8
