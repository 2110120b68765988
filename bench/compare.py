"""Side-by-side serving comparison on one checkpoint: mmgpt against its peers.

    python -m bench.compare --model /tmp/mmgpt-bench/gpt2-tiny --workloads text \\
        --num-prompts 128 --max-concurrency 32 --input-len 32 --output-len 64 --ignore-eos

Each contender (mmgpt, `transformers serve --continuous-batching`, the naive
`generate()` server, llama.cpp's `llama-server` on the checkpoint as f32 or Q8_0 GGUF:
`llama.cpp`, `llama.cpp-q8`) is started in turn on loopback with the same thread
settings (bench.peers.contenders), warmed up, sent the identical request sets,
and stopped with its whole process group. The table reports ratios against mmgpt:
"x tok/s" is mmgpt's output tokens/s over the contender's, "x TTFT" is the
contender's p50 TTFT over mmgpt's; above 1 means mmgpt is ahead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import ceiling
from bench.client import run_async
from bench.machine import machine_info
from bench.peers.contenders import (
    CONTENDERS,
    Contender,
    LaunchSettings,
    command_line,
    ensure_hub_cache,
    image_placeholder_ids,
    server_env,
)
from bench.peers.process import ServerProcess, ServerStartError, free_port
from bench.serve import BenchReport, add_workload_args, load_config, run_benchmark, workload_spec
from bench.stats import RequestResult
from bench.workloads import WORKLOADS, WorkloadSpec

CONTEXT_MARGIN = 256  # a chat template's and an image's tokens beyond --input-len


@dataclass
class ContenderRun:
    name: str
    command: list[str]
    reports: dict[str, BenchReport] = field(default_factory=dict)
    failure: str = ""  # why it did not start or stopped answering


def launch_settings(args: argparse.Namespace) -> LaunchSettings:
    extra = {name: getattr(args, f"{name.replace('-', '_')}_args") for name in CONTENDERS}
    return LaunchSettings(
        model=args.model,
        port=free_port(),
        threads=args.threads,
        dtype=args.dtype,
        device=args.device,
        extra_args=extra,
        parallel=args.max_concurrency or args.num_prompts,
        context=args.input_len + args.output_len + CONTEXT_MARGIN,
    )


def run_workloads(
    contender: Contender, args: argparse.Namespace, base_url: str
) -> dict[str, BenchReport]:
    """Every requested workload this contender's API serves, in the order given."""
    reports = {}
    for name in args.workloads:
        if name not in contender.workloads:
            continue
        spec = stopping_rules(contender, workload_spec(args, name), args)
        # the checkpoint folder, for a server that lists no model for it
        load = dataclasses.replace(load_config(args, base_url, None), unlisted_model=args.model)
        reports[name] = run_async(run_benchmark(load, spec, contender.name))
    return reports


def stopping_rules(
    contender: Contender, spec: WorkloadSpec, args: argparse.Namespace
) -> WorkloadSpec:
    """`--ban-eos` in the contender's own request fields; else `--ignore-eos` where it is
    accepted."""
    if args.ban_eos:
        assert contender.ban_eos_fields is not None  # parse_args refuses such contenders
        fields = contender.ban_eos_fields(spec.output_len, image_placeholder_ids(args.model))
        return dataclasses.replace(spec, ignore_eos=False, extra_body=spec.extra_body | fields)
    if not contender.accepts_ignore_eos:
        return dataclasses.replace(spec, ignore_eos=False)
    return spec


def run_contender(contender: Contender, args: argparse.Namespace) -> ContenderRun:
    """Start, wait for readiness, run the workloads, and stop (whatever happens)."""
    settings = launch_settings(args)
    argv = command_line(contender, settings)
    run = ContenderRun(contender.name, argv)
    base_url = f"http://{settings.host}:{settings.port}"
    log_path = args.log_dir / f"{contender.name}.log"
    print(f"--- {contender.name}: {' '.join(argv)}  (log: {log_path})", flush=True)
    env = server_env(args.threads)
    with ServerProcess(argv, env, base_url, contender.ready_path, log_path) as server:
        try:
            server.wait_ready(args.startup_timeout)
        except ServerStartError as exc:
            run.failure = str(exc)
            return run
        run.reports = run_workloads(contender, args, base_url)
    return run


def _ratio(numerator: float, denominator: float) -> str:
    if not (denominator > 0 and numerator > 0) or math.isnan(numerator + denominator):
        return "-"
    return f"{numerator / denominator:.2f}"


def same_outputs(base: Sequence[RequestResult], other: Sequence[RequestResult]) -> str:
    """How many requests, of those both answered, have the same output text: "k/n"."""
    pairs = [(b.text, o.text) for b, o in zip(base, other, strict=True) if b.ok and o.ok]
    return f"{sum(b == o for b, o in pairs)}/{len(pairs)}"


def _row(workload: str, name: str, report: BenchReport, base: BenchReport | None) -> str:
    summary = report.summary
    tput = _ratio(base.summary.output_throughput, summary.output_throughput) if base else "-"
    ttft = _ratio(summary.ttft.p50, base.summary.ttft.p50) if base else "-"
    same = same_outputs(base.results, report.results) if base and base is not report else "-"
    return (
        f"{workload:<17}{name:<14}{summary.completed:>5}/{summary.errors:<4}"
        f"{summary.request_throughput:>8.2f}{summary.output_throughput:>11.1f}{tput:>8}"
        f"{summary.ttft.p50:>10.1f}{ttft:>8}{summary.tpot.p50:>10.2f}{summary.e2e.p50:>10.1f}"
        f"{summary.mean_output_tokens:>9.1f}{same:>8}"
    )


