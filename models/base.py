"""The narrow interface between the engine and a model.

The engine sees a model only through `PagedModel` and the plain dataclasses below;
a model sees the engine only through flat tensors and the attention inputs the
runner planned for the step (models/attention_inputs.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from models.attention_inputs import AttentionInputs
from models.processors import ImageFeatures, warm_up_features


@dataclass(frozen=True)
class ModelInfo:
    """What the engine and the API need to know about a loaded checkpoint."""

    name: str  # the checkpoint folder's name, the default served model id
    architecture: str  # e.g. "LlavaForConditionalGeneration"
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    image_token_id: int | None = None  # None for text-only models
    image_seq_length: int = 0  # tokens one image occupies in the prompt
    image_size: int = 0  # square side the image processor resizes to
    caption_prompt: str = "Describe the image."
    position_sections: int = 1  # rotary position sections per token: 3 for M-RoPE
    sliding_window: int | None = None  # the local layers' window, planned into attention
    # a prefill chunk must hold the rest of any image it starts (attention both ways inside)
    image_spans_in_one_chunk: bool = False
    image_prompt: tuple[str, str] | None = None  # the template's image marker -> the prompt's text

    @property
    def is_multimodal(self) -> bool:
        return self.image_token_id is not None

    def kv_bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


class PagedModel(Protocol):
    """A decoder (optionally with a vision tower) that runs on a paged KV cache."""

    info: ModelInfo

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        attn_inputs: AttentionInputs,  # planned by the runner (models/attention_inputs.py)
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (K, V)
        image_embeds: torch.Tensor | None = None,  # [num image tokens in input_ids, hidden]
    ) -> torch.Tensor:  # [T, hidden]
        """Run one flat batch; writes new K/V into the cache; returns hidden states."""
        ...

    def compute_logits(self, hidden_states: torch.Tensor, row_major: bool = False) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32, only for the rows that sample; contiguous rows
        if `row_major`, otherwise whichever layout is fastest to compute."""
        ...

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """A fixed-size family's tower: [B, 3, H, W] -> [B, image_seq_length, hidden]."""
        ...

    def encode_image_batch(
        self, images: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The step's new images, each its processor's tensors by name (any shapes), in one
        packed tower call; per image its projected embeddings [its tokens, hidden], or wider
        rows that `forward` reads back (Qwen3-VL: [its tokens, hidden * (1 + levels)])."""
        ...

    def image_tokens(self, tensors: Mapping[str, Any]) -> int:
        """How many placeholder tokens the image its processor made `tensors` of becomes."""
        ...

    def prompt_positions(
        self, num_tokens: int, image_starts: Sequence[int], images: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, int] | None:
        """Multi-section positions [sections, num_tokens] of a prompt whose images start at
        `image_starts`, and the offset of every later token (p + offset in all sections);
        None for a model whose positions are 0, 1, 2, ..."""
        ...

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, K and V blocks of shape [num_blocks, block_size, num_kv_heads, head_dim]."""
        ...


BASE_ADAPTER_SLOT = -1  # rows of the base model: no LoRA adapter


@dataclass(frozen=True)
class LoadedAdapter:
    """A LoRA adapter written into a slot of a model's adapter registry."""

    slot: int
    rank: int
    adapts_images: bool  # it adapts the projector: image embeddings depend on it


class AdapterSlots(Protocol):
    """A model's LoRA adapter registry (models/lora), set up by `models.enable_lora`."""

    def load(self, folder: str | Path) -> LoadedAdapter:
        """Read, check and write a PEFT folder into a free slot; raises LoraLoadError and
        writes nothing when it does not fit."""
        ...

    def unload(self, slot: int) -> None: ...

    def select(self, row_slots: Sequence[tuple[int, int]]) -> None:
        """The rows of the next forward: per run of the flat batch (slot, number of rows)."""
        ...

    def select_all(self, slot: int) -> None:
        """Every row of the next call (e.g. an image batch) belongs to `slot`."""
        ...


@dataclass
class LoadedModel:
    """Everything `load_model` returns: the model and what came with its checkpoint."""

    model: PagedModel
    info: ModelInfo
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    image_processor: Any | None  # transformers image processor, None for text-only models
    chat_template: str | None
    generation_defaults: dict[str, Any]  # from generation_config.json (temperature, top_p, ...)
    path: str  # the checkpoint folder, for a config or a reference model built beside this one

    def warm_up_image(self) -> ImageFeatures | None:
        """A small image through the checkpoint's own processor for a native-resolution
        model's start-up warm-up; None for fixed-size and text-only models."""
        if self.image_processor is None:
            return None
        return warm_up_features(self.image_processor)
