"""The bare decode loop computes what transformers computes, step by step through its cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.ceiling import main as ceiling_main
from bench.gpt2_loop import StaticKVCache, forward, greedy_decode, load_gpt2

PROMPT_LEN, NEW_TOKENS = 6, 10


def _prompt(vocab: int, batch: int = 3) -> torch.Tensor:
    return torch.randint(3, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def test_every_step_matches_transformers_logits(tiny_gpt2: Path) -> None:
    """Prefill, then one cached decode step per token of a random continuation."""
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    weights = load_gpt2(tiny_gpt2)
    vocab = model.config.vocab_size
    sequence = torch.randint(
        3, vocab, (2, PROMPT_LEN + NEW_TOKENS), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        reference = model(sequence).logits  # [2, L, vocab]
        cache = StaticKVCache(weights, 2, PROMPT_LEN + NEW_TOKENS)
        ours = [forward(weights, cache, sequence[:, :PROMPT_LEN], 0)]
        for position in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS - 1):
            ours.append(forward(weights, cache, sequence[:, position : position + 1], position))
    expected = reference[:, PROMPT_LEN - 1 : PROMPT_LEN + NEW_TOKENS - 1]
    torch.testing.assert_close(torch.stack(ours, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_generate(tiny_gpt2: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()
    prompt = _prompt(model.config.vocab_size)
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy
        )
    assert torch.equal(
        greedy_decode(load_gpt2(tiny_gpt2), prompt, NEW_TOKENS), expected[:, PROMPT_LEN:]
    )


def test_ceiling_reports_matmuls_and_decode_rates(tiny_gpt2: Path, tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    argv = [
        "--model",
        str(tiny_gpt2),
        "--batch-sizes",
        "1,2",
        "--dtypes",
        "float32",
        "--new-tokens",
        "4",
    ]
    assert ceiling_main([*argv, "--square", "64", "--min-seconds", "0.01", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [m["shape"] for m in report["matmuls"]] == [
        "64 x 64 x 64",
        "1 x 768 x 3072",
        "2 x 768 x 3072",
    ]
    assert all(m["gflops"] > 0 for m in report["matmuls"])
    assert [d["batch_size"] for d in report["decode"]] == [1, 2]
    assert all(d["decode_tokens_per_s"] > 0 for d in report["decode"])
