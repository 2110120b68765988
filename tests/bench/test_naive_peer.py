"""The naive peer over real HTTP: greedy text equal to generate(), streams bench.serve reads."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.peers.naive import create_app
from bench.peers.naive_model import NaiveGenerator
from bench.serve import LoadConfig, run_benchmark
from bench.workloads import WorkloadSpec
from tests.bench.servers import ThreadServer

PROMPT = "the red circle is left of"


@pytest.fixture(scope="module")
def gpt2_server(tiny_gpt2: Path) -> Iterator[ThreadServer]:
    with ThreadServer(create_app(NaiveGenerator(str(tiny_gpt2)))) as server:
        yield server


def _reference_text(folder: Path, max_tokens: int) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        output = model.generate(**inputs, do_sample=False, max_new_tokens=max_tokens)
    return str(tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))


def test_completion_is_greedy_generate_whole_and_streamed(
    gpt2_server: ThreadServer, tiny_gpt2: Path
) -> None:
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    with httpx.Client(base_url=gpt2_server.base_url, trust_env=False, timeout=60) as client:
        whole = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data:")]
    expected = _reference_text(tiny_gpt2, 8)
    assert expected.strip()
    assert whole["choices"][0]["text"] == expected
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data:")) for line in lines[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected
    assert whole["usage"]["completion_tokens"] <= 8


def test_bench_serve_reads_its_streams_with_usage(gpt2_server: ThreadServer) -> None:
    spec = WorkloadSpec("text", num_prompts=4, input_len=8, output_len=6, ignore_eos=True)
    load = LoadConfig(base_url=gpt2_server.base_url, max_concurrency=2)
    report = asyncio.run(run_benchmark(load, spec))
    assert (report.summary.completed, report.summary.errors) == (4, 0)
    assert report.summary.total_output_tokens == 24  # ignore_eos: exactly max_tokens each
    assert report.summary.ttft.p50 > 0


def test_image_chat_on_a_tiny_llava(tiny_llava: Path) -> None:
    spec = WorkloadSpec(
        "chat-image", num_prompts=2, output_len=4, ignore_eos=True, image_source="synthetic"
    )
    with ThreadServer(create_app(NaiveGenerator(str(tiny_llava)))) as server:
        report = asyncio.run(run_benchmark(LoadConfig(base_url=server.base_url), spec))
    assert (report.summary.completed, report.summary.errors) == (2, 0)
    assert report.summary.total_output_tokens == 8
    assert report.model == tiny_llava.name
