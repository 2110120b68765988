"""bench.lora_adapters on a tiny shape: adapters written by peft, one row per adapter count."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import lora_adapters
from tests.torch_threads import intra_op_threads


def test_a_row_per_adapter_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--model", "llama-tiny", "--streams", "4", "--new-tokens", "2", "--adapters", "0", "2"]
    with intra_op_threads(1):
        lora_adapters.main([*argv, "--cache-dir", str(tmp_path)])
    rows = [line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines()[3:]]
    assert rows == ["base", "0", "2"]
    assert len(list(tmp_path.glob("llama-tiny-lora-r8-*/adapter_model.safetensors"))) == 2
