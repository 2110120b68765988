"""The engine's correctness checks on a CUDA device, then its offline throughput there.

    python -m bench.gpu_check                 # needs a GPU; exits 2 without one
    python -m bench.gpu_check --device cpu    # the same checks on the CPU (a dry run)

Checks (tiny random checkpoints built offline, fp32 and bf16):
- 64 concurrent greedy requests give each request's tokens when run alone;
- greedy tokens equal transformers' generate() on the same device (fp32);
- a run forced to preempt equals an unconstrained one;
- seeded sampling gives the same tokens alone and in a batch of 32;
- 48 image requests equal each alone: on a tiny LLaVA (one fixed image size), and on a
  tiny Qwen2.5-VL and Qwen3-VL (images of several sizes, M-RoPE, chunks cut through
  images, Qwen3-VL's DeepStack).
Then `bench.engine_offline` on a GPT-2-small-shaped random checkpoint.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import sys
import tempfile
import traceback
from collections.abc import Callable
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from app.engine.config import EngineConfig
from app.engine.engine_core import EngineCore
from app.engine.sequence import ImageInput, ImageSpan, SamplingParams
from app.engine.validation import image_spans
from app.media import preprocess
from models import load_model
from models.base import LoadedModel

Job = tuple[list[int], SamplingParams, tuple[ImageSpan, ...]]
MAX_FLIPS_FP32 = 1  # near-tie argmax flips tolerated per batch
MAX_FLIPS_BF16 = 6  # bf16 rounds batch-shape-dependent sums differently
# A native-resolution tower packs each step's new images together, and in bf16 each
# packing rounds them differently too (CPU dry run: 4 and 6 of 48 differed).
MAX_NATIVE_IMAGE_FLIPS_BF16 = 10
# (height, width) of a native-resolution model's images: wide, tall, square, small, large
NATIVE_IMAGE_SIZES = [(30, 50), (40, 24), (32, 32), (9, 12), (90, 70)]
QWEN_VL_FAMILIES: tuple[Literal["qwen2_5_vl", "qwen3_vl"], ...] = ("qwen2_5_vl", "qwen3_vl")


def run(core: EngineCore, jobs: list[Job]) -> list[list[int]]:
    tokens: list[list[int]] = [[] for _ in jobs]
    for i, (prompt, params, spans) in enumerate(jobs):
        core.add_request(f"j{i}", prompt, params, spans, sink=i)
    while core.has_unfinished:
        for i, output in core.step():
            if output.index == 0:
                tokens[i] += output.token_ids
    return tokens


def alone(loaded: LoadedModel, jobs: list[Job]) -> list[list[int]]:
    return [run(core_for(loaded), [job])[0] for job in jobs]


def core_for(loaded: LoadedModel, **overrides: object) -> EngineCore:
    return EngineCore(EngineConfig(model=loaded.path, **overrides), loaded)  # type: ignore[arg-type]


def flips(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


def text_jobs(count: int, seed: int, **params: object) -> list[Job]:
    rng = random.Random(seed)
    jobs: list[Job] = []
    for _ in range(count):
        prompt = [rng.randrange(4, 384) for _ in range(rng.randint(1, 100))]
        sampling = SamplingParams(max_tokens=rng.randint(1, 40), **params)  # type: ignore[arg-type]
        jobs.append((prompt, sampling, ()))
    return jobs


def image_pool(loaded: LoadedModel, seed: int) -> list[ImageInput]:
    """Four images of the model's one size, or one of each native size through its processor."""
    info, rng = loaded.info, np.random.default_rng(seed)
    if info.image_seq_length:
        pixels = rng.standard_normal((4, 3, info.image_size, info.image_size))
        hashes = [hashlib.sha256(p.tobytes()).hexdigest() for p in pixels]
        return [ImageInput(p.astype(np.float32), h) for p, h in zip(pixels, hashes, strict=True)]
    pictures = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in NATIVE_IMAGE_SIZES]
    return [preprocess(Image.fromarray(p), loaded.image_processor) for p in pictures]


def image_jobs(loaded: LoadedModel, count: int, seed: int) -> list[Job]:
    info, rng = loaded.info, random.Random(seed)
    assert info.image_token_id is not None
    pool = image_pool(loaded, seed)
    jobs: list[Job] = []
    text_ids = [i for i in range(4, 384) if i != info.image_token_id]
    for _ in range(count):
        images = [rng.choice(pool) for _ in range(rng.randint(1, 2))]
        prompt = [1]
        for image in images:
            prompt += rng.choices(text_ids, k=rng.randint(0, 20))
            prompt += [info.image_token_id] * (image.num_tokens or info.image_seq_length)
        prompt += rng.choices(text_ids, k=rng.randint(1, 20))
        params = SamplingParams(max_tokens=rng.randint(1, 30), temperature=0.0)
        jobs.append((prompt, params, image_spans(prompt, images, info)))
    return jobs


def check_batched_greedy(loaded: LoadedModel, max_flips: int) -> str:
    jobs = text_jobs(64, seed=1, temperature=0.0)
    together = run(core_for(loaded, max_num_batched_tokens=128), jobs)
    count = flips(together, alone(loaded, jobs))
    assert count <= max_flips, f"{count} of 64 differ"
    return f"{count} of 64 differ"


