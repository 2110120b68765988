"""One stream's speed as a share of the bare decode loop, in alternating windows.

    python -m bench.loop_share --model /tmp/mmgpt-bench/gpt2-tiny --threads 2 --rounds 10

On a shared host, a model whose weights live in the last-level cache decodes at speeds
that swing twofold from one minute to the next, so a bare-loop figure and a server
figure taken minutes apart say more about the neighbours than about the server. Here
the servers start first and stay up (idle, they sleep); each round runs the bare loop
(bench.ceiling's, batch 1), then `--requests` streamed requests, one after another, to
each server in turn: every server figure has a loop figure from the same few seconds.
The share is the server's output tokens/s (time to first token included, as
bench.compare counts it) over the loop's decode tokens/s (bench.ceiling's figure), per
round and as the median of the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench import ceiling
from bench.client import run_async, send_request, session
from bench.compare import CONTEXT_MARGIN
from bench.peers.contenders import (
    CONTENDERS,
    LaunchSettings,
    command_line,
    server_env,
)
from bench.peers.process import ServerProcess, free_port
from bench.serve import discover_model
from bench.workloads import BenchRequest, WorkloadSpec, build_requests


@dataclass
class Server:
    name: str
    base_url: str
    model_id: str = ""
    tokens_per_s: list[float] = field(default_factory=list)  # one per round


async def window(server: Server, requests: Sequence[BenchRequest]) -> float:
    """Output tokens/s of the requests sent one after another (none fails unnoticed)."""
    async with session(1, 300.0) as client:
        if not server.model_id:
            server.model_id = await discover_model(client, server.base_url)
        start, tokens = time.perf_counter(), 0
        for request in requests:
            result = await send_request(client, server.base_url, server.model_id, request)
            if not result.ok:
                raise RuntimeError(f"{server.name}: {result.error}")
            tokens += result.output_tokens
        return tokens / (time.perf_counter() - start)


def bare_loop_tokens_per_s(loop: ceiling.BareLoop, args: argparse.Namespace) -> float:
    """The loop's decode tokens/s, the mean of `--loop-repeats` generations."""
    runs = [
        ceiling.measure_decode(loop, "float32", 1, args.input_len, args.output_len)
        for _ in range(args.loop_repeats)
    ]
    return statistics.mean(run.decode_tokens_per_s for run in runs)


def start_servers(args: argparse.Namespace, stack: ExitStack) -> list[Server]:
    servers = []
    for name in args.contenders:
        settings = LaunchSettings(
            model=args.model,
            port=free_port(),
            threads=args.threads,
            extra_args={name: getattr(args, f"{name.replace('-', '_')}_args")},
            context=args.input_len + args.output_len + CONTEXT_MARGIN,
        )
        argv = command_line(CONTENDERS[name], settings)
        base_url = f"http://{settings.host}:{settings.port}"
        print(f"--- {name}: {' '.join(argv)}", flush=True)
        process = ServerProcess(
            argv, server_env(args.threads), base_url, CONTENDERS[name].ready_path,
            args.log_dir / f"{name}.log",
        )  # fmt: skip
        stack.enter_context(process)
        process.wait_ready(args.startup_timeout)
        servers.append(Server(name, base_url))
    return servers


def run_rounds(args: argparse.Namespace, servers: list[Server]) -> list[float]:
    torch.set_num_threads(args.threads)
    loop = ceiling.load_bare_loop(args.model, torch.float32)
    spec = WorkloadSpec(
        num_prompts=args.requests,
        input_len=args.input_len,
        output_len=args.output_len,
        ignore_eos=True,
        tokenizer=args.model,
    )
    requests = build_requests(spec)
    for server in servers:  # first requests: connections, caches, the first compile
        run_async(window(server, requests[:1]))
    loop_speeds = []
    for number in range(1, args.rounds + 1):
        loop_speeds.append(bare_loop_tokens_per_s(loop, args))
        cells = [f"round {number:>2}: bare loop {loop_speeds[-1]:8.1f}"]
        for server in servers:
            server.tokens_per_s.append(run_async(window(server, requests)))
            share = server.tokens_per_s[-1] / loop_speeds[-1]
            cells.append(f"{server.name} {server.tokens_per_s[-1]:8.1f} ({share:4.0%})")
        print("   ".join(cells), flush=True)
    return loop_speeds


def format_table(loop_speeds: list[float], servers: list[Server]) -> str:
    lines = [
        "| contender | tok/s, median | bare loop tok/s, median | share, median | share, range |",
        "|---|---|---|---|---|",
    ]
    for server in servers:
        shares = [s / b for s, b in zip(server.tokens_per_s, loop_speeds, strict=True)]
        lines.append(
            f"| {server.name} | {statistics.median(server.tokens_per_s):,.1f} "
            f"| {statistics.median(loop_speeds):,.1f} | {statistics.median(shares):.0%} "
            f"| {min(shares):.0%}–{max(shares):.0%} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a GPT-2 or Llama checkpoint folder")
    parser.add_argument(
        "--contenders", default="mmgpt", help="comma-separated, from bench.compare's"
    )
    parser.add_argument("--threads", type=int, default=2, help="for the loop and every server")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--requests", type=int, default=4, help="per server and round")
    parser.add_argument("--loop-repeats", type=int, default=2, help="loop generations a round")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: tmp)")
    for name in CONTENDERS:
        parser.add_argument(f"--{name}-args", default="", help=f"extra flags for {name}")
    args = parser.parse_args(argv)
    args.contenders = [name for name in args.contenders.split(",") if name]
    unknown = [name for name in args.contenders if name not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {sorted(CONTENDERS)}")
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="mmgpt-loop-share-"))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print("$ python -m bench.loop_share " + " ".join(sys.argv[1:] if argv is None else argv))
    with ExitStack() as stack:
        servers = start_servers(args, stack)
        loop_speeds = run_rounds(args, servers)
    print(format_table(loop_speeds, servers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
