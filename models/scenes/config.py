"""The model's shape: a LLaVA config (CLIP vision tower, Llama decoder) and its image processor."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from models.scenes.render import BACKGROUND
from models.scenes.world import IMAGE_SIZE

BACKGROUND_LEVEL = BACKGROUND[0] / 255


@dataclass(frozen=True)
class ModelSize:
    vision_layers: int = 3
    vision_width: int = 128
    vision_heads: int = 4
    patch_size: int = 8
    text_layers: int = 4
    text_width: int = 192
    text_heads: int = 3
    text_mlp: int = 576
    max_positions: int = 512

    @property
    def image_seq_length(self) -> int:
        """Patch tokens per image; the 'default' strategy drops the CLS token."""
        return (IMAGE_SIZE // self.patch_size) ** 2


TINY = ModelSize(
    vision_layers=1, vision_width=32, vision_heads=2, patch_size=16,
    text_layers=1, text_width=32, text_heads=2, text_mlp=64, max_positions=256,
)  # fmt: skip


def llava_config(size: ModelSize, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=size.vision_width,
        intermediate_size=4 * size.vision_width,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=size.patch_size,
        hidden_act="gelu",
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.text_width,
        intermediate_size=size.text_mlp,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_heads,
        max_position_embeddings=size.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    image_token_index = tokenizer.convert_tokens_to_ids("<image>")
    assert isinstance(image_token_index, int)
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_index,
        image_seq_length=size.image_seq_length,
        # The patch embeddings (layer 0) beside the last layer: a direct path from pixels to
        # the decoder, so the decoder learns to look before it settles on text-only guesses.
        vision_feature_layer=[0, -1],
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def image_processor() -> CLIPImageProcessorPil:
    """Normalised around the scenes' background, so that an empty patch is near zero and
    the objects carry the signal."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[BACKGROUND_LEVEL] * 3,
        image_std=[0.5] * 3,
    )
