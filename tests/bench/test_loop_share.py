"""bench.loop_share: the share table, and a real run against a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.loop_share import Server, format_table
from bench.loop_share import main as loop_share_main


def test_the_share_is_each_rounds_own_ratio_then_the_median() -> None:
    loop = [1000.0, 2000.0, 1500.0]
    server = Server("mmgpt", "http://unused", tokens_per_s=[900.0, 1000.0, 1200.0])
    row = format_table(loop, [server]).splitlines()[-1]
    # shares 90%, 50%, 80%: median 80% (not the 1000 / 1500 of the medians, 67%)
    assert row == "| mmgpt | 1,000.0 | 1,500.0 | 80% | 50%–90% |"


def test_a_run_alternates_the_loop_and_the_server(
    tiny_gpt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", str(tiny_gpt2), "--threads", "1", "--rounds", "2", "--requests", "1"]
    argv += ["--loop-repeats", "1", "--input-len", "8", "--output-len", "6"]
    assert loop_share_main([*argv, "--log-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rounds = [line for line in lines if line.startswith("round")]
    assert len(rounds) == 2 and all("bare loop" in line and "mmgpt" in line for line in rounds)
    cells = lines[-1].strip("|").split("|")
    assert cells[0].strip() == "mmgpt"
    assert float(cells[1].replace(",", "")) > 0 and cells[3].strip().endswith("%")
