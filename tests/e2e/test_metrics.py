"""The Prometheus exposition of a real server: every family, moving as requests happen."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import httpx
import pytest

from tests.api.images import data_url, scene_png
from tests.e2e.conftest import metric, metrics_text, wait_idle

# The families operators and the dashboard rely on, as the text format names them.
HISTOGRAMS = (
    "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
    "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
    "image_preprocess_seconds", "engine_step_seconds", "batch_tokens", "request_prompt_tokens",
    "request_generation_tokens",
)  # fmt: skip
GAUGES = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_ratio", "model_info")
COUNTERS = (
    "prompt_tokens", "generation_tokens", "request_success", "request_failure",
    "prefix_cache_queries", "prefix_cache_hits", "image_cache_queries", "image_cache_hits",
    "images", "num_preemptions", "http_requests",
)  # fmt: skip
ISSUED_FAMILIES = (
    *(f"mmgpt_{name}" for name in HISTOGRAMS + GAUGES),
    *(f"mmgpt_{name}_total" for name in COUNTERS),
)


def _chat_about_the_image(leading_text: str, image_url: str) -> dict[str, Any]:
    """Text before the image changes the prefix, so the image must be embedded again:
    the image cache, not the prefix cache, is what can spare the vision tower."""
    content = [
        {"type": "text", "text": leading_text},
        {"type": "image_url", "image_url": {"url": image_url}},
    ]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}


def test_every_collector_is_exported(http: httpx.Client) -> None:
    http.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2})
    text = wait_idle(http)
    for family in ISSUED_FAMILIES:
        assert f"# TYPE {family} " in text, family


def test_families_move_as_requests_happen(http: httpx.Client) -> None:
    before = wait_idle(http)
    image_url = data_url(scene_png(44, 36))  # a size no other test sends: a new image
    for leading_text in ("first look", "second look, other words"):
        response = http.post(
            "/v1/chat/completions", json=_chat_about_the_image(leading_text, image_url)
        )
        assert response.status_code == 200, response.text
    bad = http.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})
    assert bad.status_code == 400
    after = wait_idle(http)

    def rose(name: str, by: float = 1, **labels: str) -> bool:
        return metric(after, name, **labels) >= metric(before, name, **labels) + by

    assert rose("mmgpt_time_to_first_token_seconds_count", 2)
    assert rose("mmgpt_e2e_request_latency_seconds_count", 2)
    assert rose("mmgpt_image_cache_queries_total", 2)
    assert rose("mmgpt_image_cache_hits_total", 1)
    assert rose("mmgpt_images_total", 2)
    assert rose("mmgpt_generation_tokens_total", 2)
    assert rose("mmgpt_request_failure_total", 1, endpoint="completions", reason="validation")
    assert metric(after, "mmgpt_num_requests_running") == 0
    assert metric(after, "mmgpt_kv_cache_usage_ratio") == 0


@pytest.mark.skipif(
    shutil.which("promtool") is None and not os.environ.get("CI"),
    reason="promtool is not installed (Debian package prometheus)",
)
def test_exposition_passes_promtool(http: httpx.Client) -> None:
    completed = subprocess.run(
        ["promtool", "check", "metrics"],
        input=metrics_text(http),
        capture_output=True,
        text=True,
        check=False,
    )
    # promtool exits 0 with lint notes only for style; any error makes it fail.
    assert completed.returncode == 0, completed.stdout + completed.stderr
