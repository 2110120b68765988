"""The stats an engine hands its sink: after each step and each abort, adding up to its work."""

from __future__ import annotations

from app.engine.sequence import SamplingParams
from app.engine.stats import StatsUpdate
from models.base import LoadedModel
from tests.engine.drive import Job, make_core, run_jobs


def test_step_and_request_stats_add_up_to_what_the_callers_got(llama: LoadedModel) -> None:
    updates: list[StatsUpdate] = []
    core = make_core(llama, updates.append, max_num_seqs=4)  # eight jobs: some wait
    jobs = [
        Job(list(range(10, 20 + 7 * i)), SamplingParams(n=1 + i % 2, max_tokens=3 + i))
        for i in range(8)
    ]
    results = run_jobs(core, jobs)
    steps = [update.step for update in updates if update.step is not None]
    assert len(steps) == len(updates) == core.num_steps
    generated = [sum(len(sample.token_ids) for sample in samples) for samples in results]
    assert sum(step.num_generated_tokens for step in steps) == sum(generated)
    finished = [request for update in updates for request in update.finished]
    expected = [(len(job.prompt), tokens) for job, tokens in zip(jobs, generated, strict=True)]
    assert sorted((r.num_prompt_tokens, r.num_generation_tokens) for r in finished) == sorted(
        expected
    )
    assert all(r.time_to_first_token is not None and r.queue_time is not None for r in finished)
    assert max(update.engine.num_waiting for update in updates) > 0
    last = updates[-1].engine
    assert (last.num_running, last.num_waiting, last.num_free_blocks) == (0, 0, last.num_blocks)
    assert last.prefix_cache_queries == core.block_manager.prefix_cache_queries > 0
    assert last.num_steps == core.num_steps and last.last_step_end == core.last_step_end


def test_an_abort_reports_the_request_and_the_blocks_it_freed(llama: LoadedModel) -> None:
    updates: list[StatsUpdate] = []
    core = make_core(llama, updates.append)
    core.add_request("r", list(range(10, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    core.step()
    core.step()
    assert updates[-1].engine.num_running == 1 and updates[-1].finished == ()
    core.abort_request("r")
    abort = updates[-1]
    assert abort.step is None and len(updates) == 3
    assert abort.engine.num_running == 0
    assert abort.engine.num_free_blocks == abort.engine.num_blocks
    (request,) = abort.finished
    assert (request.num_prompt_tokens, request.num_generation_tokens) == (20, 2)
    assert request.decode_time is not None
    core.abort_request("r")  # no longer known: nothing changed, nothing reported
    assert core.abort_all() == [] and len(updates) == 3