def check_against_transformers(loaded: LoadedModel) -> str:
    from transformers import AutoModelForCausalLM

    hf: Any = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=loaded.info.dtype)
    hf = hf.to(loaded.info.device).eval()
    jobs = text_jobs(4, seed=2, temperature=0.0, ignore_eos=True)
    ours = run(core_for(loaded), jobs)
    for (prompt, params, _), tokens in zip(jobs, ours, strict=True):
        ids = torch.tensor([prompt], device=loaded.info.device)
        out = hf.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=params.max_tokens,
            do_sample=False,
            eos_token_id=None,
        )
        assert out[0, len(prompt) :].tolist() == tokens, "differs from generate()"
    return "4 of 4 equal"


def check_preemption(loaded: LoadedModel, max_flips: int) -> str:
    jobs = text_jobs(24, seed=3, temperature=0.0, ignore_eos=True)
    reference = run(core_for(loaded), jobs)
    tight = core_for(loaded, kv_cache_bytes=160 * loaded.info.kv_bytes_per_token())
    count = flips(run(tight, jobs), reference)
    preemptions = tight.scheduler.num_preemptions
    assert preemptions > 0 and count <= max_flips, f"{preemptions} preemptions, {count} differ"
    return f"{preemptions} preemptions, {count} of 24 differ"


def check_seeded(loaded: LoadedModel, max_flips: int) -> str:
    jobs = text_jobs(32, seed=4, temperature=0.9, top_p=0.95)
    for i, (_, params, _) in enumerate(jobs):
        params.seed = 100 + i
    count = flips(run(core_for(loaded), jobs), alone(loaded, jobs))
    assert count <= max_flips, f"{count} of 32 differ"
    return f"{count} of 32 differ"


def check_images(load: Callable[[], LoadedModel], max_flips: int) -> str:
    loaded = load()
    jobs = image_jobs(loaded, 48, seed=5)
    together = run(core_for(loaded, max_num_batched_tokens=64), jobs)
    count = flips(together, alone(loaded, jobs))
    assert count <= max_flips, f"{count} of 48 differ"
    return f"{count} of 48 differ"


def run_checks(device: str, folder: Path) -> bool:
    """Every check in both dtypes; a check that fails or raises is reported and the rest
    still run, since a GPU session may have no time for a second try."""
    from tests.checkpoints import make_tiny_llama, make_tiny_llava
    from tests.qwen_vl_checkpoints import make_tiny_qwen_vl

    llama_dir = make_tiny_llama(folder / "llama")
    image_dirs = {"llava": make_tiny_llava(folder / "llava")} | {
        family: make_tiny_qwen_vl(folder / family, family=family) for family in QWEN_VL_FAMILIES
    }
    passed = True
    for dtype, max_flips in ((torch.float32, MAX_FLIPS_FP32), (torch.bfloat16, MAX_FLIPS_BF16)):
        load = cache(partial(load_model, device=device, dtype=dtype))  # once per checkpoint
        for name, check in _checks(load, llama_dir, image_dirs, max_flips, dtype):
            try:
                print(f"  ok    {dtype!s:15} {name}: {check()}", flush=True)
            except AssertionError as exc:
                passed = False
                print(f"  FAIL  {dtype!s:15} {name}: {exc}", flush=True)
            except Exception as exc:  # a CUDA or loading error: report it, go on
                passed = False
                print(f"  ERROR {dtype!s:15} {name}: {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
    return passed


def _checks(
    load: Callable[[Path], LoadedModel],
    llama_dir: Path,
    image_dirs: dict[str, Path],
    max_flips: int,
    dtype: torch.dtype,
) -> list[tuple[str, Callable[[], str]]]:
    """(name, check) pairs; each check loads its checkpoint when it runs."""
    llama = partial(load, llama_dir)
    checks: list[tuple[str, Callable[[], str]]] = [
        ("64 batched greedy == alone", lambda: check_batched_greedy(llama(), max_flips)),
        ("forced preemption == unconstrained", lambda: check_preemption(llama(), max_flips)),
        ("seeded: batch of 32 == alone", lambda: check_seeded(llama(), max_flips)),
    ]
    for family, folder in image_dirs.items():
        native_bf16 = family != "llava" and dtype == torch.bfloat16
        limit = MAX_NATIVE_IMAGE_FLIPS_BF16 if native_bf16 else max_flips
        check = partial(check_images, partial(load, folder), limit)
        checks.append((f"48 image requests == alone, {family}", check))
    if dtype == torch.float32:  # in bf16 generate() and we round differently
        checks.append(("greedy == generate()", lambda: check_against_transformers(llama())))
    return checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; run with --device cpu for a dry run")
        sys.exit(2)
    if args.device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name(args.device)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="mmgpt-gpu-check-") as scratch:
        passed = run_checks(args.device, Path(scratch))
    if not args.skip_throughput:
        from bench import engine_offline

        for dtype in ("float32", "bfloat16"):
            engine_offline.main(
                ["--models", "gpt2-small", "--device", args.device, "--dtype", dtype]
            )
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
