"""The machine's limits, measured in the same run as the serving numbers.

    python -m bench.ceiling --model /tmp/mmgpt-bench/gpt2-small --batch-sizes 1,8,32,64

Prints matmul GFLOP/s (a square matmul and the decode-shaped [B, hidden] x
[hidden, 4*hidden] at each batch size) in fp32 and bf16, then the tokens/s of
the bare static-batch decode loop (bench.gpt2_loop or bench.llama_loop, by the
checkpoint's model_type) at each batch size.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench import gpt2_loop, llama_loop

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def time_call(fn: Callable[[], object], min_seconds: float, min_calls: int = 3) -> float:
    """Seconds per call, after one warm-up call, over at least `min_seconds`."""
    fn()
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls


@dataclass(frozen=True)
class MatmulResult:
    dtype: str
    shape: str  # "M x K x N"
    gflops: float


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, min_seconds: float) -> float:
    left, right = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    seconds = time_call(lambda: torch.mm(left, right), min_seconds)
    return 2.0 * m * k * n / seconds / 1e9


def measure_matmuls(
    dtypes: Sequence[str], square: int, hidden: int, batch_sizes: Sequence[int], min_seconds: float
) -> list[MatmulResult]:
    shapes = [(square, square, square)] + [(b, hidden, 4 * hidden) for b in batch_sizes]
    return [
        MatmulResult(name, f"{m} x {k} x {n}", matmul_gflops(m, k, n, DTYPES[name], min_seconds))
        for name in dtypes
        for m, k, n in shapes
    ]


@dataclass(frozen=True)
class DecodeResult:
    dtype: str
    batch_size: int
    prompt_len: int
    new_tokens: int
    prefill_s: float
    decode_s: float

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens of the decode steps alone (the first token comes from the prefill)."""
        return self.batch_size * (self.new_tokens - 1) / self.decode_s

    @property
    def total_tokens_per_s(self) -> float:
        return self.batch_size * self.new_tokens / (self.prefill_s + self.decode_s)


@dataclass(frozen=True)
class BareLoop:
    """A bare decode loop (bench.gpt2_loop or bench.llama_loop) over one checkpoint's weights."""

    weights: Any
    vocab_size: int
    new_cache: Callable[[Any, int, int], Any]  # (weights, batch, max_len) -> cache
    forward: Callable[[Any, Any, torch.Tensor, int], torch.Tensor]
    greedy_decode: Callable[[Any, torch.Tensor, int], torch.Tensor]


def load_bare_loop(model: str, dtype: torch.dtype) -> BareLoop:
    """bench.llama_loop for a Llama checkpoint, bench.gpt2_loop for any other (GPT-2)."""
    model_type = json.loads((Path(model) / "config.json").read_text()).get("model_type")
    if model_type == "llama":
        llama = llama_loop.load_llama(model, dtype)
        vocab = int(llama.lm_head.shape[0])
        return BareLoop(
            llama, vocab, llama_loop.StaticKVCache, llama_loop.forward, llama_loop.greedy_decode
        )
    gpt2 = gpt2_loop.load_gpt2(model, dtype)
    vocab = int(gpt2.token_embedding.shape[0])
    return BareLoop(
        gpt2, vocab, gpt2_loop.StaticKVCache, gpt2_loop.forward, gpt2_loop.greedy_decode
    )


@torch.inference_mode()
def measure_decode(
    loop: BareLoop, dtype: str, batch_size: int, prompt_len: int, new_tokens: int
) -> DecodeResult:
    """One warm-up generation, then a timed prefill and `new_tokens - 1` timed decode steps."""
    seed = torch.Generator().manual_seed(batch_size)
    prompt = torch.randint(0, loop.vocab_size, (batch_size, prompt_len), generator=seed)  # [B, P]
    loop.greedy_decode(loop.weights, prompt, 4)  # first-call allocations and kernel selection
    cache = loop.new_cache(loop.weights, batch_size, prompt_len + new_tokens)
    start = time.perf_counter()
    token = loop.forward(loop.weights, cache, prompt, 0).argmax(-1, keepdim=True)  # [B, 1]
    prefill_done = time.perf_counter()
    for step in range(1, new_tokens):
        position = prompt_len + step - 1
        token = loop.forward(loop.weights, cache, token, position).argmax(-1, keepdim=True)
    end = time.perf_counter()
    return DecodeResult(
        dtype, batch_size, prompt_len, new_tokens, prefill_done - start, end - prefill_done
    )


def measure_decode_loops(
    model: str, dtypes: Sequence[str], batch_sizes: Sequence[int], prompt_len: int, new_tokens: int
) -> list[DecodeResult]:
    results = []
    for name in dtypes:
        loop = load_bare_loop(model, DTYPES[name])
        results += [measure_decode(loop, name, b, prompt_len, new_tokens) for b in batch_sizes]
    return results


def format_matmuls(results: Sequence[MatmulResult]) -> str:
    lines = [f"{'dtype':<10}{'M x K x N':>24}{'GFLOP/s':>12}"]
    lines += [f"{r.dtype:<10}{r.shape:>24}{r.gflops:>12.1f}" for r in results]
    return "\n".join(lines)


def format_decodes(results: Sequence[DecodeResult]) -> str:
    lines = [f"{'dtype':<10}{'batch':>6}{'prefill ms':>12}{'decode tok/s':>14}{'total tok/s':>13}"]
    lines += [
        f"{r.dtype:<10}{r.batch_size:>6}{1000 * r.prefill_s:>12.1f}"
        f"{r.decode_tokens_per_s:>14.1f}{r.total_tokens_per_s:>13.1f}"
        for r in results
    ]
    return "\n".join(lines)


def report_dict(
    matmuls: Sequence[MatmulResult], decodes: Sequence[DecodeResult]
) -> dict[str, object]:
    decode_rows = [
        asdict(r)
        | {"decode_tokens_per_s": r.decode_tokens_per_s, "total_tokens_per_s": r.total_tokens_per_s}
        for r in decodes
    ]
    return {
        "threads": torch.get_num_threads(),
        "matmuls": [asdict(r) for r in matmuls],
        "decode": decode_rows,
    }


def int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", default=None, help="GPT-2 or Llama checkpoint folder for the bare decode loop"
    )
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 8, 32, 64])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--square", type=int, default=2048, help="side of the square matmul")
    parser.add_argument("--hidden", type=int, default=768, help="K of the decode-shaped matmuls")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="per matmul measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [name for name in args.dtypes.split(",") if name]
    print("$ python -m bench.ceiling " + " ".join(sys.argv[1:] if argv is None else argv))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    matmuls = measure_matmuls(dtypes, args.square, args.hidden, args.batch_sizes, args.min_seconds)
    print(format_matmuls(matmuls))
    decodes: list[DecodeResult] = []
    if args.model:
        decodes = measure_decode_loops(
            args.model, dtypes, args.batch_sizes, args.prompt_len, args.new_tokens
        )
        print(f"bare decode loop, {args.model}, prompt {args.prompt_len}, {args.new_tokens} new")
        print(format_decodes(decodes))
    if args.json is not None:
        args.json.write_text(json.dumps(report_dict(matmuls, decodes), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
