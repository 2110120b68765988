"""bench.compare: process lifecycle, the ratio table, and one real run against the naive peer."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import compare
from bench.compare import (
    ContenderRun,
    format_comparison,
    parse_args,
    run_workloads,
    same_outputs,
    stopping_rules,
)
from bench.compare import main as compare_main
from bench.peers.contenders import CONTENDERS
from bench.peers.process import ServerProcess, ServerStartError, free_port, group_members
from bench.serve import BenchReport, LoadConfig
from bench.stats import RequestResult, summarize
from bench.workloads import WorkloadSpec
from tests.bench.scripted import ScriptedServer
from tests.bench.servers import ThreadServer

# A server that forks a long-lived child first: stopping must reach the child too.
FORKING_SERVER = """
import http.server, subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ready).serve_forever()
"""


def test_stop_ends_the_server_and_its_children(tmp_path: Path) -> None:
    port = free_port()
    argv = [sys.executable, "-c", FORKING_SERVER, str(port)]
    server = ServerProcess(
        argv, dict(os.environ), f"http://127.0.0.1:{port}", "/ready", tmp_path / "s.log"
    )
    with server:
        server.wait_ready(deadline_s=60)
        assert server.process is not None
        group = server.process.pid
        assert len(group_members(group)) == 2  # the server and its child
    assert group_members(group) == []


def test_a_server_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('bad flag'); raise SystemExit(2)"]
    with (
        ServerProcess(
            argv, dict(os.environ), "http://127.0.0.1:9", "/ready", tmp_path / "x.log"
        ) as server,
        pytest.raises(ServerStartError, match="bad flag"),
    ):
        server.wait_ready(deadline_s=60)


def _report(name: str, tokens_per_request: int, ttft: float) -> BenchReport:
    results = [RequestResult(ok=True, ttft=ttft, e2e=1.0, output_tokens=tokens_per_request)] * 4
    return BenchReport(name, "m", WorkloadSpec(), LoadConfig("http://x"), summarize(results, 1.0))


def test_table_ratios_are_mmgpts_advantage() -> None:
    runs = [
        ContenderRun("mmgpt", [], {"text": _report("mmgpt", 30, ttft=0.05)}),
        ContenderRun("naive", [], {"text": _report("naive", 10, ttft=0.20)}),
        ContenderRun("transformers", [], failure="not ready after 600 s"),
    ]
    lines = format_comparison(runs, ["text"]).splitlines()
    naive_row = next(line for line in lines if " naive " in line).split()
    assert naive_row[5] == "3.00"  # x tok/s: 120 / 40
    assert naive_row[7] == "4.00"  # x TTFT: 200 ms / 50 ms
    assert "not ready after 600 s" in next(line for line in lines if "transformers" in line)


def test_compare_runs_the_naive_peer_end_to_end(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "compare.json"
    argv = ["--model", str(tiny_gpt2), "--contenders", "naive", "--threads", "1"]
    argv += [
        "--num-prompts",
        "3",
        "--max-concurrency",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "4",
    ]
    argv += ["--ignore-eos", "--log-dir", str(tmp_path / "logs"), "--json", str(out)]
    assert compare_main(argv) == 0
    report = json.loads(out.read_text())
    naive = report["contenders"][0]
    assert naive["name"] == "naive" and naive["failure"] == ""
    summary = naive["results"]["text"]["summary"]
    assert summary["completed"] == 3 and summary["total_output_tokens"] == 12
    assert report["machine"]["cores"] >= 1 and report["threads"] == 1


def test_the_report_keeps_each_contender_that_finished_before_a_later_one_hangs(
    tiny_gpt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run cut short by a time limit (say, on a lent GPU) still leaves the finished
    contenders in the JSON report."""
    out = tmp_path / "compare.json"

    def run_or_hang(contender: Any, args: Any) -> ContenderRun:
        if contender.name == "transformers":
            raise KeyboardInterrupt  # as a timeout's signal would end the run
        return ContenderRun(contender.name, [], {"text": _report(contender.name, 30, ttft=0.05)})

    monkeypatch.setattr(compare, "run_contender", run_or_hang)
    argv = ["--model", str(tiny_gpt2), "--contenders", "mmgpt,transformers", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        compare_main(argv)
    report = json.loads(out.read_text())
    assert [c["name"] for c in report["contenders"]] == ["mmgpt"]
    assert report["contenders"][0]["results"]["text"]["summary"]["completed"] == 4


@pytest.mark.parametrize("accepts", [True, False])
def test_ignore_eos_goes_only_to_contenders_that_accept_it(tiny_gpt2: Path, accepts: bool) -> None:
    args = parse_args(["--model", str(tiny_gpt2), "--num-prompts", "2", "--output-len", "2"])
    args.ignore_eos, args.num_warmups = True, 0
    contender = dataclasses.replace(CONTENDERS["naive"], accepts_ignore_eos=accepts)
    scripted = ScriptedServer()
    with ThreadServer(scripted.app) as server:
        reports = run_workloads(contender, args, server.base_url)
    assert reports["text"].summary.completed == 2
    assert all(("ignore_eos" in body) == accepts for body in scripted.bodies)


def test_ban_eos_speaks_each_contenders_own_fields(tiny_llava: Path) -> None:
    argv = ["--model", str(tiny_llava), "--contenders", "mmgpt,transformers", "--ban-eos"]
    args = parse_args([*argv, "--output-len", "6", "--ignore-eos"])
    spec = WorkloadSpec("chat-image", output_len=6, ignore_eos=True)
    mmgpt = stopping_rules(CONTENDERS["mmgpt"], spec, args)
    assert mmgpt.extra_body == {"min_tokens": 6} and not mmgpt.ignore_eos
    peer = stopping_rules(CONTENDERS["transformers"], spec, args)
    image_token = json.loads((tiny_llava / "config.json").read_text())["image_token_index"]
    rules = json.loads(peer.extra_body["generation_config"])
    assert rules == {"min_new_tokens": 6, "suppress_tokens": [image_token]}
    assert not peer.ignore_eos


def test_llama_server_gets_a_slot_per_stream_and_its_own_stop_rule(tiny_gpt2: Path) -> None:
    """llama-server splits --ctx-size among --parallel slots: one slot per stream, each long
    enough for a prompt and its answer; --ban-eos speaks its ignore_eos; its extra flags
    arrive under their dashed name."""
    argv = ["--model", str(tiny_gpt2), "--contenders", "mmgpt,llama.cpp-q8", "--ban-eos"]
    extra = "--llama.cpp-q8-args=--mlock"
    args = parse_args([*argv, "--max-concurrency", "12", "--input-len", "100", extra])
    settings = compare.launch_settings(args)
    assert settings.parallel == 12 and settings.context >= 100 + args.output_len
    assert settings.extra_args["llama.cpp-q8"] == "--mlock"
    spec = stopping_rules(CONTENDERS["llama.cpp-q8"], WorkloadSpec("text", output_len=5), args)
    assert spec.extra_body == {"ignore_eos": True}


def test_ban_eos_refuses_a_contender_that_cannot_be_told(
    tiny_gpt2: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mute = dataclasses.replace(CONTENDERS["naive"], ban_eos_fields=None)
    monkeypatch.setitem(CONTENDERS, "naive", mute)
    with pytest.raises(SystemExit):
        parse_args(["--model", str(tiny_gpt2), "--contenders", "mmgpt,naive", "--ban-eos"])


def test_same_outputs_counts_equal_texts_of_requests_both_answered() -> None:
    def result(text: str, ok: bool = True) -> RequestResult:
        return RequestResult(ok=ok, text=text)

    base = [result("a b"), result("c"), result("d"), result("e", ok=False)]
    other = [result("a b"), result("x"), result("", ok=False), result("e")]
    assert same_outputs(base, other) == "1/2"


def test_the_table_says_how_many_outputs_equal_mmgpts() -> None:
    def report(texts: list[str]) -> BenchReport:
        results = [
            RequestResult(ok=True, ttft=0.1, e2e=1.0, output_tokens=2, text=t) for t in texts
        ]
        summary = summarize(results, 1.0)
        return BenchReport("r", "m", WorkloadSpec(), LoadConfig("http://x"), summary, [], results)

    runs = [
        ContenderRun("mmgpt", [], {"text": report(["a", "b", "c"])}),
        ContenderRun("transformers", [], {"text": report(["a", "b", "x"])}),
    ]
    lines = format_comparison(runs, ["text"]).splitlines()
    assert lines[0].split()[-1] == "same"
    assert next(line for line in lines if " mmgpt " in line).split()[-1] == "-"
    assert next(line for line in lines if "transformers" in line).split()[-1] == "2/3"


def test_mmgpt_and_transformers_serve_give_the_same_image_chat_outputs(
    bench_qwen_vl: Path, tmp_path: Path
) -> None:
    """Both servers on the tiny Qwen2.5-VL, images of mixed sizes (two in the fourth
    request), EOS banned: every request gets its max_tokens, and the same text."""
    out = tmp_path / "compare.json"
    argv = ["--model", str(bench_qwen_vl), "--contenders", "mmgpt,transformers", "--threads", "1"]
    argv += ["--workloads", "chat-image-mixed", "--num-prompts", "4", "--max-concurrency", "2"]
    argv += ["--output-len", "6", "--ban-eos", "--num-warmups", "0", "--json", str(out)]
    argv += ["--log-dir", str(tmp_path / "logs")]
    assert compare_main(argv) == 0
    contenders = json.loads(out.read_text())["contenders"]
    texts = []
    for contender in contenders:
        requests = contender["results"]["chat-image-mixed"]["requests"]
        assert [r["output_tokens"] for r in requests] == [6] * 4, contender["name"]
        texts.append([r["text"] for r in requests])
    assert texts[0] == texts[1] and all(texts[0])
