"""Throughput of streams spread over several LoRA adapters, against the base model alone.

`--streams` greedy requests (the same prompt length, EOS ignored) are submitted at once to
an offline EngineCore and decoded to `--new-tokens` each; the streams are dealt round-robin
over N adapters of rank `--rank` on every decoder projection (random values, written by
peft into `--cache-dir`). "base" is the engine without adapter slots; "0" has the slots
but every stream asks for the base model (the cost of the slots alone). Runs alternate,
the best of `--repeats` is kept; compare numbers within one run only.

    python -m bench.lora_adapters                              # the shipped model
    python -m bench.lora_adapters --model llama-135m --adapters 1 4 8 --threads 2 --repeats 3
    python -m bench.lora_adapters --model llama-tiny --streams 8 --new-tokens 8   # rehearsal
    python -m bench.lora_adapters --count-ops --threads 1   # aten ops of one decode step
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from app.engine.config import EngineConfig
from app.engine.engine_core import EngineCore
from app.engine.sequence import SamplingParams
from bench.engine_offline import prompts, resolve_model
from models import load_model

BASE = -1  # the row without adapter slots


def make_adapters(folder: Path, count: int, rank: int, cache_dir: Path) -> list[Path]:
    """`count` random PEFT adapters of `rank` on every decoder projection of `folder`."""
    from models.finetune import FinetuneConfig
    from models.finetune.lora import add_lora, load_base_model

    made = []
    for index in range(count):
        out = cache_dir / f"{folder.name}-lora-r{rank}-{index}"
        if not (out / "adapter_config.json").exists():
            model = load_base_model(folder, "cpu")
            config = FinetuneConfig(folder, out, out, rank=rank, alpha=2 * rank)
            peft_model = add_lora(model, config)  # peft's own wrapping, as `mmgpt finetune`
            generator = torch.Generator().manual_seed(index)
            with torch.no_grad():
                for name, param in peft_model.named_parameters():
                    if "lora_" in name:
                        param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            peft_model.save_pretrained(str(out))
        made.append(out)
    return made


def prepared_core(
    folder: Path, adapters: list[Path] | None, batch: list[list[int]], args: argparse.Namespace
) -> EngineCore:
    """An engine holding the batch, streams dealt over `adapters` (None: no adapter slots,
    []: slots, but only the base model asked)."""
    loaded = load_model(folder, "cpu", torch.float32)  # fresh: slots wrap the model's products
    modules = tuple((f"a{i}", str(path)) for i, path in enumerate(adapters or []))
    per_seq = len(batch[0]) + args.new_tokens + args.block_size
    config = EngineConfig(
        model=loaded.path,
        block_size=args.block_size,
        max_num_seqs=len(batch),
        max_num_batched_tokens=max(2048, len(batch) * len(batch[0])),
        kv_cache_bytes=len(batch) * per_seq * loaded.info.kv_bytes_per_token(),
        enable_lora=adapters is not None,
        max_loras=max(len(modules), 1),
        max_lora_rank=args.rank,
        lora_modules=modules,
    )
    core = EngineCore(config, loaded)
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(batch):
        adapter = modules[i % len(modules)][0] if modules else None
        core.add_request(f"r{i}", prompt, params, adapter_name=adapter)
    return core


def run(
    folder: Path, adapters: list[Path] | None, batch: list[list[int]], args: argparse.Namespace
) -> tuple[float, float]:
    """Tokens/s and ms per step of the whole batch."""
    core = prepared_core(folder, adapters, batch, args)
    start = time.perf_counter()
    generated = 0
    while core.has_unfinished:
        generated += sum(len(output.token_ids) for _, output in core.step())
    elapsed = time.perf_counter() - start
    return generated / elapsed, 1000 * elapsed / core.num_steps


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def decode_step_ops(
    folder: Path, adapters: list[Path] | None, batch: list[list[int]], args: argparse.Namespace
) -> int:
    """aten ops of one decode step of every stream, the prompts done: a count that does not
    depend on the machine's load."""
    core = prepared_core(folder, adapters, batch, args)
    while any(not seq.is_decoding for seq in core.scheduler.running) or core.scheduler.waiting:
        core.step()
    counter = _OpCounter()
    with counter:
        core.step()
    return counter.count


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default", help="as bench.engine_offline names them")
    parser.add_argument("--adapters", nargs="+", type=int, default=[0, 1, 4, 8])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs; best is kept")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mmgpt-bench"))
    parser.add_argument(
        "--count-ops", action="store_true", help="aten ops of one decode step instead of timing"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model, args.cache_dir)
    pool = make_adapters(folder, max(args.adapters), args.rank, args.cache_dir)
    batch = prompts(load_model(folder), args.streams, args.prompt_len, seed=0)
    counts = [BASE, *args.adapters]
    if args.count_ops:
        for count in counts:
            ops = decode_step_ops(folder, None if count == BASE else pool[:count], batch, args)
            print(f"{'base' if count == BASE else count} adapters: {ops} aten ops per decode step")
        return
    best = {count: (0.0, float("inf")) for count in counts}
    for _ in range(args.repeats):
        for count in counts:
            tps, ms = run(folder, None if count == BASE else pool[:count], batch, args)
            best[count] = (max(best[count][0], tps), min(best[count][1], ms))
    print(f"{folder.name}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.streams} streams, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"rank {args.rank}, best of {args.repeats}")  # fmt: skip
    print(f"| {'adapters':>8} | {'tok/s':>8} | {'ms/step':>8} | {'vs base':>7} |")
    print(f"|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 9}|")
    for count, (tps, ms) in best.items():
        label = "base" if count == BASE else str(count)
        print(f"| {label:>8} | {tps:8,.0f} | {ms:8.2f} | {tps / best[BASE][0]:6.2f}x |")


if __name__ == "__main__":
    main()
