"""The engine's CPU threads: how many intra-op threads a step gets (one for a small step,
all for a big one, all for a big output layer), and which thread may own an OpenMP team
(the engine thread alone).

A decode step of a small model is a hundred tiny ops. Splitting each across
threads costs a fork and a join per op, and while the other cores run the HTTP
front end (or a client on the same machine) a join can wait for a descheduled
thread: the contention trap PERF_NOTES describes. So a step whose work is below
SMALL_STEP_FLOPS runs on the engine thread alone; bigger steps (prefills,
large batches, large models) get every thread the engine was given.

The output layer is the exception inside a small step: one product over the whole
vocabulary, whose single fork and join are paid back from about a megaflop on. On the
Intel test host the tiny test model's [50257, 64] output layer takes 0.50 ms for one
row on one thread and 0.26 ms on two, which moved its single-stream step from 1.19 to
0.95 ms. The price: the second thread now spins between steps, on the core the event
loop uses, and a new request's first token comes about a millisecond later.

The engine thread's OpenMP team must also be the only one in the process. libgomp
gives each thread that runs a parallel op its own pool of workers, alive as long as
that thread; once the pools hold more threads than there are cores, every worker
stops spinning between parallel ops and sleeps on a futex instead, so each of the
hundreds of ops in a step pays a sleep and a wake. One idle pool left by the thread
that loaded the model took GPT-2 small's single-stream step from 22 to 28-34 ms
(24,000 context switches against 160 over 130 steps). So the heavy set-up work runs
on a thread of its own that ends with it (`in_passing_thread`), and the front end's
threads keep away from parallel torch ops (images are preprocessed with numpy).
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
# One row through a [2048, 64] output layer (0.26 MFLOP) is already faster on two threads
# (10 against 14 us); the margin keeps tiny vocabularies, such as the shipped model's 51
# tokens, on the step's thread.
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
