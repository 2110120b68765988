"""The chunk rule of a model whose image tokens attend both ways: no chunk ends inside an
image. Plain lists, no torch."""

from __future__ import annotations

from app.engine.block_manager import BlockManager
from app.engine.scheduler import Scheduler
from app.engine.sequence import ImageInput, ImageSpan, SamplingParams, Sequence

BLOCK = 4


def image_sequence(seq_id: int, spans: list[tuple[int, int]], prompt_len: int = 40) -> Sequence:
    images = [ImageInput(None, f"image{i}") for i in range(len(spans))]
    image_spans = tuple(
        ImageSpan(start, length, image)
        for (start, length), image in zip(spans, images, strict=True)
    )
    prompt = [3 + i % 50 for i in range(prompt_len)]
    return Sequence(seq_id, f"r{seq_id}", 0, prompt, SamplingParams(max_tokens=2), image_spans)


def chunks(scheduler: Scheduler, seq: Sequence) -> list[int]:
    """The prefill chunk sizes the sequence runs in, alone."""
    scheduler.add(seq)
    sizes = []
    while seq.num_computed_tokens < seq.num_prompt_tokens:
        batch = scheduler.schedule()
        sizes += batch.num_new_tokens
        scheduler.update(batch, [[] for _ in batch.seqs])
    return sizes


def make(budget: int, whole_images: bool) -> Scheduler:
    return Scheduler(BlockManager(64, BLOCK), 8, budget, image_spans_in_one_chunk=whole_images)


def test_chunks_stop_before_an_image_and_take_it_whole() -> None:
    seq = image_sequence(1, [(5, 12), (20, 6)])  # images at 5..16 and 20..25
    assert chunks(make(8, whole_images=True), seq) == [5, 12, 3, 8, 8, 4]


def test_other_models_cut_through_images() -> None:
    seq = image_sequence(1, [(5, 12), (20, 6)])
    assert chunks(make(8, whole_images=False), seq) == [8, 8, 8, 8, 8]


def test_a_chunk_starting_inside_an_image_takes_its_rest() -> None:
    scheduler = make(4, whole_images=True)
    first = image_sequence(1, [(2, 20)])
    chunks(scheduler, first)
    scheduler.finish(first, "stop")
    second = image_sequence(2, [(2, 20)])
    second.token_ids[12:] = [t + 1 for t in second.token_ids[12:]]  # shares 3 blocks
    assert chunks(scheduler, second) == [10, 4, 4, 4, 4, 2]
    assert second.num_cached_tokens == 12
