import re

import pytest

from models.scenes import EVAL_SEED_START, TASKS, TRAIN_SEED_END, sample
from models.scenes.render import RGB
from models.scenes.world import COLOURS, POSITIONS, SHAPES, SIZES

OBJECT = r"a (small|large) (red|green|blue|yellow|purple) (circle|square|triangle) "
OBJECT += r"(on the left|in the middle|on the right)"
CAPTION = re.compile(rf"^{OBJECT}(, {OBJECT})?( and {OBJECT})?\.$")
SEEDS = range(300)


def test_same_seed_same_scene() -> None:
    first, second = sample(12345), sample(12345)
    assert first.image.tobytes() == second.image.tobytes()
    assert (first.caption, first.qa, first.text) == (second.caption, second.qa, second.text)


def test_different_seeds_give_different_scenes() -> None:
    images = {sample(seed).image.tobytes() for seed in range(50)}
    assert len(images) == 50


def test_held_out_seeds_lie_outside_training() -> None:
    assert EVAL_SEED_START >= TRAIN_SEED_END


@pytest.mark.parametrize("seed", SEEDS)
def test_caption_follows_grammar_left_to_right(seed: int) -> None:
    scene = sample(seed)
    assert CAPTION.match(scene.caption), scene.caption
    slots = [obj.slot for obj in scene.objects]
    assert slots == sorted(set(slots))
    places = re.findall(r"on the left|in the middle|on the right", scene.caption)
    assert [place.split()[-1] for place in places] == [obj.position for obj in scene.objects]


def test_image_shows_each_colour_named_in_the_caption() -> None:
    for seed in range(40):
        scene = sample(seed)
        pixels = {colour for _, colour in scene.image.getcolors(maxcolors=64 * 64) or []}
        for obj in scene.objects:
            assert RGB[obj.colour] in pixels


def test_every_task_is_asked_and_answers_are_single_words() -> None:
    answers = set(COLOURS) | set(SHAPES) | set(SIZES) | set(POSITIONS)
    answers |= {"yes", "no", "zero", "one", "two", "three"}
    asked: set[str] = set()
    for seed in SEEDS:
        scene = sample(seed)
        asked |= set(scene.qa_by_task)
        assert scene.qa == list(scene.qa_by_task.values())
        assert all(answer in answers for _, answer in scene.qa)
    assert asked == set(TASKS)


def test_questions_are_unambiguous_and_correct() -> None:
    for seed in SEEDS:
        scene = sample(seed)
        objects = scene.objects
        for task, (question, answer) in scene.qa_by_task.items():
            words = question.rstrip("?").split()
            if task == "colour":
                matches = [obj for obj in objects if obj.shape == words[-1]]
                assert [obj.colour for obj in matches] == [answer]
            if task in ("position", "size"):
                colour, shape = words[-2:]
                matches = [obj for obj in objects if (obj.colour, obj.shape) == (colour, shape)]
                assert len(matches) == 1
                assert answer == (matches[0].position if task == "position" else matches[0].size)
            if task == "existence":
                colour, shape = words[-2:]
                present = any((obj.colour, obj.shape) == (colour, shape) for obj in objects)
                assert answer == ("yes" if present else "no")


def test_text_starts_with_caption_and_states_each_answer() -> None:
    scene = sample(7)
    assert scene.text.startswith(scene.caption)
    for question, answer in scene.qa:
        assert f"{question} {answer}." in scene.text


def test_boxes_bound_each_objects_pixels() -> None:
    """Each object's box holds all of its colour's pixels (when no other object shares the
    colour) and some of them: the boxes the grounding labels are computed from."""
    for seed in range(60):
        scene = sample(seed)
        assert len(scene.boxes) == len(scene.objects)
        for obj, (left, top, right, bottom) in zip(scene.objects, scene.boxes, strict=True):
            inside = scene.image.crop((left, top, right, bottom))
            assert RGB[obj.colour] in {rgb for _, rgb in inside.getcolors(maxcolors=4096) or []}
            if sum(other.colour == obj.colour for other in scene.objects) == 1:
                total = sum(
                    count
                    for count, rgb in scene.image.getcolors(maxcolors=4096) or []
                    if rgb == RGB[obj.colour]
                )
                within = sum(
                    count
                    for count, rgb in inside.getcolors(maxcolors=4096) or []
                    if rgb == RGB[obj.colour]
                )
                assert within == total
