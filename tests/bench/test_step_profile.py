"""bench.step_profile times and profiles decode steps of every sequence, not idle ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.step_profile import decoding_core, main
from models import load_model


def test_every_profiled_step_decodes_every_sequence(tiny_gpt2: Path) -> None:
    core = decoding_core(load_model(tiny_gpt2), batch_size=3, prompt_len=4, steps=5)
    for _ in range(5):
        outputs = core.step()
        assert sum(len(output.token_ids) for _, output in outputs) == 3
    core.step()  # one token of slack, then nothing is left
    assert not core.has_unfinished


def test_prints_time_ops_and_top_ops_per_batch_size(
    tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["--model", str(tiny_gpt2), "--batch-sizes", "1", "2", "--prompt-len", "4",
          "--steps", "2", "--repeats", "2", "--top", "3"])  # fmt: skip
    out = capsys.readouterr().out
    assert "B=1:" in out and "B=2:" in out and out.count("aten ops/step") == 2
    top_rows = [line for line in out.splitlines() if line.startswith("| aten::")]
    assert len(top_rows) == 6
