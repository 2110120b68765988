"""Tiny random checkpoints in Hugging Face format, built offline for tests.

Every factory writes a complete folder (config.json, safetensors weights, a
working byte-level BPE tokenizer with a chat template, generation_config.json
and, for LLaVA, an image processor and processor config) through transformers'
own config classes and `save_pretrained`, so the folders look exactly like the
ones people download. Weights are seeded: the same call gives the same folder.

    python -m tests.checkpoints OUT_DIR --kind llava
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SiglipImageProcessor,
    SiglipVisionConfig,
)

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
VOCAB_SIZE = 384

# Accepts `content` as a string or as a list of {"type": "text"|"image"} parts.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_TEXT = (
    "the a red blue green small large circle square triangle left right top bottom of in on "
    "image shows there is are two three one picture describe what colour shape near above "
    "below and with café naïve über straße 東京 日本語 😀 ✓ €"
)


def _training_lines(count: int = 400) -> list[str]:
    rng = random.Random(0)
    words = _TEXT.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for _ in range(count)]


def byte_level_bpe(specials: list[str]) -> Tokenizer:
    """A small byte-level BPE trained on the test text, `specials` first: every UTF-8
    string round-trips through it."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_training_lines(), trainer=trainer)
    return bpe


def build_tokenizer(*, with_image_token: bool) -> PreTrainedTokenizerFast:
    """The byte-level BPE with <pad>, <s>, </s> (and <image>), adding <s> to a prompt."""
    bpe = byte_level_bpe([PAD, BOS, EOS] + ([IMAGE] if with_image_token else []))
    bos_id = bpe.token_to_id(BOS)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    extra: dict[str, Any] = (
        {"extra_special_tokens": {"image_token": IMAGE}} if with_image_token else {}
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        **extra,
    )


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.7,
        top_p=0.9,
    )


def _save(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    max_shard_size: str | None = None,
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.generation_config = _generation_config(tokenizer)
    kwargs: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _randomise(model: PreTrainedModel, seed: int) -> None:
    """Seeded, larger-than-default weights so that logits are far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight") or ".ln_" in name or "layernorm" in name.lower():
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=gen))
            else:
                param.copy_(0.08 * torch.randn(param.shape, generator=gen))


def llama_config(
    tokenizer: PreTrainedTokenizerFast,
    *,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    hidden_size: int = 64,
    num_layers: int = 2,
    rope_parameters: dict[str, Any] | None = None,
    **overrides: Any,
) -> LlamaConfig:
    fields: dict[str, Any] = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaConfig(**(fields | overrides))


def make_tiny_llama(
    out_dir: str | Path,
    *,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    shards: int = 1,
    rope_parameters: dict[str, Any] | None = None,
    seed: int = 0,
    **overrides: Any,
) -> Path:
    """A 2-layer Llama (4 query heads, `num_kv_heads` KV heads) split over `shards` files.

    `overrides` go to LlamaConfig (e.g. head_dim, attention_bias, mlp_bias).
    """
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(with_image_token=False)
    config = llama_config(
        tokenizer,
        num_kv_heads=num_kv_heads,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters=rope_parameters,
        **overrides,
    )
    model = LlamaForCausalLM(config)
    _randomise(model, seed)
    return _save(model, tokenizer, Path(out_dir), _shard_size(model, shards))


def make_tiny_qwen2(out_dir: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (q/k/v projections with bias, GQA, tied embeddings)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(with_image_token=False)
    llama = llama_config(tokenizer, num_kv_heads=2, tie_word_embeddings=True)
    config = Qwen2Config(**{k: v for k, v in llama.to_dict().items() if k in QWEN2_FIELDS})
    model = Qwen2ForCausalLM(config)
    _randomise(model, seed)
    return _save(model, tokenizer, Path(out_dir))


def make_tiny_qwen3(out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A 2-layer Qwen3 (QK-norm, GQA, an explicit head_dim wider than hidden / heads);
    `overrides` go to Qwen3Config (e.g. attention_bias)."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(with_image_token=False)
    llama = llama_config(tokenizer, num_kv_heads=2, tie_word_embeddings=True)
    fields = {k: v for k, v in llama.to_dict().items() if k in QWEN2_FIELDS}
    model = Qwen3ForCausalLM(Qwen3Config(**(fields | {"head_dim": 24} | overrides)))
    _randomise(model, seed)
    return _save(model, tokenizer, Path(out_dir))


def _shard_size(model: PreTrainedModel, shards: int) -> str | None:
    if shards <= 1:
        return None
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return f"{total // (shards * 1000) + 1}KB"


QWEN2_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


def make_tiny_gpt2(out_dir: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """A 2-layer GPT-2 with tied input/output embeddings; `overrides` go to GPT2Config."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(with_image_token=False)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        **overrides,
    )
    model = GPT2LMHeadModel(config)
    _randomise(model, seed)
    model.tie_weights()
    return _save(model, tokenizer, Path(out_dir))


