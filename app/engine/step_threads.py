"""How many intra-op threads an engine step gets, and which thread may own an OpenMP team.

A small step (below SMALL_STEP_FLOPS) is a hundred tiny ops: on one thread it pays no
fork and join per op, nor a join that waits while the front end holds the other core.
Bigger steps, and a small step's output layer past PARALLEL_OUTPUT_FLOPS, take every
thread the engine was given (the price: the second thread spins between steps). The
engine thread's OpenMP team must be the process's only one: with more pooled threads
than cores, libgomp's workers sleep between ops; so set-up work runs on a thread that
ends with it. Measurements: BENCHMARKS.md's history (8b1ca22, efaba32, 2ad6c2e).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from models.base import ModelInfo

# A 3.5M-parameter GPT-2 decoding 4 sequences (about 7 MFLOP each) stays below it; one
# token through GPT-2 small (about 250 MFLOP) does not.
SMALL_STEP_FLOPS = 32e6
# A quarter-megaflop output layer already gains from a second thread; the margin keeps
# tiny vocabularies, such as the shipped model's 51 tokens, on the step's thread.
PARALLEL_OUTPUT_FLOPS = 1e6

T = TypeVar("T")


def flops_per_token(info: ModelInfo) -> float:
    """About 2 x the weights a token meets: 12 h^2 per layer (attention 4 h^2, MLP 8 h^2)
    and the output layer; exact enough to tell small steps from big ones."""
    hidden = info.hidden_size
    return 2.0 * 12 * info.num_layers * hidden * hidden + output_flops_per_row(info)


def output_flops_per_row(info: ModelInfo) -> float:
    """The output layer's product for one row: [hidden] x [hidden, vocab]."""
    return 2.0 * info.vocab_size * info.hidden_size


class StepThreads:
    def __init__(self, info: ModelInfo) -> None:
        self.enabled = info.device.type == "cpu"
        self.flops_per_token = flops_per_token(info)
        self.output_flops_per_row = output_flops_per_row(info)
        self.most = 0  # the engine thread's setting, read at the first step (on that thread)
        self.current = 0

    def apply(self, num_tokens: int) -> None:
        """Set the intra-op threads for a step of `num_tokens` tokens, on the engine thread."""
        if not self.enabled:
            return
        if not self.most:
            self.most = self.current = torch.get_num_threads()
        small = num_tokens * self.flops_per_token < SMALL_STEP_FLOPS
        self._set(1 if small else self.most)

    def apply_to_output(self, num_rows: int) -> None:
        """Give the output layer over `num_rows` rows every thread once it is big enough."""
        if self.enabled and num_rows * self.output_flops_per_row >= PARALLEL_OUTPUT_FLOPS:
            self._set(self.most)

    def _set(self, wanted: int) -> None:
        if wanted != self.current:
            torch.set_num_threads(wanted)
            self.current = wanted


def in_passing_thread(work: Callable[[], T]) -> T:
    """work() on a new thread that ends when it returns, taking its OpenMP pool with it."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # re-raised on the caller's thread
            error.append(exc)

    thread = threading.Thread(target=run, name="mmgpt-setup")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