def format_comparison(runs: Sequence[ContenderRun], workloads: Sequence[str]) -> str:
    header = (
        f"{'workload':<17}{'contender':<14}{'ok/err':<10}{'req/s':>8}{'tok/s':>11}{'x tok/s':>8}"
        f"{'TTFT p50':>10}{'x TTFT':>8}{'TPOT p50':>10}{'E2E p50':>10}{'out/req':>9}{'same':>8}"
    )
    lines = [header, "-" * len(header)]
    mmgpt = next((run for run in runs if run.name == "mmgpt"), None)
    for workload in workloads:
        base = mmgpt.reports.get(workload) if mmgpt else None
        for run in runs:
            if workload in run.reports:
                lines.append(_row(workload, run.name, run.reports[workload], base))
            else:
                lines.append(f"{workload:<17}{run.name:<14}{run.failure[:60] or 'not served'}")
    lines.append(
        "times in ms; x = mmgpt's advantage (tok/s: mmgpt / peer; TTFT: peer / mmgpt); "
        "same = output text equal to mmgpt's"
    )
    return "\n".join(lines)


def run_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    """The bare decode loop and matmul speeds, measured before any server starts."""
    model_type = json.loads((Path(args.model) / "config.json").read_text()).get("model_type")
    if model_type not in ("gpt2", "llama"):
        print(f"ceiling: the bare decode loops read GPT-2 and Llama checkpoints, not {model_type}")
        return {}
    torch.set_num_threads(args.threads)  # the contenders' thread count
    dtypes = [args.dtype or "float32"]
    matmuls = ceiling.measure_matmuls(dtypes, 2048, 768, args.ceiling_batch_sizes, 0.5)
    decodes = ceiling.measure_decode_loops(
        args.model, dtypes, args.ceiling_batch_sizes, args.input_len, args.output_len
    )
    print(ceiling.format_matmuls(matmuls))
    print(ceiling.format_decodes(decodes), flush=True)
    return ceiling.report_dict(matmuls, decodes)


def _csv(text: str) -> list[str]:
    return [part for part in text.split(",") if part]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder every contender serves")
    parser.add_argument("--contenders", type=_csv, default=["mmgpt", "transformers", "naive"])
    parser.add_argument("--workloads", type=_csv, default=["text"], help=", ".join(WORKLOADS))
    parser.add_argument("--threads", type=int, default=len(_cores()), help="for every contender")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16; default: each's own")
    parser.add_argument("--device", default=None, help="cpu or cuda; default: each's own")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to /ready")
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: tmp)")
    parser.add_argument("--ceiling", action="store_true", help="also run the bare decode loop")
    parser.add_argument("--ceiling-batch-sizes", type=ceiling.int_list, default=[1, 8, 32, 64])
    for name in CONTENDERS:
        parser.add_argument(f"--{name}-args", default="", help=f"extra flags for {name}")
    parser.add_argument(
        "--ban-eos",
        action="store_true",
        help="EOS and image placeholders unsamplable before --output-len, by each one's own "
        "request fields (see bench.peers.contenders): equal lengths, comparable outputs",
    )
    add_workload_args(parser)
    parser.set_defaults(num_warmups=2)
    args = parser.parse_args(argv)
    args.tokenizer = args.tokenizer or args.model
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="mmgpt-compare-"))
    unknown = [name for name in args.contenders if name not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {sorted(CONTENDERS)}")
    unable = [name for name in args.contenders if CONTENDERS[name].ban_eos_fields is None]
    if args.ban_eos and unable:
        parser.error(f"--ban-eos: {', '.join(unable)} cannot be told to ban EOS")
    return args


def _cores() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else {0}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = "python -m bench.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"$ {command}\nthreads per contender: {args.threads}", flush=True)
    ceiling_report = run_ceiling(args) if args.ceiling else None
    ensure_hub_cache()
    runs: list[ContenderRun] = []
    for name in args.contenders:
        runs.append(run_contender(CONTENDERS[name], args))
        if args.json is not None:  # after each contender: a run cut short keeps what finished
            args.json.write_text(json.dumps(_report(command, args, runs, ceiling_report), indent=2))
    print(format_comparison(runs, args.workloads))
    for run in runs:
        for report in run.reports.values():
            for note in report.notes():
                print(f"{run.name} {report.workload.name}: {note}")
    return 0 if all(run.reports for run in runs) else 1


def _report(
    command: str, args: argparse.Namespace, runs: Sequence[ContenderRun], ceiling_report: Any
) -> dict[str, Any]:
    return {
        "command": command,
        "machine": machine_info(),
        "threads": args.threads,
        "ceiling": ceiling_report,
        "contenders": [
            {
                "name": run.name,
                "command": run.command,
                "failure": run.failure,
                "results": {name: report.to_dict() for name, report in run.reports.items()},
            }
            for run in runs
        ],
    }


if __name__ == "__main__":
    raise SystemExit(main())
