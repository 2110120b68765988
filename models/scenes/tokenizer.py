"""A word-level tokenizer for the scene language, with the special tokens and chat template."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from models.scenes.sample import sample

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, IMAGE, USER, ASSISTANT]
CAPTION_PROMPT = "Describe the image."
VOCAB_SEEDS = range(5_000)  # enough scenes for every word of the world to appear

# One user/assistant turn each; content is a string or a list of image/text parts.
# A turn's text comes before its images, whatever their order in the message: the image
# tokens then see the question, so each patch can check itself against what is asked
# (a causal decoder cannot look back from the image to a question that follows it).
# Assistant turns end with EOS so that a conversation can continue after them.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>{% else %}<|user|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def corpus(seeds: Iterable[int]) -> Iterable[str]:
    yield CAPTION_PROMPT
    for seed in seeds:
        yield sample(seed).text


def build_tokenizer(seeds: Iterable[int] = VOCAB_SEEDS) -> PreTrainedTokenizerFast:
    """Train the word vocabulary on scene text; lower-cased, split on spaces and punctuation."""
    tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's cleanup joins words with spaces and drops the space before punctuation.
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(corpus(seeds), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    return wrap(tokenizer)


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=512,
    )
