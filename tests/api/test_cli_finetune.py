"""`mmgpt finetune`: flags reach the run, bad data is a clear exit 2 before training."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

from app.cli import main
from tests.checkpoints import make_tiny_llama
from tests.torch_threads import intra_op_threads


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


def _chat(question: str, answer: str) -> str:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return json.dumps({"messages": messages})


def _run(*argv: str) -> tuple[int, str, str]:
    with (
        contextlib.redirect_stdout(io.StringIO()) as out,
        contextlib.redirect_stderr(io.StringIO()) as err,
        intra_op_threads(1),
    ):
        code = main(["finetune", *argv])
    return code, out.getvalue(), err.getvalue()


def test_flags_reach_the_adapter(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(_chat("say red", "red") + "\n" + _chat("say blue", "blue") + "\n")
    out = tmp_path / "adapter"
    code, stdout, _ = _run(
        "--model", str(tiny_llama), "--data", str(data), "--out", str(out), "--rank", "2",
        "--alpha", "4", "--max-steps", "3", "--batch-size", "1", "--seed", "3", "--threads", "1",
        "--target-modules", "q_proj,v_proj", "--learning-rate", "0.01", "--no-progress",
    )  # fmt: skip
    assert code == 0 and "after 3 steps" in stdout
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"]) == (2, 4)
    assert adapter["target_modules"].endswith(r"\..*\.(?:q_proj|v_proj)")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["config"]["seed"] == 3
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss_curve.png").is_file()


def test_bad_lines_are_listed_and_nothing_is_written(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(_chat("fine", "yes") + "\n{oops\n" + json.dumps({"messages": []}) + "\n")
    out = tmp_path / "adapter"
    code, _, stderr = _run("--model", str(tiny_llama), "--data", str(data), "--out", str(out))
    assert code == 2
    assert "the data has 2 problems" in stderr
    assert "train.jsonl:2: not JSON" in stderr
    assert "train.jsonl:3: no assistant turn to train on" in stderr
    assert not out.exists()


def test_an_unknown_target_module_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(_chat("a", "b") + "\n")
    argv = ["--model", str(tiny_llama), "--data", str(data), "--out", str(tmp_path / "o")]
    code, _, stderr = _run(*argv, "--target-modules", "c_attn")
    assert code == 2 and "unknown target modules c_attn" in stderr


def test_top_level_help_lists_finetune() -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main(["--help"])
    assert "finetune" in out.getvalue()


def test_without_peft_it_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n.startswith("models.finetune")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "peft", None)  # what an uninstalled package looks like
    code, _, stderr = _run("--help")
    assert code == 2 and "needs peft: pip install 'mmgpt[finetune]'" in stderr
