"""Small building blocks shared by the decoders."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from models.attention import KVCache, allocate_kv_cache
from models.attention_inputs import AttentionInputs
from models.base import ModelInfo
from models.errors import ModelLoadError
from models.linear import PreparedWeight, Product, decode_product, logits

if TYPE_CHECKING:  # models.fused_decode imports this module
    from models.fused_decode import FusedDecodeCache


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: statistics in float32, scale applied in the model dtype."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    return F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype) * weight


def product_for(layer_weights: Iterable[object], lm_head: torch.Tensor) -> Product:
    """The matrix product for a decoder whose layers hold `layer_weights` (dataclasses of
    tensors, alone or in tuples) and whose output layer is `lm_head`."""
    streamed = [t for weights in layer_weights for t in _dataclass_tensors(weights)]
    return decode_product([*streamed, lm_head])


def _dataclass_tensors(weights: object) -> Iterator[torch.Tensor]:
    return (value for value in field_values(weights) if isinstance(value, torch.Tensor))


def field_values(weights: object) -> Iterator[object]:
    """A layer's weights dataclass's values in field order, (weight, bias) pairs flattened."""
    for field in dataclasses.fields(weights):  # type: ignore[arg-type]
        value = getattr(weights, field.name)
        yield from value if isinstance(value, tuple) else (value,)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# Plain functions for the common activations: calling an nn.Module costs microseconds a step.
FUNCTIONAL_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_new": tanh_gelu,
    "gelu_pytorch_tanh": tanh_gelu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation a config names, as transformers defines it."""
    if name in FUNCTIONAL_ACTIVATIONS:
        return FUNCTIONAL_ACTIVATIONS[name]
    if name not in ACT2FN:
        raise ModelLoadError("config.json", f"unknown activation {name!r}")
    return ACT2FN[name]


class DecoderLayer(Protocol):
    """A decoder layer as load-time passes see it: its weights dataclass and its product."""

    product: Product

    @property
    def w(self) -> object: ...


class PagedDecoderModel:
    """What every decoder shares: the model info slot, the cache shape, the output layer."""

    info: ModelInfo
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    dtype: torch.dtype
    device: torch.device
    lm_head: torch.Tensor | PreparedWeight  # [vocab, hidden]; prepared by models/quantize.py
    product: Product  # the layers' matrix product, chosen for this model (models/linear.py)
    layers: Sequence[DecoderLayer]  # the text decoder's layers
    fused_decode: FusedDecodeCache | None = None  # the one-stream CPU kernel, where it has one
    image_token_id: int | None = None
    image_seq_length: int = 0
    image_size: int = 0
    position_sections = 1  # 3 for multimodal rotary positions (M-RoPE)
    sliding_window: int | None = None  # the local layers' window (Gemma 3); None: no window
    image_spans_in_one_chunk = False  # True where an image's tokens attend both ways (Gemma 3)

    def adopt_dims(self, decoder: PagedDecoderModel) -> None:
        """Take the cache and output dimensions of the text decoder this model wraps."""
        self.num_layers, self.num_kv_heads = decoder.num_layers, decoder.num_kv_heads
        self.head_dim, self.hidden_size = decoder.head_dim, decoder.hidden_size
        self.vocab_size, self.max_positions = decoder.vocab_size, decoder.max_positions
        self.dtype, self.device, self.lm_head = decoder.dtype, decoder.device, decoder.lm_head
        self.product, self.layers = decoder.product, decoder.layers
        self.fused_decode = decoder.fused_decode

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
        image_embeds: torch.Tensor | None = None,  # [image tokens in input_ids, hidden]
    ) -> torch.Tensor:  # [T, hidden]
        raise NotImplementedError

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> list[KVCache]:
        return allocate_kv_cache(
            self.num_layers,
            num_blocks,
            block_size,
            self.num_kv_heads,
            self.head_dim,
            self.dtype,
            self.device,
        )

    @torch.inference_mode()
    def compute_logits(self, hidden_states: torch.Tensor, row_major: bool = False) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32; call it only on the rows that sample.

        On the CPU the product may come back as a transposed view (see models/linear.py)
        unless `row_major` asks for contiguous rows: computing them so is cheaper than
        copying the transposed view.
        """
        return logits(hidden_states, self.lm_head, self.product, row_major).float()

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} takes no images")

    def encode_image_batch(
        self, images: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """The step's new images in one tower call; per image [its tokens, hidden]. A family
        of one fixed image size stacks them."""
        pixels = torch.stack([image["pixel_values"] for image in images])  # [B, 3, H, W]
        return list(self.encode_images(pixels))

    def image_tokens(self, tensors: Mapping[str, Any]) -> int:
        """How many placeholder tokens the image its processor made `tensors` of becomes."""
        return self.image_seq_length

    def image_prompt(self, tokenizer: Any) -> tuple[str, str] | None:
        """What the chat template writes for an image and the text the family's processor
        puts there instead, with one image token; None where the template writes the
        image token itself."""
        return None

    def prompt_positions(
        self, num_tokens: int, image_starts: Sequence[int], images: Sequence[Mapping[str, Any]]
    ) -> tuple[np.ndarray, int] | None:
        """Multi-section positions [sections, num_tokens] of a prompt and the offset of the
        tokens after it; None where positions are simply 0, 1, 2, ..."""
        return None


class TextDecoder(Protocol):
    """A text decoder that embeds token ids and runs its layers (Llama's, Gemma 3's)."""

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    def run(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
    ) -> torch.Tensor: ...


class TextOnlyModel(PagedDecoderModel):
    """A text-only paged model: its decoder's embedding, then its layers; images refused."""

    decoder: TextDecoder

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        attn_inputs: AttentionInputs,
        kv_cache: list[KVCache],
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        if image_embeds is not None:
            raise ValueError("this model takes no images")
        hidden = self.decoder.embed(input_ids)
        return self.decoder.run(hidden, positions, attn_inputs, kv_cache)
