"""Where one decode step spends its time: ms per step, aten ops per step, top ops by self time.

For each batch size, B requests with the same prompt length are prefilled, decoded for a
few warm-up steps, then `--steps` decode steps are timed (best of `--repeats` runs of them)
and the same number profiled with torch.profiler (`EngineCore.step`: planning, the model,
the sampler). 1-thread numbers are stable on a busy machine; 2-thread ones are not.

    python -m bench.step_profile --model llama-135m --batch-sizes 1 32 --threads 1
    python -m bench.step_profile --model gpt2-tiny --batch-sizes 1 --top 30
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from app.engine.config import EngineConfig
from app.engine.engine_core import EngineCore
from app.engine.sequence import SamplingParams
from bench.engine_offline import prompts, resolve_model
from models import load_model
from models.base import LoadedModel

WARMUP_STEPS = 8  # after the prefill: the first decode steps allocate and calibrate


@dataclass
class StepProfile:
    batch_size: int
    ms_per_step: float
    ops_per_step: float  # aten ops of every depth, per step
    self_ms_per_step: float  # self CPU of every aten op, per step
    top_ops: list[tuple[str, float, float]]  # (name, self ms per step, calls per step)


def decoding_core(loaded: LoadedModel, batch_size: int, prompt_len: int, steps: int) -> EngineCore:
    """An engine with `batch_size` sequences past their prefill and warm-up, with `steps`
    decode steps left."""
    new_tokens = WARMUP_STEPS + steps + 1
    tokens_per_seq = prompt_len + new_tokens + 32  # 32: a block of slack
    config = EngineConfig(
        model=loaded.path,
        max_num_seqs=batch_size,
        max_num_batched_tokens=max(2048, batch_size * prompt_len),
        kv_cache_bytes=batch_size * tokens_per_seq * loaded.info.kv_bytes_per_token(),
    )
    core = EngineCore(config, loaded)
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts(loaded, batch_size, prompt_len, seed=0)):
        core.add_request(f"r{i}", prompt, params)
    for _ in range(WARMUP_STEPS):
        core.step()
    return core


def time_steps(core: EngineCore, steps: int, repeats: int) -> float:
    """Best ms per step over `repeats` runs of `steps` steps."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            core.step()
        best = min(best, (time.perf_counter() - started) / steps)
    return 1000 * best


def profile_steps(core: EngineCore, steps: int, top: int) -> tuple[float, float, list]:
    """aten ops and their self CPU ms per step, and the `top` ops by self CPU time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            core.step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    ops = sum(e.count for e in events) / steps
    self_ms = sum(e.self_cpu_time_total for e in events) / 1000 / steps
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    rows = [(e.key, e.self_cpu_time_total / 1000 / steps, e.count / steps) for e in events[:top]]
    return ops, self_ms, rows


def profile_batch(loaded: LoadedModel, batch_size: int, args: argparse.Namespace) -> StepProfile:
    core = decoding_core(loaded, batch_size, args.prompt_len, args.steps * (args.repeats + 1))
    ms = time_steps(core, args.steps, args.repeats)
    ops, self_ms, top_ops = profile_steps(core, args.steps, args.top)
    return StepProfile(batch_size, ms, ops, self_ms, top_ops)


def print_profile(result: StepProfile) -> None:
    print(f"\nB={result.batch_size}: {result.ms_per_step:.2f} ms/step, "
          f"{result.ops_per_step:.0f} aten ops/step")  # fmt: skip
    print("| op | self ms/step | share | calls/step |\n|---|---|---|---|")
    total = result.self_ms_per_step or 1.0
    for name, ms, calls in result.top_ops:
        print(f"| {name} | {ms:.3f} | {100 * ms / total:.1f}% | {calls:.0f} |")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama-135m")
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="decode steps timed and profiled")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best counts")
    parser.add_argument("--top", type=int, default=15, help="ops listed by self time")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quantization", default="none", choices=["none", "int8"])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mmgpt-bench"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_model(
        resolve_model(args.model, args.cache_dir),
        dtype=args.dtype,
        quantization=args.quantization,
    )
    print(f"{args.model}, torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
          f"quantization {args.quantization}, "
          f"prompt {args.prompt_len}, {args.steps} steps; share of all aten self time")  # fmt: skip
    for batch_size in args.batch_sizes:
        print_profile(profile_batch(loaded, batch_size, args))


if __name__ == "__main__":
    main()
