"""`mmgpt bench` hands its arguments to bench.serve; `mmgpt --help` lists it."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import pytest

import bench.serve
from app.cli import main


def test_bench_runs_the_serving_benchmark_with_its_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: Sequence[str] | None = None) -> int:
        seen.append(list(argv or []))
        return 7

    monkeypatch.setattr(bench.serve, "main", fake_main)
    argv = ["--base-url", "http://127.0.0.1:9", "--workload", "caption", "--help"]
    assert main(["bench", *argv]) == 7
    assert seen == [argv]


def test_bench_help_is_the_benchmarks_own() -> None:
    with pytest.raises(SystemExit) as exited, contextlib.redirect_stdout(io.StringIO()) as out:
        main(["bench", "--help"])
    assert exited.value.code == 0
    assert out.getvalue().startswith("usage: mmgpt bench") and "--workload" in out.getvalue()


def test_top_level_help_lists_both_commands() -> None:
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main(["--help"])
    assert "serve" in out.getvalue() and "bench" in out.getvalue()
