"""int8 weights (or bfloat16) against the same model in float32: logit error and greedy agreement.

For each model, random text prompts are decoded greedily by the float32 model through the
paged cache; the int8 model is then fed the same tokens (teacher-forced), and every row's
logits are compared:

    python -m bench.int8_accuracy --models default llama-135m
    python -m bench.int8_accuracy --models llama-135m --variant bfloat16

Prints, per model: the max and mean of max|int8 - fp32| / max|fp32| over the rows, and the
share of the float32 greedy tokens the int8 model also picks given the same prefix.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from bench.engine_offline import resolve_model
from models import load_model
from models.attention_inputs import plan_attention
from models.base import LoadedModel

BLOCK_SIZE = 16


class OneSequence:
    """One sequence through a model's paged cache, blocks 0, 1, 2, ... in order."""

    def __init__(self, loaded: LoadedModel, max_len: int) -> None:
        self.model = loaded.model
        self.cache = self.model.allocate_kv_cache(-(-max_len // BLOCK_SIZE), BLOCK_SIZE)
        self.table = list(range(-(-max_len // BLOCK_SIZE)))
        self.length = 0

    def logits(self, tokens: list[int]) -> torch.Tensor:  # [len(tokens), vocab]
        start, end = self.length, self.length + len(tokens)
        slots = torch.arange(start, end)
        attn = plan_attention([len(tokens)], [start], [self.table], slots, BLOCK_SIZE, 0)
        hidden = self.model.forward(torch.tensor(tokens), slots, attn, self.cache, None)
        self.length = end
        return self.model.compute_logits(hidden, row_major=True)


def greedy_rows(loaded: LoadedModel, prompt: list[int], new_tokens: int) -> list[int]:
    """The float32 model's greedy continuation, decoded one token a step."""
    session = OneSequence(loaded, len(prompt) + new_tokens)
    rows = session.logits(prompt)
    continuation: list[int] = []
    while len(continuation) < new_tokens:
        continuation.append(int(rows[-1].argmax()))
        rows = session.logits(continuation[-1:])
    return continuation


def compare(
    fp32: LoadedModel, int8: LoadedModel, prompt: list[int], new_tokens: int
) -> tuple[list[float], int]:
    """Per-row relative logit errors and the number of greedy tokens int8 also picks."""
    continuation = greedy_rows(fp32, prompt, new_tokens)
    tokens = prompt + continuation[:-1]
    reference = OneSequence(fp32, len(tokens)).logits(tokens)
    ours = OneSequence(int8, len(tokens)).logits(tokens)
    errors = ((ours - reference).abs().amax(-1) / reference.abs().amax(-1)).tolist()
    picked = ours[len(prompt) - 1 :].argmax(-1)
    return errors, int((picked == torch.tensor(continuation)).sum())


def text_prompts(loaded: LoadedModel, count: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    banned = set(getattr(loaded.tokenizer, "all_special_ids", ())) | {loaded.info.image_token_id}
    allowed = [t for t in range(min(loaded.info.vocab_size, 5000)) if t not in banned]
    return [[rng.choice(allowed) for _ in range(length)] for _ in range(count)]


def measure(name: str, folder: Path, args: argparse.Namespace) -> str:
    fp32 = load_model(folder)
    if args.variant == "int8":
        variant = load_model(folder, quantization="int8")
    else:
        variant = load_model(folder, dtype=args.variant)
    errors: list[float] = []
    agreed = 0
    for prompt in text_prompts(fp32, args.prompts, args.prompt_len):
        prompt_errors, prompt_agreed = compare(fp32, variant, prompt, args.new_tokens)
        errors += prompt_errors
        agreed += prompt_agreed
    total = args.prompts * args.new_tokens
    return (f"| {name} | {max(errors):.4f} | {sum(errors) / len(errors):.4f} | "
            f"{agreed}/{total} ({100 * agreed / total:.1f}%) |")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["default", "llama-135m"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/mmgpt-bench"))
    parser.add_argument("--variant", default="int8", choices=["int8", "bfloat16"])
    args = parser.parse_args(argv)
    print(f"{args.prompts} random prompts of {args.prompt_len} tokens, {args.new_tokens} "
          "greedy tokens each; errors are max|variant - fp32| / max|fp32| per row, "
          f"variant {args.variant}")  # fmt: skip
    print("| model | max logit error | mean logit error | greedy agreement |")
    print("|---|---|---|---|")
    for name in args.models:
        print(measure(name, resolve_model(name, args.cache_dir), args), flush=True)


if __name__ == "__main__":
    main()
