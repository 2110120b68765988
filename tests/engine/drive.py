"""Helpers that drive an EngineCore to completion and collect what each sample produced."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from app.engine.config import EngineConfig
from app.engine.engine_core import EngineCore
from app.engine.sequence import ImageSpan, RequestOutput, SamplingParams
from app.engine.stats import StatsSink, ignore_stats
from models import load_model
from models.base import LoadedModel


@dataclass
class Sample:
    token_ids: list[int] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    outputs: list[RequestOutput] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.deltas)


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams
    spans: tuple[ImageSpan, ...] = ()
    adapter: str | None = None  # a LoRA adapter's name; None: the base model


def load(folder: Path) -> LoadedModel:
    return load_model(folder, "cpu", torch.float32)


def make_core(
    loaded: LoadedModel, on_stats: StatsSink = ignore_stats, **overrides: object
) -> EngineCore:
    config = EngineConfig(model=loaded.path, **overrides)  # type: ignore[arg-type]
    return EngineCore(config, loaded, on_stats)


def run_jobs(core: EngineCore, jobs: list[Job], max_steps: int = 10_000) -> list[list[Sample]]:
    """Submit every job at once and step until all finish; samples per job, by index."""
    results = [[Sample() for _ in range(job.params.n)] for job in jobs]
    for i, job in enumerate(jobs):
        core.add_request(
            f"job{i}", job.prompt, job.params, job.spans, sink=i, adapter_name=job.adapter
        )
    for _ in range(max_steps):
        if not core.has_unfinished:
            break
        for job_index, output in core.step():
            sample = results[job_index][output.index]
            sample.token_ids += output.token_ids
            sample.deltas.append(output.text)
            sample.outputs.append(output)
            sample.finish_reason = output.finish_reason
    assert not core.has_unfinished, "the engine did not finish"
    return results


def run_alone(core: EngineCore, jobs: list[Job]) -> list[list[Sample]]:
    return [run_jobs(core, [job])[0] for job in jobs]


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="mmgpt-engine-test-"))
