"""Greedy continuations through the paged cache equal transformers' generate() exactly."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.models.conftest import CASES, Case
from tests.models.paged import PagedSession

NEW_TOKENS = 32


def our_greedy(case: Case) -> list[list[int]]:
    """All prompts prefilled in one step, then decoded together until EOS or NEW_TOKENS."""
    model, eos = case.ours.model, set(case.ours.info.eos_token_ids)
    session = PagedSession(model, block_size=4)
    embeds = [e for e in (case.image_embeds(i) for i in range(len(case.prompts))) if e is not None]
    hidden = session.step(list(enumerate(case.prompts)), torch.cat(embeds) if embeds else None)
    outputs: list[list[int]] = [[] for _ in case.prompts]
    active = list(range(len(case.prompts)))
    while active:
        last_rows = torch.stack([rows[-1] for rows in hidden])  # [active, hidden]
        for seq, token in zip(
            active, model.compute_logits(last_rows).argmax(-1).tolist(), strict=True
        ):
            outputs[seq].append(token)
        active = [s for s in active if outputs[s][-1] not in eos and len(outputs[s]) < NEW_TOKENS]
        if active:
            hidden = session.step([(s, outputs[s][-1:]) for s in active])
    return outputs


def reference_greedy(case: Case, index: int) -> list[int]:
    prompt = torch.tensor([case.prompts[index]])
    extra = {} if case.pixel_values[index] is None else {"pixel_values": case.pixel_values[index]}
    with torch.no_grad():
        out = case.reference.generate(
            input_ids=prompt, max_new_tokens=NEW_TOKENS, do_sample=False, **extra
        )
    return out[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("kind", sorted(CASES))
def test_greedy_matches_transformers_generate(
    kind: str, case_factory: Callable[[str], Case]
) -> None:
    case = case_factory(kind)
    ours = our_greedy(case)
    for index, tokens in enumerate(ours):
        assert tokens == reference_greedy(case, index), index
    assert max(len(tokens) for tokens in ours) == NEW_TOKENS  # not all cut short by EOS
