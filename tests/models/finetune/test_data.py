"""Reading OpenAI fine-tuning JSONL: what is accepted, and each problem with its line."""

from __future__ import annotations

from pathlib import Path

from models.finetune.data import read_conversations
from tests.models.finetune.conftest import WriteJsonl, data_url, image_chat, picture, text_chat


def test_images_from_data_urls_and_relative_paths(tmp_path: Path, write_jsonl: WriteJsonl) -> None:
    picture((200, 0, 0)).save(tmp_path / "red.png")
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [
            image_chat("what colour?", "red.png", "red"),
            image_chat("and this?", data_url(picture((0, 0, 200))), "blue"),
        ],
    )
    conversations, problems = read_conversations(path)
    assert problems == []
    assert [c.images[0].getpixel((0, 0)) for c in conversations] == [(200, 0, 0), (0, 0, 200)]
    assert conversations[0].messages[0]["content"] == [
        {"type": "text", "text": "what colour?"},
        {"type": "image"},
    ]
    assert conversations[0].trained_turns == [1]


def test_text_parts_become_one_string_as_the_server_renders_them(
    tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    record = {"messages": [{"role": "user", "content": parts}, text_chat("", "a")["messages"][1]]}
    conversations, _ = read_conversations(write_jsonl(tmp_path / "t.jsonl", [record]))
    assert conversations[0].messages[0]["content"] == "one\ntwo"


def test_every_bad_line_is_reported_with_its_number(
    tmp_path: Path, write_jsonl: WriteJsonl
) -> None:
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    weightless = text_chat("q", "a")
    weightless["messages"][1]["weight"] = 0
    records = [
        text_chat("fine", "yes"),
        "{not json",
        image_chat("q", "missing.png", "a"),
        image_chat("q", "broken.png", "a"),
        {"messages": [{"role": "user", "content": "no answer"}]},
        weightless,
        image_chat("q", "https://example.com/a.png", "a"),
        {"messages": [{"role": "robot", "content": "x"}]},
        {"prompt": "legacy format"},
    ]
    conversations, problems = read_conversations(write_jsonl(tmp_path / "train.jsonl", records))
    assert len(conversations) == 1
    expected = [
        (2, "not JSON"),
        (3, "image not found"),
        (4, "cannot decode"),
        (5, "no assistant turn"),
        (6, "no assistant turn"),
        (7, "use a data: URL or a file path"),
        (8, "needs a role"),
        (9, '{"messages": [...]}'),
    ]
    assert len(problems) == len(expected)
    for problem, (line, words) in zip(problems, expected, strict=True):
        assert problem.startswith(f"train.jsonl:{line}: ") and words in problem, problem


def test_a_missing_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    conversations, problems = read_conversations(tmp_path / "absent.jsonl")
    assert conversations == [] and "no such file" in problems[0]
