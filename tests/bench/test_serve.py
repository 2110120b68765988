"""bench.serve against a scripted server: what is sent, what is counted, how load is shaped."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from pathlib import Path

import pytest

from bench.client import StreamTimer
from bench.serve import BenchReport, LoadConfig, arrivals, main, run_benchmark
from bench.workloads import WorkloadSpec
from tests.bench.scripted import ScriptedServer
from tests.bench.servers import ThreadServer


def _run(server: ThreadServer, spec: WorkloadSpec, concurrency: int | None = None) -> BenchReport:
    load = LoadConfig(base_url=server.base_url, max_concurrency=concurrency)
    return asyncio.run(run_benchmark(load, spec))


def test_text_counts_tokens_from_usage_and_caps_concurrency() -> None:
    scripted = ScriptedServer()
    with ThreadServer(scripted.app) as server:
        report = _run(server, WorkloadSpec("text", num_prompts=6, output_len=5), concurrency=2)
    assert report.model == "scripted"
    assert (report.summary.completed, report.summary.errors) == (6, 0)
    assert report.summary.total_output_tokens == 30  # usage says 5; only 4 text chunks came
    assert report.summary.total_prompt_tokens == 18
    assert 1 <= scripted.max_in_flight <= 2
    body = scripted.bodies[0]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "scripted" and body["max_tokens"] == 5
    assert isinstance(body["prompt"], str) and len(body["prompt"].split()) == 32


def test_a_server_that_lists_no_model_is_sent_the_unlisted_one() -> None:
    """As `transformers serve` pinned to a local folder: it lists nothing, yet answers."""
    scripted = ScriptedServer(listed=())
    spec = WorkloadSpec("text", num_prompts=2, output_len=3)
    with ThreadServer(scripted.app) as server:
        load = LoadConfig(base_url=server.base_url, unlisted_model="/ckpt/folder")
        report = asyncio.run(run_benchmark(load, spec))
    assert report.model == "/ckpt/folder" and report.summary.completed == 2
    assert {body["model"] for body in scripted.bodies} == {"/ckpt/folder"}


def test_chat_image_sends_a_data_url_png() -> None:
    scripted = ScriptedServer()
    spec = WorkloadSpec("chat-image", num_prompts=2, output_len=3, image_source="synthetic")
    with ThreadServer(scripted.app) as server:
        report = _run(server, spec)
    assert report.summary.completed == 2
    assert report.summary.total_output_tokens == 6
    image_part, text_part = scripted.bodies[0]["messages"][0]["content"]
    header, encoded = image_part["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    assert base64.b64decode(encoded).startswith(b"\x89PNG")
    assert text_part["type"] == "text" and text_part["text"]


@pytest.mark.parametrize("workload", ["caption", "qa"])
def test_multipart_workloads_count_chunks_without_usage(workload: str) -> None:
    scripted = ScriptedServer()
    spec = WorkloadSpec(workload, num_prompts=3, output_len=4, image_source="synthetic")
    with ThreadServer(scripted.app) as server:
        report = _run(server, spec)
    assert report.summary.total_output_tokens == 12  # 4 chunks each, no usage sent
    assert report.summary.ttft.p50 > 0 and report.summary.itl.p50 > 0
    form = scripted.forms[0]
    assert form["stream"] == "true" and form["max_tokens"] == "4" and form["temperature"] == "0.0"
    assert form["png"].startswith(b"\x89PNG")
    assert ("question" in form) == (workload == "qa")


def test_http_errors_are_counted_with_their_message() -> None:
    with ThreadServer(ScriptedServer(fail_with=503).app) as server:
        report = _run(server, WorkloadSpec("text", num_prompts=3, output_len=2))
    assert (report.summary.completed, report.summary.errors) == (0, 3)
    assert report.errors and report.errors[0].startswith("HTTP 503")


def test_main_prints_a_table_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    with ThreadServer(ScriptedServer().app) as server:
        argv = ["--base-url", server.base_url, "--num-prompts", "3", "--output-len", "3"]
        assert main([*argv, "--request-rate", "500", "--json", str(out)]) == 0
    assert "Output token throughput" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["summary"]["completed"] == 3
    assert report["load"]["request_rate"] == "500.0"


def test_stream_timer_treats_eos_first_as_success_without_ttft() -> None:
    timer = StreamTimer(start=0.0)
    timer.feed({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}, now=0.5)
    result = timer.result(end=0.6)
    assert result.ok and result.ttft is None and result.output_tokens == 0


def test_stream_timer_reports_an_error_event() -> None:
    timer = StreamTimer(start=0.0)
    timer.feed({"choices": [{"index": 0, "text": "a"}]}, now=0.1)
    timer.feed({"error": {"message": "engine died"}}, now=0.2)
    result = timer.result(end=0.3)
    assert not result.ok and "engine died" in result.error


def test_arrivals_yield_every_index_in_order() -> None:
    async def collect(rate: float) -> list[int]:
        return [index async for index in arrivals(5, rate, random.Random(0))]

    assert asyncio.run(collect(float("inf"))) == [0, 1, 2, 3, 4]
    assert asyncio.run(collect(10_000.0)) == [0, 1, 2, 3, 4]


def test_warmups_use_other_prompts_than_the_measured_ones() -> None:
    scripted = ScriptedServer()
    spec = WorkloadSpec("text", num_prompts=2, output_len=2)
    with ThreadServer(scripted.app) as server:
        load = LoadConfig(base_url=server.base_url, num_warmups=2)
        report = asyncio.run(run_benchmark(load, spec))
    assert report.summary.completed == 2  # the warm-ups are not measured
    warmups, measured = scripted.bodies[:2], scripted.bodies[2:]
    assert not {b["prompt"] for b in warmups} & {b["prompt"] for b in measured}
