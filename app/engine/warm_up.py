"""A full-size step before the first request, so that the first requests are not the slow ones.

The first step of a new size pays costs later steps do not: the allocator grows its heap
and the kernel maps fresh pages for every large activation, and the vision tower's
convolution builds a kernel for each new batch shape (the warm-up builds the biggest
one's). The pages stay with the process, so one step on the set-up thread is enough
(BENCHMARKS.md's history has the timings).

The warm-up step is a batch of made-up prompts filling the step's token budget, run
through the model runner alone. A fixed-size multimodal model (LLaVA) gets an image in
every prompt, so its tower meets its biggest batch shape; a native-resolution one
(Qwen-VL) gets one small image, made by its own processor, in the first prompt, so the
first image request does not pay the packed tower's first call. Nothing is scheduled,
no KV block is taken from the block manager (the blocks it writes are all free, and a
sequence always writes a block before reading it), and no metric moves. The images it
cached are forgotten.
"""

from __future__ import annotations

import numpy as np

from app.engine.model_runner import ModelRunner
from app.engine.scheduler import ScheduledBatch
from app.engine.sequence import ImageInput, ImageSpan, SamplingParams, Sequence
from models.base import ModelInfo

# Longest made-up prompt: the step's activations, not one long attention, are the point.
MAX_PROMPT_TOKENS = 512
TEXT_TOKEN = 0  # any id the embedding has; the model's output is discarded
PARAMS = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def warm_up(
    runner: ModelRunner,
    num_tokens: int,
    max_seqs: int,
    max_model_len: int,
    native_image: ImageInput | None = None,
) -> int:
    """Runs one prefill step of up to `num_tokens` tokens in up to `max_seqs` prompts, the
    first holding `native_image` if given; returns how many tokens it ran."""
    batch = _made_up_batch(runner, num_tokens, max_seqs, max_model_len, native_image)
    if batch.is_empty:
        return 0
    runner.run(batch)
    runner.clear_image_cache()
    return batch.num_batched_tokens


def _made_up_batch(
    runner: ModelRunner,
    num_tokens: int,
    max_seqs: int,
    max_model_len: int,
    native_image: ImageInput | None,
) -> ScheduledBatch:
    info, block_size = runner.info, runner.block_size
    # a fixed-size image and as much text after it per prompt: batches of several images
    prompt_len = 2 * info.image_seq_length if info.image_seq_length else MAX_PROMPT_TOKENS
    prompt_len = min(prompt_len, MAX_PROMPT_TOKENS, max_model_len)
    batch, next_block = ScheduledBatch(), 0
    while len(batch.seqs) < max_seqs:
        index = len(batch.seqs)
        room = (runner.num_blocks - next_block) * block_size  # a small cache ends it early
        length = min(prompt_len, num_tokens - batch.num_batched_tokens, room)
        image = _image_for(info, index, native_image)
        if length <= _image_tokens(info, image):
            break
        seq = _made_up_sequence(runner, index, length, image)
        num_blocks = -(-length // block_size)
        seq.block_table = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        batch.seqs.append(seq)
        batch.num_new_tokens.append(length)
    return batch


def _made_up_sequence(
    runner: ModelRunner, index: int, length: int, image: ImageInput | None
) -> Sequence:
    """A prompt of `length` tokens, its image (if any) at the front."""
    image_tokens = _image_tokens(runner.info, image)
    text = [TEXT_TOKEN] * (length - image_tokens)
    if image is None or runner.info.image_token_id is None:
        return Sequence(-1 - index, "warm-up", 0, text, PARAMS)
    tokens = [runner.info.image_token_id] * image_tokens + text
    spans = (ImageSpan(0, image_tokens, image),)
    positions = runner.rope_positions(length, spans)
    return Sequence(-1 - index, "warm-up", 0, tokens, PARAMS, spans, positions)


def _image_for(info: ModelInfo, index: int, native_image: ImageInput | None) -> ImageInput | None:
    if info.image_seq_length:
        return _fixed_size_image(info, index)
    return native_image if index == 0 else None


def _fixed_size_image(info: ModelInfo, index: int) -> ImageInput:
    pixels = np.zeros((3, info.image_size, info.image_size), dtype=np.float32)
    return ImageInput(pixel_values=pixels, content_hash=f"warm-up-{index}")  # one each


def _image_tokens(info: ModelInfo, image: ImageInput | None) -> int:
    if image is None:
        return 0
    return image.num_tokens or info.image_seq_length
