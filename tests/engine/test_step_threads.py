"""Small steps run on one intra-op thread, big ones (and a big output layer) on all the engine
was given; set-up work runs on a thread that takes its OpenMP pool away when it ends."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from app.engine.step_threads import (
    PARALLEL_OUTPUT_FLOPS,
    SMALL_STEP_FLOPS,
    StepThreads,
    flops_per_token,
    in_passing_thread,
)
from models.base import ModelInfo
from tests.torch_threads import intra_op_threads


def _info(device: str = "cpu") -> ModelInfo:
    return ModelInfo(
        name="tiny",
        architecture="GPT2LMHeadModel",
        num_layers=4,
        num_kv_heads=4,
        head_dim=16,
        hidden_size=64,
        vocab_size=50257,
        max_model_len=1024,
        dtype=torch.float32,
        device=torch.device(device),
        eos_token_ids=(50256,),
    )


@pytest.fixture
def two_threads() -> Iterator[None]:
    with intra_op_threads(2):
        yield


def test_flops_per_token_counts_layers_and_output_layer() -> None:
    assert flops_per_token(_info()) == 2.0 * (12 * 4 * 64 * 64 + 50257 * 64)


@pytest.mark.usefixtures("two_threads")
def test_small_steps_take_one_thread_and_big_steps_take_them_all_back() -> None:
    threads = StepThreads(_info())
    small = int(SMALL_STEP_FLOPS // threads.flops_per_token)  # the most tokens still small
    threads.apply(small)
    assert torch.get_num_threads() == 1
    threads.apply(small + 1)
    assert torch.get_num_threads() == 2
    threads.apply(1)
    assert torch.get_num_threads() == 1


@pytest.mark.usefixtures("two_threads")
def test_a_big_output_layer_takes_every_thread_inside_a_small_step() -> None:
    threads = StepThreads(_info())  # one row through [50257, 64]: 6.4 MFLOP
    threads.apply(1)
    threads.apply_to_output(1)
    assert torch.get_num_threads() == 2
    threads.apply(1)  # the next step's layers are back on one thread
    assert torch.get_num_threads() == 1


@pytest.mark.usefixtures("two_threads")
def test_a_small_output_layer_stays_on_the_steps_thread() -> None:
    vocab = 51  # the shipped model's: far below PARALLEL_OUTPUT_FLOPS even for a full batch
    threads = StepThreads(dataclasses.replace(_info(), vocab_size=vocab))
    rows = int(PARALLEL_OUTPUT_FLOPS // (2 * vocab * 64))  # the most rows still below it
    threads.apply(1)
    threads.apply_to_output(rows)
    assert torch.get_num_threads() == 1
    threads.apply_to_output(rows + 1)
    assert torch.get_num_threads() == 2


@pytest.mark.usefixtures("two_threads")
def test_other_devices_leave_the_threads_alone() -> None:
    threads = StepThreads(dataclasses.replace(_info(), device=torch.device("meta")))
    threads.apply(1)
    threads.apply_to_output(1)
    assert torch.get_num_threads() == 2


def _num_os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_passing_thread_returns_the_result_from_another_thread() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 42

    assert in_passing_thread(work) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()


def test_passing_thread_raises_the_error_on_the_caller() -> None:
    def work() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        in_passing_thread(work)


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_parallel_work_leaves_no_openmp_workers_behind(two_threads: None) -> None:
    """A parallel op starts OpenMP workers for its thread; they must end with that thread."""

    def parallel_op() -> int:
        torch.set_num_threads(2)  # this thread's own setting; the fixture restores the default
        torch.ones(1 << 22).mul_(2)  # far above the grain size: a parallel region
        return _num_os_threads()

    before = _num_os_threads()
    during = in_passing_thread(parallel_op)
    assert during > before  # the set-up thread, and its worker where there are 2+ cores
    # join() returns before the ending thread's destructors stop its workers: wait for them.
    deadline = time.monotonic() + 10
    while _num_os_threads() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    # At most: an earlier test's thread may still have been ending when `before` was read.
    assert _num_os_threads() <= before
