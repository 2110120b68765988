"""The offline benchmark hands its sampling settings to both contenders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from app.engine.engine_core import EngineCore
from bench import engine_offline
from models.fused_decode import FusedGPT2Decode


def test_both_contenders_sample_as_asked(
    tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine_params: list[Any] = []
    generate_kwargs: list[dict[str, Any]] = []
    add_request = EngineCore.add_request

    def recording_add_request(self: EngineCore, request_id: str, prompt: Any, params: Any) -> Any:
        engine_params.append(params)
        return add_request(self, request_id, prompt, params)

    load_hf = engine_offline.load_hf

    def recording_load_hf(folder: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
        model = load_hf(folder, device, dtype)
        generate = model.generate

        def recording_generate(**kwargs: Any) -> Any:
            generate_kwargs.append(kwargs)
            return generate(**kwargs)

        model.generate = recording_generate  # type: ignore[method-assign]
        return model

    monkeypatch.setattr(EngineCore, "add_request", recording_add_request)
    monkeypatch.setattr(engine_offline, "load_hf", recording_load_hf)
    engine_offline.main(
        ["--models", str(tiny_gpt2), "--batch-sizes", "2", "--prompt-len", "4",
         "--new-tokens", "3", "--temperature", "0.8", "--top-p", "0.9"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert "temperature 0.8, top_p 0.9" in out
    assert [(p.temperature, p.top_p) for p in engine_params] == [(0.8, 0.9)] * (2 + 2)  # warm-up
    sampled = [k for k in generate_kwargs if k["do_sample"]]
    assert len(sampled) == len(generate_kwargs) == 2  # warm-up, then B=2
    assert all((k["temperature"], k["top_p"], k["top_k"]) == (0.8, 0.9, 0) for k in sampled)
    row = next(line for line in out.splitlines() if line.startswith("| ") and "|   2 |" in line)
    assert row.split("|")[5].strip() != "-"  # generate() ran too


def test_greedy_by_default(tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    engine_offline.main(
        ["--models", str(tiny_gpt2), "--batch-sizes", "1", "--prompt-len", "4",
         "--new-tokens", "2", "--skip-generate"]
    )  # fmt: skip
    assert "new tokens, greedy" in capsys.readouterr().out


def test_quantizations_run_side_by_side(
    tiny_gpt2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine_offline.main(
        ["--models", str(tiny_gpt2), "--batch-sizes", "1", "--prompt-len", "4",
         "--new-tokens", "2", "--skip-generate", "--quantization", "none", "int8"]
    )  # fmt: skip
    rows = [line for line in capsys.readouterr().out.splitlines() if "|   1 |" in line]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels == [f"{tiny_gpt2.name} none", f"{tiny_gpt2.name} int8"]


def test_decode_paths_run_side_by_side(
    tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--decode-paths kernels torch`: the same model with its one-stream kernel and
    without it, each engine on its own path."""
    kernel_steps: list[int] = []
    run = FusedGPT2Decode.run

    def counted(self: FusedGPT2Decode, *args: Any) -> torch.Tensor:
        kernel_steps.append(1)
        return run(self, *args)

    monkeypatch.setattr(FusedGPT2Decode, "run", counted)
    common = ["--models", str(tiny_gpt2), "--batch-sizes", "1", "--prompt-len", "4",
              "--new-tokens", "3", "--skip-generate"]  # fmt: skip
    engine_offline.main([*common, "--decode-paths", "torch"])
    assert kernel_steps == []
    engine_offline.main([*common, "--decode-paths", "kernels", "torch"])
    assert kernel_steps  # the kernels' engine decoded through them
    rows = [line for line in capsys.readouterr().out.splitlines() if "|   1 |" in line]
    labels = [row.split("|")[1].strip() for row in rows]
    assert labels[-2:] == [f"{tiny_gpt2.name} kernels", f"{tiny_gpt2.name} torch"]
