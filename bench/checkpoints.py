"""Random checkpoints for the benchmarks, built offline.

    python -m bench.checkpoints /tmp/mmgpt-bench/gpt2-small --size small   # 124M parameters
    python -m bench.checkpoints /tmp/mmgpt-bench/gpt2-tiny --size tiny     # 3.4M parameters
    python -m bench.checkpoints /tmp/mmgpt-bench/gpt2-tiny-top-p --size tiny --top-p 0.9
    python -m bench.checkpoints /tmp/mmgpt-bench/llama-1b --size llama-1b  # 1.1B, bf16, for GPUs
    python -m bench.checkpoints /tmp/mmgpt-bench/llama-tiny --size llama-tiny  # its dry runs

All use GPT-2's vocabulary size (50,257) with a byte-level BPE built here from
a fixed merge table (letters grouped into 2-, 3- and 4-letter tokens), so the
tokenizer costs and the output-layer width match GPT-2's without a download.
`llama-1b` has Llama 3.2 1B's shape (16 layers of 2,048, 32 query and 8 key/value
heads, an MLP of 8,192, tied embeddings) with that vocabulary, saved in bfloat16.

The image-chat checkpoints are bench/qwen_vl_checkpoint.py's and bench/smolvlm_checkpoint.py's.

`--top-p` writes a sampling default into the generation config. `transformers serve`
applies a request's top_p only when the checkpoint's generation config sets one (its
batching manager builds its per-request processors from there), so comparisons of
top_p sampling need such a checkpoint to be like for like.
"""

from __future__ import annotations

import argparse
import itertools
import string
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

GPT2_VOCAB_SIZE = 50_257
END_OF_TEXT = "<|endoftext|>"
SPACE = "Ġ"  # how byte-level BPE spells a leading space
SHAPES = {"small": (768, 12, 12), "tiny": (64, 4, 4)}  # GPT-2: (hidden size, layers, heads)
# Llama: (hidden size, layers, query heads, key/value heads, MLP size)
LLAMA_SHAPES = {
    "llama-1b": (2048, 16, 32, 8, 8192),
    "llama-135m": (576, 30, 9, 3, 1536),  # SmolLM2-135M's shape
    "llama-tiny": (64, 2, 4, 2, 256),
}
LLAMA_VOCAB_SIZES = {"llama-135m": 49_152}  # the others: GPT-2's
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


def _merges(num_merges: int) -> list[tuple[str, str]]:
    """Letter pairs first, then triples, then quadruples: lower ranks merge first."""
    letters = list(string.ascii_lowercase)
    merges: list[tuple[str, str]] = []
    level = [SPACE, *letters]
    while len(merges) < num_merges:
        grown = [(left, right) for left, right in itertools.product(level, letters)]
        merges.extend(grown[: num_merges - len(merges)])
        level = [left + right for left, right in grown]
    return merges


def build_gpt2_tokenizer(vocab_size: int = GPT2_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = _merges(vocab_size - len(alphabet) - 1)
    tokens = alphabet + [left + right for left, right in merges] + [END_OF_TEXT]
    vocab = {token: index for index, token in enumerate(tokens)}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    bpe.add_special_tokens([END_OF_TEXT])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        chat_template=CHAT_TEMPLATE,
    )


def make_gpt2(
    out_dir: str | Path, size: str = "small", seed: int = 0, top_p: float | None = None
) -> Path:
    """GPT-2 with random weights (the model's own initialisation, seeded); with `top_p`,
    the generation config samples with it by default."""
    torch.manual_seed(seed)
    tokenizer = build_gpt2_tokenizer()
    eos = tokenizer.eos_token_id
    hidden, layers, heads = SHAPES[size]
    config = GPT2Config(
        vocab_size=GPT2_VOCAB_SIZE,
        n_positions=1024,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    sampling = {} if top_p is None else {"do_sample": True, "temperature": 1.0, "top_p": top_p}
    return save_checkpoint(GPT2LMHeadModel(config), tokenizer, eos, out_dir, **sampling)


def make_llama(out_dir: str | Path, size: str = "llama-1b", seed: int = 0) -> Path:
    """A Llama with random weights, built and saved in bfloat16 (half the memory and
    time of building a billion parameters in float32)."""
    torch.manual_seed(seed)
    vocab_size = LLAMA_VOCAB_SIZES.get(size, GPT2_VOCAB_SIZE)
    tokenizer = build_gpt2_tokenizer(vocab_size)
    eos = tokenizer.eos_token_id
    hidden, layers, heads, kv_heads, mlp = LLAMA_SHAPES[size]
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        dtype=torch.bfloat16,
    )
    with default_dtype(torch.bfloat16):
        model = LlamaForCausalLM(config)
    return save_checkpoint(model, tokenizer, eos, out_dir)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters created in `dtype` (bfloat16: half the memory and time of float32 for
    billions)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    eos: int,
    out_dir: str | Path,
    **sampling: float | bool,
) -> Path:
    """Writes the model (EOS as BOS, EOS and padding; `sampling` defaults in its generation
    config) and its tokenizer into out_dir."""
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, **sampling
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def spread_weights(model: PreTrainedModel, seed: int, scale: float = 0.08) -> None:
    """Every weight drawn from N(0, scale), norm weights from N(1, 0.1), in name order:
    wider than a model's own initialisation, whose flat logits give every prompt of a
    random multimodal model the same answer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator).to(param.dtype)
            is_norm = "norm" in name.lower() and name.endswith("weight")
            param.copy_(1.0 + 0.1 * noise if is_norm else scale * noise)


class DecoderShape(Protocol):
    """The text decoder's sizes of a multimodal shape (a frozen dataclass: read-only)."""

    @property
    def text_width(self) -> int: ...
    @property
    def text_layers(self) -> int: ...
    @property
    def text_heads(self) -> int: ...
    @property
    def text_kv_heads(self) -> int: ...
    @property
    def text_mlp(self) -> int: ...
    @property
    def embedding_rows(self) -> int: ...


def decoder_sizes(shape: DecoderShape) -> dict[str, Any]:
    """A multimodal shape's text decoder, in transformers' config names."""
    return dict(
        vocab_size=shape.embedding_rows,
        hidden_size=shape.text_width,
        intermediate_size=shape.text_mlp,
        num_hidden_layers=shape.text_layers,
        num_attention_heads=shape.text_heads,
        num_key_value_heads=shape.text_kv_heads,
    )


def save_multimodal(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    image_processor: Any,
    generation_config: GenerationConfig,
    out_dir: str | Path,
) -> Path:
    model.generation_config = generation_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    image_processor.save_pretrained(out)
    return out


def sized_main(
    description: str,
    sizes: Sequence[str],
    default: str,
    make: Callable[[str, str, int], Path],
    argv: Sequence[str] | None,
) -> None:
    """`python -m bench.<builder> OUT_DIR --size S --seed N`: make(OUT_DIR, S, N)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("out_dir")
    parser.add_argument("--size", choices=sorted(sizes), default=default)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make(args.out_dir, args.size, args.seed))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random checkpoint for the benchmarks.")
    parser.add_argument("out_dir")
    sizes = sorted(SHAPES) + sorted(LLAMA_SHAPES)
    parser.add_argument("--size", choices=sizes, default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-p", type=float, help="GPT-2 only: sample with this top_p by default")
    args = parser.parse_args(argv)
    if args.size in LLAMA_SHAPES:
        print(make_llama(args.out_dir, args.size, args.seed))
    else:
        print(make_gpt2(args.out_dir, args.size, args.seed, args.top_p))


if __name__ == "__main__":
    main()
