"""The narrow interface between the engine and a model.

The engine sees a model only through `PagedModel` and the plain dataclasses
below; `models/` sees the engine only through flat tensors and block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from models.decode_mirror import DecodeMirror


def cache_slots(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots (block * block_size + offset) of positions [start, end) of a
    sequence whose blocks are `block_table`, one block-long run at a time."""
    slots: list[int] = []
    position = start
    while position < end:
        offset = position % block_size
        run = min(block_size - offset, end - position)
        base = block_table[position // block_size] * block_size + offset
        slots += range(base, base + run)
        position += run
    return slots


@dataclass
class AttentionMetadata:
    """Where each token of one flat batch sits in the paged KV cache.

    A step holds S sequences and T tokens in total. Sequence i contributes
    `query_lens[i]` new tokens (a prefill chunk, or 1 for a decode) whose keys
    and values are appended after `context_lens[i]` tokens already cached.
    """

    query_start_loc: torch.Tensor  # [S + 1] int32, cumulative query lengths (cu_seqlens)
    seq_lens: torch.Tensor  # [S] int32, context + new tokens of each sequence
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset of each new token
    # [S, max_blocks_per_seq] int32. Attention reads the padding entries and the slots past
    # a sequence's end (masked), so those must hold finite values: a masked NaN still
    # turns a row NaN. The engine pads with a block it keeps zero and zeroes new blocks.
    block_tables: torch.Tensor
    query_lens: list[int]  # host copies, so attention never syncs to read shapes
    context_lens: list[int]
    max_query_len: int
    max_seq_len: int
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific precomputation
    # the engine's ids of the S sequences and, when it keeps one, its decode mirror
    # (models/decode_mirror.py), which needs them to tell the sequences apart
    seq_ids: list[int] = field(default_factory=list)
    decode_mirror: DecodeMirror | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


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
        attn_metadata: AttentionMetadata,
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
        """[B, 3, H, W] -> [B, image_seq_length, hidden], already projected."""
        ...

    def allocate_kv_cache(
        self, num_blocks: int, block_size: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, K and V blocks of shape [num_blocks, block_size, num_kv_heads, head_dim]."""
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
    path: str