def _vision_parts(
    vision: Literal["clip", "siglip"], image_size: int, patch_size: int
) -> tuple[CLIPVisionConfig | SiglipVisionConfig, CLIPImageProcessor | SiglipImageProcessor]:
    common: dict[str, Any] = dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
    )
    if vision == "clip":
        processor = CLIPImageProcessor(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
        )
        return CLIPVisionConfig(projection_dim=48, **common), processor
    return SiglipVisionConfig(**common), SiglipImageProcessor(
        size={"height": image_size, "width": image_size}
    )


def make_tiny_llava(
    out_dir: str | Path,
    *,
    vision: Literal["clip", "siglip"] = "clip",
    image_size: int = 32,
    patch_size: int = 8,
    vision_feature_layer: int | list[int] = -2,
    select_strategy: Literal["default", "full"] | None = None,
    weight_layout: str = "saved",
    seed: int = 0,
) -> Path:
    """LLaVA: a CLIP (CLS dropped, 'default') or SigLIP ('full') tower + projector + Llama."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(with_image_token=True)
    strategy = select_strategy or ("default" if vision == "clip" else "full")
    has_cls = vision == "clip"
    num_patches = (image_size // patch_size) ** 2
    image_seq_length = num_patches + int(has_cls) - int(strategy == "default")
    vision_config, image_processor = _vision_parts(vision, image_size, patch_size)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=llama_config(tokenizer, num_kv_heads=2),
        image_token_index=int(tokenizer.convert_tokens_to_ids(IMAGE)),  # type: ignore[arg-type]
        image_seq_length=image_seq_length,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=vision_feature_layer,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    _randomise(model, seed)
    out = _save(model, tokenizer, Path(out_dir))
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=int(has_cls),
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    if weight_layout != "saved":
        rename_llava_weights(out, weight_layout)
    return out


# How each layout spells a name that transformers 5 writes as `saved` (language_model.model.*,
# language_model.lm_head.*, vision_tower.*, multi_modal_projector.*).
LLAVA_LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "saved": (),
    # the module names of transformers 5 (model.language_model.*, lm_head.*, ...)
    "modules": (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ),
    # llava-hf checkpoints written by transformers 4 (vision_tower.vision_model.*)
    "llava-hf": (("vision_tower.", "vision_tower.vision_model."),),
}


def rename_llava_weights(folder: Path, layout: str) -> None:
    """Rewrite the weight names of a saved LLaVA folder into another known layout."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    renamed = {_renamed(name, LLAVA_LAYOUTS[layout]): t for name, t in tensors.items()}
    save_file(renamed, str(path), metadata={"format": "pt"})


def _renamed(name: str, rules: tuple[tuple[str, str], ...]) -> str:
    for old, new in rules:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def write_mmgpt_json(folder: str | Path, **fields: Any) -> None:
    (Path(folder) / "mmgpt.json").write_text(json.dumps(fields))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random checkpoint folder.")
    parser.add_argument("out_dir")
    parser.add_argument(
        "--kind",
        choices=["llava", "llava-siglip", "llama", "qwen2", "qwen3", "gpt2"],
        default="llava",
    )
    args = parser.parse_args(argv)
    if args.kind == "llava":
        make_tiny_llava(args.out_dir, vision="clip")
    elif args.kind == "llava-siglip":
        make_tiny_llava(args.out_dir, vision="siglip")
    elif args.kind == "llama":
        make_tiny_llama(args.out_dir)
    elif args.kind == "qwen2":
        make_tiny_qwen2(args.out_dir)
    elif args.kind == "qwen3":
        make_tiny_qwen3(args.out_dir)
    else:
        make_tiny_gpt2(args.out_dir)
    print(args.out_dir)


if __name__ == "__main__":
    main()
