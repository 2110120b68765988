"""End-to-end engine runs on a tiny random Llama: batching, chunking, preemption, caching, n."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from app.engine.sequence import SamplingParams
from app.engine.stats import StatsUpdate
from models.base import LoadedModel
from tests.engine.drive import Job, Sample, make_core, run_alone, run_jobs

FIRST_TEXT_TOKEN = 3  # ids below are <pad>, <s>, </s>
POISON = 5  # poisoned_llama's token whose embedding is NaN


def random_jobs(count: int, seed: int, **params: object) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        prompt = [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(rng.randint(1, 100))]
        sampling = SamplingParams(max_tokens=rng.randint(1, 40), **params)  # type: ignore[arg-type]
        jobs.append(Job(prompt, sampling))
    return jobs


def tokens(results: list[list[Sample]]) -> list[list[list[int]]]:
    return [[sample.token_ids for sample in samples] for samples in results]


def count_differences(a: list[list[Sample]], b: list[list[Sample]]) -> int:
    return sum(x != y for x, y in zip(tokens(a), tokens(b), strict=True))


def test_greedy_matches_transformers_generate(llama: LoadedModel) -> None:
    hf = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32)
    jobs = random_jobs(4, seed=1, temperature=0.0, ignore_eos=True)
    results = run_jobs(make_core(llama), jobs)
    for job, samples in zip(jobs, results, strict=True):
        generated = hf.generate(
            torch.tensor([job.prompt]),
            attention_mask=torch.ones(1, len(job.prompt), dtype=torch.long),
            max_new_tokens=job.params.max_tokens,
            do_sample=False,
            eos_token_id=None,
        )
        assert samples[0].token_ids == generated[0, len(job.prompt) :].tolist()


def test_64_concurrent_greedy_requests_match_each_alone(llama: LoadedModel) -> None:
    jobs = random_jobs(64, seed=2, temperature=0.0)
    together = run_jobs(make_core(llama, max_num_batched_tokens=128, max_num_seqs=64), jobs)
    alone = run_alone(make_core(llama), jobs)
    assert count_differences(together, alone) <= 1
    for job, samples in zip(jobs, together, strict=True):
        sample = samples[0]
        assert sample.finish_reason in ("stop", "length")
        if sample.finish_reason == "length":
            assert len(sample.token_ids) == job.params.max_tokens


def test_forced_preemption_gives_the_unconstrained_outputs(llama: LoadedModel) -> None:
    jobs = random_jobs(24, seed=3, temperature=0.0, ignore_eos=True)
    unconstrained = run_jobs(make_core(llama), jobs)
    # 160 tokens of cache (10 blocks of 16): every job fits alone, not all together.
    per_token = llama.info.kv_bytes_per_token()
    tight = make_core(llama, kv_cache_bytes=160 * per_token, max_num_batched_tokens=64)
    constrained = run_jobs(tight, jobs)
    assert tight.scheduler.num_preemptions > 0
    assert count_differences(constrained, unconstrained) <= 1
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks


def test_prefix_cache_reuses_a_shared_prompt_prefix(llama: LoadedModel) -> None:
    rng = random.Random(4)
    system = [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(70)]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    first = Job([*system, 11, 12, 13], params)
    second = Job([*system, 21, 22], params)
    core = make_core(llama)
    run_jobs(core, [first])
    hits_before = core.block_manager.prefix_cache_hits
    cached = run_jobs(core, [second])[0][0]
    assert cached.outputs[-1].num_cached_tokens == 64  # four full blocks of the 70 shared tokens
    assert core.block_manager.prefix_cache_hits - hits_before == 64
    uncached = run_jobs(make_core(llama, enable_prefix_caching=False), [second])[0][0]
    assert cached.token_ids == uncached.token_ids


def test_n_greedy_samples_share_the_prompt_and_equal_one_greedy_run(llama: LoadedModel) -> None:
    prompt = list(range(10, 47))  # 37 tokens: the last prompt block is shared and partial
    core = make_core(llama)
    single = run_jobs(core, [Job(prompt, SamplingParams(max_tokens=12, temperature=0.0))])
    group = run_jobs(core, [Job(prompt, SamplingParams(n=3, max_tokens=12, temperature=0.0))])
    assert [s.token_ids for s in group[0]] == [single[0][0].token_ids] * 3
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_seeded_sampling_is_the_same_alone_and_in_a_batch_of_32(llama: LoadedModel) -> None:
    jobs = random_jobs(32, seed=5, temperature=0.9, top_p=0.95)
    for i, job in enumerate(jobs):
        job.params.seed = 1000 + i if i % 2 == 0 else None
    together = run_jobs(make_core(llama, max_num_batched_tokens=256), jobs)
    seeded = [i for i in range(32) if i % 2 == 0]
    alone = run_alone(make_core(llama), [jobs[i] for i in seeded])
    assert tokens([together[i] for i in seeded]) == tokens(alone)
    assert len({tuple(t[0]) for t in tokens(together)}) > 16  # not all the same text


def test_bfloat16_seeded_sampling_is_the_same_alone_and_in_a_batch(
    llama_bf16: LoadedModel,
) -> None:
    """bf16 kernels round by shape: decode attention must see one shape per sequence
    whatever its batch (a sequence attended over its exact length alone, and padded in
    a batch, made 14 of these 32 differ)."""
    jobs = random_jobs(32, seed=4, temperature=0.9, top_p=0.95)
    for i, job in enumerate(jobs):
        job.params.seed = 100 + i
    together = run_jobs(make_core(llama_bf16), jobs)
    alone = run_alone(make_core(llama_bf16), jobs)
    assert count_differences(together, alone) <= 1


def test_a_request_whose_keys_and_values_turn_nan_harms_no_other(
    poisoned_llama: LoadedModel,
) -> None:
    """Its blocks, freed or in use, are read (masked) by others' padded attention, and a
    masked NaN still turns a row NaN: 22 of these 24 requests used to fail beside it."""
    clean = random_jobs(24, seed=7, temperature=0.0)
    for job in clean:
        job.prompt = [POISON + 1 if token == POISON else token for token in job.prompt]
    poisoned = [
        Job([3, 4, POISON, *range(10, 10 + n)], SamplingParams(max_tokens=20, temperature=0.0))
        for n in (20, 40, 5, 60)
    ]
    # a small cache, so that the poisoned requests' blocks are soon handed out again
    small = 40 * 16 * poisoned_llama.info.kv_bytes_per_token()
    core = make_core(poisoned_llama, max_num_batched_tokens=128, kv_cache_bytes=small)
    mixed = run_jobs(core, poisoned[:2] + clean[:12] + poisoned[2:] + clean[12:])
    assert all(samples[0].finish_reason == "error" for samples in mixed[:2] + mixed[14:16])
    alone = run_alone(make_core(poisoned_llama), clean)
    assert count_differences(mixed[2:14] + mixed[16:], alone) <= 1
    again = run_jobs(core, clean)  # in blocks the poisoned requests left behind
    assert count_differences(again, alone) <= 1


def test_the_decode_mirror_reports_the_memory_it_holds(
    llama: LoadedModel, decode_path: str
) -> None:
    updates: list[StatsUpdate] = []
    core = make_core(llama, updates.append, max_num_seqs=8)
    run_jobs(core, random_jobs(8, seed=9, temperature=0.0))
    mirror = core.runner.decode_mirror
    assert mirror is not None  # on the CPU; used only where it pays (here: "mirror")
    assert updates[-1].engine.decode_mirror_bytes == mirror.nbytes
    assert (mirror.nbytes > 0) == (decode_path == "mirror")


def test_n_seeded_samples_differ_and_repeat(llama: LoadedModel) -> None:
    job = Job(list(range(20, 40)), SamplingParams(n=4, max_tokens=10, seed=7, temperature=1.0))
    first = tokens(run_jobs(make_core(llama), [job]))
    again = tokens(run_jobs(make_core(llama), [job]))
    assert first == again
    assert len({tuple(t) for t in first[0]}) > 1


def test_logprobs_of_greedy_tokens_are_the_top_alternative(llama: LoadedModel) -> None:
    job = Job(list(range(30, 50)), SamplingParams(max_tokens=5, temperature=0.0, logprobs=3))
    sample = run_jobs(make_core(llama), [job])[0][0]
    for output in sample.outputs:
        assert output.logprobs is not None and len(output.logprobs) == 1
        entry = output.logprobs[0]
        assert entry.token_id == output.token_ids[0]
        assert len(entry.top_logprobs) <= 3
        assert entry.logprob == max(entry.top_logprobs.values())
        assert entry.logprob <= 0.0


def test_forked_samples_under_preemption_equal_one_greedy_run(llama: LoadedModel) -> None:
    prompts = [list(range(10 + k, 47 + k)) for k in range(4)]  # 37 tokens: shared partial block
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    singles = run_jobs(make_core(llama), [Job(p, greedy) for p in prompts])
    group_params = SamplingParams(n=3, max_tokens=24, temperature=0.0, ignore_eos=True)
    tight = make_core(llama, kv_cache_bytes=12 * 16 * llama.info.kv_bytes_per_token())
    groups = run_jobs(tight, [Job(p, group_params) for p in prompts])
    assert tight.scheduler.num_preemptions > 0
    for single, group in zip(singles, groups, strict=True):
        assert [s.token_ids for s in group] == [single[0].token_ids] * 3
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks


def _reference_prompt_logprobs(hf: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """transformers' log-softmax at each prompt position but the last [P - 1, vocab]."""
    with torch.inference_mode():
        logits = hf(torch.tensor([prompt])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _prompt_entries(samples: list[Sample]) -> list[list[tuple[int, float, list[int]]]]:
    entries = []
    for sample in samples:
        given = sample.outputs[0].prompt_logprobs
        assert given is not None
        assert all(output.prompt_logprobs is None for output in sample.outputs[1:])
        entries.append([(e.token_id, e.logprob, list(e.top_logprobs.values())) for e in given])
    return entries


def test_prompt_logprobs_match_transformers_through_chunks_cache_and_preemption(
    llama: LoadedModel,
) -> None:
    hf = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32)
    rng = random.Random(9)
    shared = [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(40)]
    prompts = [shared + [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(n)] for n in (9, 30)]
    prompts += [[rng.randrange(FIRST_TEXT_TOKEN, 384)]]  # one token: nothing to score
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, prompt_logprobs=3)
    forked = SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=1, prompt_logprobs=0)
    jobs = [Job(prompt, params) for prompt in prompts] * 3 + [Job(prompts[1], forked)]
    per_token = llama.info.kv_bytes_per_token()
    cores = {
        "chunked": make_core(llama, max_num_batched_tokens=16),
        "preempted": make_core(llama, kv_cache_bytes=112 * per_token, max_num_batched_tokens=32),
    }
    for name, core in cores.items():
        run_jobs(core, jobs[:1])  # the shared prefix now sits in the prefix cache
        results = run_jobs(core, jobs)
        if name == "preempted":
            assert core.scheduler.num_preemptions > 0
        for job, samples in zip(jobs, results, strict=True):
            reference = _reference_prompt_logprobs(hf, job.prompt)
            k = job.params.prompt_logprobs or 0
            expected = [
                (token, reference[i, token].item(), reference[i].topk(k).values.tolist())
                for i, token in enumerate(job.prompt[1:])
            ]
            for entries in _prompt_entries(samples):
                assert [e[0] for e in entries] == [e[0] for e in expected], name
                for (_, logprob, top), (_, want, want_top) in zip(entries, expected, strict=True):
                    assert logprob == pytest.approx(want, abs=1e-4), name
                    assert top == pytest.approx(want_top, abs=1e-4), name
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_prompt_logprobs_of_a_prompt_preempted_half_way(llama: LoadedModel) -> None:
    """A decode that needs a block preempts the newest sequence: here one part-way through
    a chunked prefill, which is then recomputed from its first token."""
    hf = AutoModelForCausalLM.from_pretrained(llama.path, dtype=torch.float32)
    rng = random.Random(10)
    decoding = [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(31)]  # 2 blocks, then 3
    prefilling = [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(70)]  # 5 blocks, chunked
    scored = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    jobs = [
        Job(decoding, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)),
        Job(prefilling, scored),
    ]
    per_token = llama.info.kv_bytes_per_token()
    core = make_core(llama, kv_cache_bytes=112 * per_token, max_num_batched_tokens=16)
    results = run_jobs(core, jobs)
    assert core.scheduler.num_preemptions > 0
    reference = _reference_prompt_logprobs(hf, prefilling)
    [entries] = _prompt_entries(results[1])
    assert [e[0] for e in entries] == prefilling[1:]
    expected = [reference[i, token].item() for i, token in enumerate(prefilling[1:])]
    assert [e[1] for e in entries] == pytest.approx(expected, abs=1e-4)
