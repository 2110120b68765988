"""A full-size step before the first request, so that the first requests are not the slow ones.

The first step of a new size pays costs later steps do not: the allocator grows its heap
and the kernel maps fresh pages for every large activation, and the vision tower's
convolution builds a kernel for each new batch shape (the warm-up builds the biggest
one's). The pages stay with the process, so one step on the set-up thread is enough
(BENCHMARKS.md's history has the timings).

The warm-up step is a batch of made-up prompts (with an image each for a multimodal
model) filling the step's token budget, run through the model runner alone: nothing is
scheduled, no KV block is taken from the block manager (the blocks it writes are all
free, and a sequence always writes a block before reading it), and no metric moves. The
images it cached are forgotten.
"""

from __future__ import annotations

import numpy as np

from app.engine.model_runner import ModelRunner
from app.engine.scheduler import ScheduledBatch
from app.engine.sequence import ImageInput, ImageSpan, SamplingParams, Sequence

# Longest made-up prompt: the step's activations, not one long attention, are the point.
MAX_PROMPT_TOKENS = 512
TEXT_TOKEN = 0  # any id the embedding has; the model's output is discarded


def warm_up(runner: ModelRunner, num_tokens: int, max_seqs: int, max_model_len: int) -> int:
    """Runs one prefill step of up to `num_tokens` tokens in up to `max_seqs` prompts;
    returns how many tokens it ran."""
    batch = _made_up_batch(runner, num_tokens, max_seqs, max_model_len)
    if batch.is_empty:
        return 0
    runner.run(batch)
    runner.clear_image_cache()
    return batch.num_batched_tokens


def _made_up_batch(
    runner: ModelRunner, num_tokens: int, max_seqs: int, max_model_len: int
) -> ScheduledBatch:
    info, block_size = runner.info, runner.block_size
    image_tokens = info.image_seq_length if info.is_multimodal else 0
    # one image and as much text after it per multimodal prompt: batches of several images
    prompt_len = 2 * image_tokens if image_tokens else MAX_PROMPT_TOKENS
    prompt_len = min(prompt_len, MAX_PROMPT_TOKENS, max_model_len)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    batch, next_block = ScheduledBatch(), 0
    while len(batch.seqs) < max_seqs:
        room = (runner.num_blocks - next_block) * block_size  # a small cache ends it early
        length = min(prompt_len, num_tokens - batch.num_batched_tokens, room)
        if length <= image_tokens:
            break
        tokens, spans = _prompt(runner, length, image_tokens, len(batch.seqs))
        seq = Sequence(-1 - len(batch.seqs), "warm-up", 0, tokens, params, spans)
        num_blocks = -(-length // block_size)
        seq.block_table = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        batch.seqs.append(seq)
        batch.num_new_tokens.append(length)
    return batch


def _prompt(
    runner: ModelRunner, length: int, image_tokens: int, index: int
) -> tuple[list[int], tuple[ImageSpan, ...]]:
    """Token ids of a made-up prompt and, for a multimodal model, its image at the front."""
    info = runner.info
    if info.image_token_id is None:
        return [TEXT_TOKEN] * length, ()
    side = info.image_size
    pixels = np.zeros((3, side, side), dtype=np.float32)
    image = ImageInput(pixel_values=pixels, content_hash=f"warm-up-{index}")  # one each
    tokens = [info.image_token_id] * image_tokens + [TEXT_TOKEN] * (length - image_tokens)
    return tokens, (ImageSpan(0, image_tokens, image),)
