"""The benchmark checkpoints: GPT-2's tokenizer layout, built without a download,
sampling defaults in the generation config, the GPU run's Llama."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench.checkpoints import (
    END_OF_TEXT,
    build_gpt2_tokenizer,
    make_gpt2,
    make_llama,
)
from models import load_model
from tests.models.paged import PagedSession


def test_byte_level_tokenizer_round_trips_and_ends_with_end_of_text() -> None:
    tokenizer = build_gpt2_tokenizer(vocab_size=1_000)
    assert len(tokenizer) == 1_000
    assert tokenizer.convert_tokens_to_ids(END_OF_TEXT) == 999 == tokenizer.eos_token_id
    text = "the quick brown fox, 123! café"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges apply: letters group into longer tokens


def test_a_top_p_checkpoint_samples_with_it_by_default(tmp_path: Path) -> None:
    """The peer applies a request's top_p only where the generation config sets one."""
    folder = make_gpt2(tmp_path / "gpt2", size="tiny", top_p=0.9)
    config = GenerationConfig.from_pretrained(folder)
    assert (config.do_sample, config.temperature, config.top_p) == (True, 1.0, 0.9)
    loaded = load_model(folder, "cpu", torch.float32)
    assert loaded.generation_defaults["top_p"] == 0.9
    plain = GenerationConfig.from_pretrained(make_gpt2(tmp_path / "plain", size="tiny"))
    assert not plain.do_sample


def test_the_llama_checkpoint_is_bf16_grouped_query_and_loads_as_saved(tmp_path: Path) -> None:
    """The GPU benchmark's Llama at its dry runs' size: the shape asked for, in bfloat16,
    and our loader's logits equal transformers' on the saved files."""
    folder = make_llama(tmp_path / "llama", size="llama-tiny")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    config = hf.config
    assert (config.num_hidden_layers, config.num_key_value_heads) == (2, 2)
    assert config.tie_word_embeddings and hf.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32  # put back after the build
    loaded = load_model(folder, "cpu", torch.float32)
    ids = build_gpt2_tokenizer()("a tall red circle").input_ids
    with torch.inference_mode():
        expected = hf.float()(torch.tensor([ids])).logits[0, -1]
    with torch.inference_mode():
        hidden = PagedSession(loaded.model).step([(0, ids)])[0][-1:]  # [1, hidden]
        ours = loaded.model.compute_logits(hidden)[0]
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
