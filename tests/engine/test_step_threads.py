"""Small steps run on one intra-op thread, big ones on all the engine was given."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from app.engine.step_threads import SMALL_STEP_FLOPS, StepThreads, flops_per_token
from models.base import ModelInfo


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
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


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
def test_other_devices_leave_the_threads_alone() -> None:
    StepThreads(dataclasses.replace(_info(), device=torch.device("meta"))).apply(1)
    assert torch.get_num_threads() == 2
