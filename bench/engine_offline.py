"""Offline decode throughput: the engine against transformers' generate() on a static batch.

For each model and batch size B, B requests with the same prompt length are
submitted at once and decoded to exactly `--new-tokens` tokens (EOS ignored),
greedily unless `--temperature` (and `--top-p`) ask for sampling; tokens/s counts
generated tokens over wall time, prefill included.
generate() runs the same shapes as one static batch. Both run in this
process, one after the other, on the same threads: compare numbers only
within one run (shared machines are noisy).

    python -m bench.engine_offline                          # gpt2-small and gpt2-tiny (random)
    python -m bench.engine_offline --models default --batch-sizes 1 8 32 64
    python -m bench.engine_offline --models /path/to/checkpoint --threads 1
    python -m bench.engine_offline --device cuda --dtype bfloat16
    python -m bench.engine_offline --models gpt2-tiny --batch-sizes 32 --temperature 1 --top-p 0.9
    python -m bench.engine_offline --models llama-135m --quantization none int8 --repeats 3
    python -m bench.engine_offline --models llama-135m --batch-sizes 1 --decode-paths kernels torch

Model names: gpt2-small / gpt2-tiny, llama-1b / llama-135m / llama-tiny (random shapes
built by bench.checkpoints into --cache-dir), default (models/checkpoints/<the one
there>), or a folder.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.engine.config import EngineConfig
from app.engine.engine_core import EngineCore
from app.engine.sequence import SamplingParams
from models import load_model
from models.base import LoadedModel

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BATCH_SIZES = (1, 8, 32, 64)


@dataclass
class Row:
    model: str
    batch_size: int
    engine_tps: float
    engine_ms_per_step: float
    generate_tps: float | None


def resolve_model(name: str, cache_dir: Path) -> Path:
    from bench.checkpoints import LLAMA_SHAPES, make_gpt2, make_llama

    folder = cache_dir / name
    if name in ("gpt2-small", "gpt2-tiny"):
        if not (folder / "config.json").exists():
            make_gpt2(folder, size=name.removeprefix("gpt2-"))
        return folder
    if name in LLAMA_SHAPES:
        if not (folder / "config.json").exists():
            make_llama(folder, size=name)
        return folder
    if name == "default":
        found = sorted(
            p.parent for p in (REPO_ROOT / "models" / "checkpoints").glob("*/config.json")
        )
        if not found:
            raise SystemExit("no shipped checkpoint under models/checkpoints/")
        return found[0]
    return Path(name)


def prompts(loaded: LoadedModel, batch_size: int, prompt_len: int, seed: int) -> list[list[int]]:
    """Random text token ids (no special or image tokens)."""
    rng = random.Random(seed)
    banned = set(getattr(loaded.tokenizer, "all_special_ids", ())) | {loaded.info.image_token_id}
    allowed = [t for t in range(min(loaded.info.vocab_size, 5000)) if t not in banned]
    return [[rng.choice(allowed) for _ in range(prompt_len)] for _ in range(batch_size)]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return f"temperature {self.temperature:g}, top_p {self.top_p:g}"


def engine_run(
    loaded: LoadedModel,
    batch: list[list[int]],
    new_tokens: int,
    block_size: int,
    sampling: Sampling = Sampling(),
) -> tuple[float, float]:
    """Tokens/s and ms per step of one engine run over the whole batch."""
    config = EngineConfig(
        model=loaded.path,
        block_size=block_size,
        max_num_seqs=max(len(batch), 1),
        max_num_batched_tokens=max(2048, len(batch) * len(batch[0])),
        kv_cache_bytes=len(batch) * (len(batch[0]) + new_tokens + block_size)
        * loaded.info.kv_bytes_per_token(),
    )  # fmt: skip
    core = EngineCore(config, loaded)
    params = SamplingParams(
        max_tokens=new_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        ignore_eos=True,
    )
    for i, prompt in enumerate(batch):
        core.add_request(f"r{i}", prompt, params)
    start = time.perf_counter()
    generated = 0
    while core.has_unfinished:
        generated += sum(len(output.token_ids) for _, output in core.step())
    elapsed = time.perf_counter() - start
    assert generated == len(batch) * new_tokens, generated
    return generated / elapsed, 1000 * elapsed / core.num_steps


def generate_run(
    hf_model: torch.nn.Module,
    batch: list[list[int]],
    new_tokens: int,
    sampling: Sampling = Sampling(),
) -> float:
    device = next(hf_model.parameters()).device
    input_ids = torch.tensor(batch, device=device)
    _synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(  # type: ignore[operator]
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
            **_generate_sampling(sampling),
        )
    _synchronize(device)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == input_ids.shape[1] + new_tokens
    return len(batch) * new_tokens / elapsed


def _generate_sampling(sampling: Sampling) -> dict[str, Any]:
    if sampling.temperature == 0:
        return {"do_sample": False}
    # top_k 0: generate() would otherwise cut to its default top 50, which the engine does not
    return {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": 0,
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_hf(folder: Path, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, LlavaForConditionalGeneration

    config = AutoConfig.from_pretrained(folder)
    model: Any
    if "Llava" in (config.architectures or [""])[0]:
        model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


def bench_model(name: str, folder: Path, args: argparse.Namespace) -> list[Row]:
    dtype = getattr(torch, args.dtype)
    engines = {
        _form(quantization, path, args): on_decode_path(
            load_model(folder, args.device, dtype, quantization), path
        )
        for quantization in args.quantization
        for path in args.decode_paths
    }
    hf_model = None if args.skip_generate else load_hf(folder, args.device, dtype)
    sampling = Sampling(args.temperature, args.top_p)
    warm = prompts(next(iter(engines.values())), 2, args.prompt_len, seed=0)
    for loaded in engines.values():
        engine_run(loaded, warm, 4, args.block_size, sampling)
    if hf_model is not None:
        generate_run(hf_model, warm, 2, sampling)
    rows = []
    for batch_size in args.batch_sizes:
        for row in bench_batch(name, engines, hf_model, batch_size, args):
            rows.append(row)
            print_row(row, flush=True)
    return rows


def _form(quantization: str, path: str, args: argparse.Namespace) -> str:
    """What tells an engine from the others: its quantization, its decode path, or both."""
    several_paths = len(args.decode_paths) > 1
    if len(args.quantization) > 1:
        return f"{quantization} {path}" if several_paths else quantization
    return path if several_paths else quantization


def on_decode_path(loaded: LoadedModel, path: str) -> LoadedModel:
    """The model with its one-stream decode kernel (models/fused_decode.py) where it has
    one ("kernels"), or switched off ("torch")."""
    cache = getattr(loaded.model, "fused_decode", None)
    if cache is not None:
        cache.enabled = cache.enabled and path == "kernels"
    return loaded


def bench_batch(
    name: str,
    engines: dict[str, LoadedModel],
    hf_model: torch.nn.Module | None,
    batch_size: int,
    args: argparse.Namespace,
) -> list[Row]:
    """The best of `--repeats` alternating runs of each engine (one per quantization and
    decode path) and of generate(), so that a noisy moment hurts none of them more than
    the others."""
    batch = prompts(next(iter(engines.values())), batch_size, args.prompt_len, seed=batch_size)
    engine_best = dict.fromkeys(engines, 0.0)
    step_best = dict.fromkeys(engines, float("inf"))
    generate_best = 0.0
    sampling = Sampling(args.temperature, args.top_p)
    for _ in range(args.repeats):
        for form, loaded in engines.items():
            tps, ms = engine_run(loaded, batch, args.new_tokens, args.block_size, sampling)
            engine_best[form] = max(engine_best[form], tps)
            step_best[form] = min(step_best[form], ms)
        if hf_model is not None:
            generate_tps = generate_run(hf_model, batch, args.new_tokens, sampling)
            generate_best = max(generate_best, generate_tps)
    return [
        Row(_label(name, q, len(engines)), batch_size, engine_best[q], step_best[q],
            generate_best or None)
        for q in engines
    ]  # fmt: skip


def _label(name: str, form: str, num_engines: int) -> str:
    return name if num_engines == 1 else f"{Path(name).name} {form}"


def print_header() -> None:
    print(f"| {'model':<12} | {'B':>3} | {'engine tok/s':>12} | {'ms/step':>8} | "
          f"{'generate() tok/s':>16} | {'ratio':>6} |")  # fmt: skip
    print(f"|{'-' * 14}|{'-' * 5}|{'-' * 14}|{'-' * 10}|{'-' * 18}|{'-' * 8}|")


def print_row(row: Row, flush: bool = False) -> None:
    generate = f"{row.generate_tps:16,.0f}" if row.generate_tps else f"{'-':>16}"
    ratio = f"{row.engine_tps / row.generate_tps:5.2f}x" if row.generate_tps else f"{'-':>6}"
    print(
        f"| {row.model:<12} | {row.batch_size:>3} | {row.engine_tps:12,.0f} | "
        f"{row.engine_ms_per_step:8.2f} | {generate} | {ratio} |",
        flush=flush,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "gpt2-tiny"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--quantization", nargs="+", default=["none"], choices=["none", "int8"],
        help="weights as loaded (none) and/or int8; several are run in alternation",
    )  # fmt: skip
    parser.add_argument(
        "--decode-paths", nargs="+", default=["kernels"], choices=["kernels", "torch"],
        help="one-stream decode steps through the CPU kernels where they apply, and/or the "
        "torch path; several are run in alternation",
    )  # fmt: skip
    parser.add_argument("--skip-generate", action="store_true", help="engine numbers only")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs; best is kept")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mmgpt-bench"))
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="with --temperature above 0")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {args.dtype}, {args.device}, "
          f"quantization {' and '.join(args.quantization)}, "
          f"decode paths {' and '.join(args.decode_paths)}; "
          f"prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"{Sampling(args.temperature, args.top_p).describe()}, "
          f"best of {args.repeats}")  # fmt: skip
    print_header()
    for name in args.models:
        bench_model(name, resolve_model(name, args.cache_dir), args)


if __name__ == "__main__":
    main()
