"""The bare Llama decode loop computes what transformers computes, step by step through its
cache, and bench.ceiling runs it on a Llama folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.ceiling import main as ceiling_main
from bench.llama_loop import StaticKVCache, forward, greedy_decode, load_llama
from tests.checkpoints import make_tiny_llama

PROMPT_LEN, NEW_TOKENS = 6, 10


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("llama"), num_kv_heads=2)


def test_every_step_matches_transformers_logits(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    weights = load_llama(tiny_llama)
    sequence = torch.randint(
        3, model.config.vocab_size, (2, PROMPT_LEN + NEW_TOKENS),
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    with torch.inference_mode():
        reference = model(sequence).logits  # [2, L, vocab]
        cache = StaticKVCache(weights, 2, PROMPT_LEN + NEW_TOKENS)
        ours = [forward(weights, cache, sequence[:, :PROMPT_LEN], 0)]
        for position in range(PROMPT_LEN, PROMPT_LEN + NEW_TOKENS - 1):
            ours.append(forward(weights, cache, sequence[:, position : position + 1], position))
    expected = reference[:, PROMPT_LEN - 1 : PROMPT_LEN + NEW_TOKENS - 1]
    torch.testing.assert_close(torch.stack(ours, dim=1), expected, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_generate(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = torch.randint(
        3, model.config.vocab_size, (3, PROMPT_LEN), generator=torch.Generator().manual_seed(0)
    )
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=0
    )
    with torch.inference_mode():
        expected = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), generation_config=greedy
        )
    ours = greedy_decode(load_llama(tiny_llama), prompt, NEW_TOKENS)
    assert torch.equal(ours, expected[:, PROMPT_LEN:])


def test_ceiling_runs_the_llama_loop(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "ceiling.json"
    argv = ["--model", str(tiny_llama), "--batch-sizes", "1,2", "--dtypes", "float32"]
    argv += ["--new-tokens", "4", "--square", "64", "--min-seconds", "0.01", "--json", str(out)]
    assert ceiling_main(argv) == 0
    decodes = json.loads(out.read_text())["decode"]
    assert [d["batch_size"] for d in decodes] == [1, 2]
    assert all(d["decode_tokens_per_s"] > 0 for d in decodes)
