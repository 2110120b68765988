"""Gemma 3 loading rules and the sliding-window plan (logits and greedy outputs against
transformers are in test_logits.py / test_generate.py, case gemma3_text_window)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import ModelLoadError, load_model
from models.attention_inputs import AttentionInputs, plan_attention
from tests.gemma3_checkpoints import make_tiny_gemma3_text


def plan(query_lens: list[int], context_lens: list[int], window: int | None) -> AttentionInputs:
    block_size = 4
    tables = [list(range(i * 8, i * 8 + 8)) for i in range(len(query_lens))]
    slots = torch.zeros(sum(query_lens), dtype=torch.int64)
    return plan_attention(query_lens, context_lens, tables, slots, block_size, 99, None, window)


def test_window_masks_only_where_a_query_reaches_past_the_window() -> None:
    short = plan([1, 6], [6, 0], window=8)  # a decode at length 7, a 6-token prompt
    assert short.decode_groups[0].window_mask is None and short.prefills[0].window_mask is None
    no_window = plan([1, 20], [20, 0], window=None)
    assert no_window.decode_groups[0].window_mask is None
    assert no_window.prefills[0].window_mask is None


def test_window_masks_keep_the_last_window_positions() -> None:
    inputs = plan([1, 3], [10, 9], window=4)  # a decode at position 10, a chunk at 9..11
    decode_keys = inputs.decode_groups[0].window_mask[0, 0, 0].nonzero().flatten().tolist()
    assert decode_keys == [7, 8, 9, 10]
    chunk_mask = inputs.prefills[0].window_mask
    assert chunk_mask is not None and inputs.decode_groups[0].window_mask is not None
    assert [row.nonzero().flatten().tolist() for row in chunk_mask] == [
        [6, 7, 8, 9],
        [7, 8, 9, 10],
        [8, 9, 10, 11],
    ]


def test_every_layer_global_means_no_window(tmp_path: Path) -> None:
    folder = make_tiny_gemma3_text(tmp_path, layer_types=["full_attention"] * 4)
    assert load_model(folder).info.sliding_window is None


@pytest.mark.parametrize(
    "override",
    [{"final_logit_softcapping": 30.0}, {"attn_logit_softcapping": 50.0}],
)
def test_what_is_not_implemented_is_refused(tmp_path: Path, override: dict) -> None:
    folder = make_tiny_gemma3_text(tmp_path, **override)
    with pytest.raises(ModelLoadError, match=next(iter(override))):
        load_model(folder)
