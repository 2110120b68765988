"""The place-question data set: right answers, known words, held-out scenes kept apart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from models.scenes.evaluate import place_requests
from models.scenes.finetune_data import TRAIN_SEED_START, write_split
from models.scenes.language import PLACE
from models.scenes.sample import sample
from models.scenes.tokenizer import CAPTION_PROMPT, UNK
from models.scenes.world import EVAL_SEED_START, TRAIN_SEED_END

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "checkpoints" / "mmgpt-scenes"


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_answers_name_the_object_in_the_asked_place(tmp_path: Path) -> None:
    seeds = range(TRAIN_SEED_START, TRAIN_SEED_START + 40)
    records = _records(write_split(tmp_path, "train", seeds))
    assert TRAIN_SEED_START + 40 <= TRAIN_SEED_END
    for seed, record in zip(seeds, records, strict=True):
        user, assistant = record["messages"]
        question = user["content"][0]["text"]
        assert user["content"][1]["image_url"]["url"] == f"images/{seed}.png"
        assert (tmp_path / "images" / f"{seed}.png").is_file()
        (obj,) = [o for o in sample(seed).objects if PLACE[o.position] in question]
        wanted = obj.colour if question.startswith("what color") else obj.shape
        assert assistant["content"] == wanted


def test_the_evaluation_asks_what_the_held_out_file_holds(tmp_path: Path) -> None:
    records = _records(write_split(tmp_path, "eval", range(EVAL_SEED_START, EVAL_SEED_START + 20)))
    requests = place_requests(20)
    for record, request in zip(records, requests, strict=True):
        user, assistant = record["messages"]
        assert (user["content"][0]["text"], assistant["content"]) == (
            request.question,
            request.expected,
        )


def test_every_word_is_in_the_shipped_vocabulary() -> None:
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED)
    for request in place_requests(30):
        assert request.question is not None
        ids = tokenizer(request.question + " " + request.expected)["input_ids"]
        assert tokenizer.convert_tokens_to_ids(UNK) not in ids


def test_rehearsal_lines_are_the_scenes_own_captions_and_questions(tmp_path: Path) -> None:
    seeds = range(TRAIN_SEED_START, TRAIN_SEED_START + 40)
    records = _records(write_split(tmp_path, "train", seeds, rehearse=0.5))
    rehearsed = 0
    for seed, record in zip(seeds, records, strict=True):
        user, assistant = record["messages"]
        pair = (user["content"][0]["text"], assistant["content"])
        scene = sample(seed)
        if "the object" not in pair[0]:
            rehearsed += 1
            assert pair in [*scene.qa, (CAPTION_PROMPT, scene.caption)]
    assert 10 <= rehearsed <= 30
