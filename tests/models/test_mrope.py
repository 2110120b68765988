"""models/mrope.py: the cos/sin of multi-section positions equal transformers' own, for
Qwen3-VL's interleaved sections at its real width (head_dim 128, sections 24/20/20)."""

from __future__ import annotations

import torch
from transformers import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from models.mrope import MultimodalRotaryEmbedding, interleaved_sections
from models.rope import RotaryEmbedding

SECTIONS = [24, 20, 20]


def test_interleaved_sections_take_every_third_frequency_up_to_their_width() -> None:
    sections = interleaved_sections(SECTIONS).tolist()
    assert sections[:6] == [0, 1, 2, 0, 1, 2] and sections[60:] == [0, 0, 0, 0]
    assert [sections.count(s) for s in range(3)] == SECTIONS


def test_interleaved_lookup_equals_qwen3_vl_rotary_embedding() -> None:
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": SECTIONS}
    config = Qwen3VLTextConfig(
        hidden_size=256, num_attention_heads=2, head_dim=128, rope_parameters=rope
    )
    positions = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    reference = Qwen3VLTextRotaryEmbedding(config)
    cos, sin = reference(torch.zeros(1, dtype=torch.float32), positions[:, None, :])  # [1, T, D]
    ours = MultimodalRotaryEmbedding(
        RotaryEmbedding(config, 128, 512, torch.float32, torch.device("cpu")),
        SECTIONS,
        interleaved=True,
    )
    our_cos, signed_sin = ours.lookup(positions)  # [T, 1, D], the rotate-half sign in sin
    torch.testing.assert_close(our_cos[:, 0], cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(signed_sin[:, 0, 64:], sin[0, :, 64:], rtol=0, atol=1e-6)
