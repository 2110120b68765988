"""LoRA adapters in the engine: rows of two adapters and of the base in one batch give
transformers + peft's tokens and logprobs through chunked prefill, preemption and prefix-cache
hits; the caches never share across adapters; unloading lets requests in flight finish."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from app.engine.engine_core import EngineCore
from app.engine.errors import AdapterLoadError, AdapterNotFoundError
from app.engine.sequence import SamplingParams
from tests.engine.drive import Job, Sample, load, make_core, run_jobs
from tests.engine.test_engine_images import image_job, make_images
from tests.lora_adapters import LLAVA_DECODER, PROJECTOR, make_adapter, peft_reference

FIRST_TEXT_TOKEN = 3
TOLERANCE = 1e-4
ADAPTERS = {
    "alpha": {"rank": 3, "targets": ["q_proj", "v_proj", "down_proj"], "seed": 11},
    "beta": {
        "rank": 6,
        "targets": ["k_proj", "o_proj", "gate_proj", "up_proj"],
        "seed": 12,
        "use_rslora": True,
    },
}


@pytest.fixture(scope="module")
def adapter_dirs(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: make_adapter(llama_dir, root / name, **spec)  # type: ignore[arg-type]
        for name, spec in ADAPTERS.items()
    }


def lora_core(folder: Path, adapters: dict[str, Path], **overrides: object) -> EngineCore:
    loaded = load(folder)  # a fresh model: adapter slots wrap its layers' products
    modules = tuple((name, str(path)) for name, path in adapters.items())
    return make_core(
        loaded, enable_lora=True, max_loras=3, max_lora_rank=8, lora_modules=modules, **overrides
    )


def mixed_jobs(seed: int) -> list[Job]:
    """Two prompts sharing a 40-token prefix, each asked of the base and both adapters."""
    rng = random.Random(seed)
    shared = [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(40)]
    prompts = [shared + [rng.randrange(FIRST_TEXT_TOKEN, 384) for _ in range(n)] for n in (7, 21)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    return [Job(p, params, adapter=a) for p in prompts for a in (None, *ADAPTERS)]


def check_against_peft(job: Job, sample: Sample, reference: torch.nn.Module) -> None:
    prompt = torch.tensor([job.prompt])
    with torch.no_grad():
        generated = reference.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=job.params.max_tokens,
            do_sample=False,
            eos_token_id=None,
        )[0, len(job.prompt) :].tolist()
        full = torch.tensor([job.prompt + generated])
        logprobs = torch.log_softmax(reference(input_ids=full).logits[0].float(), dim=-1)
    assert sample.token_ids == generated, job.adapter
    rows = logprobs[len(job.prompt) - 1 : -1]  # [generated, vocab]: the rows that sampled
    given = [out.logprobs[0] for out in sample.outputs if out.logprobs]
    assert [e.logprob for e in given] == pytest.approx(rows.max(-1).values.tolist(), abs=TOLERANCE)
    top = [sorted(e.top_logprobs.values(), reverse=True) for e in given]
    assert top == [pytest.approx(row.topk(2).values.tolist(), abs=TOLERANCE) for row in rows]


@pytest.mark.parametrize("decode_path", ["gather", "mirror"], indirect=True)
@pytest.mark.parametrize("setting", ["whole", "chunked", "preempted"])
def test_mixed_adapters_match_peft(
    llama_dir: Path, adapter_dirs: dict[str, Path], setting: str, decode_path: str
) -> None:
    if setting == "whole":  # prompts in one step: each adapter's rows gathered
        core = lora_core(llama_dir, adapter_dirs)
    elif setting == "chunked":  # small steps: every slot on every row, masked
        core = lora_core(llama_dir, adapter_dirs, max_num_batched_tokens=16)
    else:
        per_token = load(llama_dir).info.kv_bytes_per_token()
        core = lora_core(
            llama_dir, adapter_dirs, kv_cache_bytes=144 * per_token, max_num_batched_tokens=32
        )
    jobs = mixed_jobs(seed=1)
    run_jobs(core, jobs[:3])  # the shared prefix is now cached, once per adapter and the base
    hits_before = core.block_manager.prefix_cache_hits
    results = run_jobs(core, jobs)
    assert core.block_manager.prefix_cache_hits > hits_before
    if setting == "preempted":
        assert core.scheduler.num_preemptions > 0
    folders: dict[str | None, Path | None] = {None: None, **adapter_dirs}
    references = {name: peft_reference(llama_dir, folder) for name, folder in folders.items()}
    for job, samples in zip(jobs, results, strict=True):
        check_against_peft(job, samples[0], references[job.adapter])
    assert len({tuple(samples[0].token_ids) for samples in results[:3]}) == 3
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def test_prefix_blocks_are_never_shared_across_adapters(
    llama_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    core = lora_core(llama_dir, adapter_dirs)
    prompt = list(range(FIRST_TEXT_TOKEN, FIRST_TEXT_TOKEN + 50))
    params = SamplingParams(max_tokens=2, temperature=0.0)
    cached = {}
    for adapter in ("alpha", None, "beta", "alpha"):
        result = run_jobs(core, [Job(prompt, params, adapter=adapter)])[0][0]
        cached.setdefault(adapter, []).append(result.outputs[-1].num_cached_tokens)
    assert cached == {"alpha": [0, 48], None: [0], "beta": [0]}


def test_unloading_lets_requests_in_flight_finish(
    llama_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    job = Job([1, 40, 41, 42, 43], params, adapter="alpha")
    expected = run_jobs(lora_core(llama_dir, adapter_dirs), [job])[0][0].token_ids
    core = lora_core(llama_dir, adapter_dirs)
    core.add_request("r", job.prompt, params, sink=0, adapter_name="alpha")
    tokens: list[int] = []
    for output in (delivery.output for delivery in core.step()):
        tokens += output.token_ids
    core.unload_adapter("alpha")
    with pytest.raises(AdapterNotFoundError):
        core.add_request("late", job.prompt, params, adapter_name="alpha")
    assert [name for name, _, _ in core.snapshot().adapter_requests] == ["beta", "alpha"]
    while core.has_unfinished:
        tokens += [t for delivery in core.step() for t in delivery.output.token_ids]
    assert tokens == expected
    assert core.adapters.names == ["beta"]
    assert [name for name, _, _ in core.snapshot().adapter_requests] == ["beta"]
    core.load_adapter("alpha", str(adapter_dirs["alpha"]))  # its slot is free again
    assert run_jobs(core, [job])[0][0].token_ids == expected


def test_load_refusals(llama_dir: Path, adapter_dirs: dict[str, Path], tmp_path: Path) -> None:
    core = lora_core(llama_dir, adapter_dirs)
    with pytest.raises(AdapterLoadError, match="already loaded"):
        core.load_adapter("alpha", str(adapter_dirs["beta"]))
    with pytest.raises(AdapterLoadError, match="not a PEFT adapter folder"):
        core.load_adapter("gamma", str(tmp_path))
    core.load_adapter("gamma", str(adapter_dirs["beta"]))
    with pytest.raises(AdapterLoadError, match="all 3 adapter slots are in use"):
        core.load_adapter("delta", str(adapter_dirs["beta"]))
    off = make_core(load(llama_dir))
    with pytest.raises(AdapterLoadError, match="adapters are off"):
        off.load_adapter("alpha", str(adapter_dirs["alpha"]))


def test_an_adapter_of_the_projector_keys_the_image_cache(llava_dir: Path, tmp_path: Path) -> None:
    targets = LLAVA_DECODER.format("q_proj|down_proj") + "|" + PROJECTOR
    adapter = make_adapter(
        llava_dir, tmp_path / "p", rank=4, targets=targets, seed=5, multimodal=True
    )
    core = lora_core(llava_dir, {"seen": adapter})
    loaded = load(llava_dir)
    image = make_images(loaded, 1, seed=6)[0]
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    base_job = image_job(loaded, [[1, 20], image, [30, 31]], params)
    jobs = [base_job, Job(base_job.prompt, params, base_job.spans, adapter="seen")]
    results = run_jobs(core, jobs)
    assert core.runner.image_cache.queries == 2 and core.runner.image_cache.hits == 0
    for job, samples, folder in zip(jobs, results, [None, adapter], strict=True):
        reference = peft_reference(llava_dir, folder, multimodal=True)
        prompt = torch.tensor([job.prompt])
        generated = reference.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            pixel_values=torch.from_numpy(image.pixel_values)[None],
            max_new_tokens=6,
            do_sample=False,
            eos_token_id=None,
        )
        assert samples[0].token_ids == generated[0, len(job.prompt) :].tolist(), job.adapter


def test_prompt_logprobs_and_forked_samples_under_an_adapter(
    llama_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    core = lora_core(llama_dir, adapter_dirs, max_num_batched_tokens=16)
    prompt = [1, *range(FIRST_TEXT_TOKEN + 7, FIRST_TEXT_TOKEN + 40)]
    params = SamplingParams(
        max_tokens=5, temperature=0.0, ignore_eos=True, prompt_logprobs=0, logprobs=2, n=2
    )
    samples = run_jobs(core, [Job(prompt, params, adapter="beta")])[0]
    reference = peft_reference(llama_dir, adapter_dirs["beta"])
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([prompt])).logits[0]
    expected = torch.log_softmax(logits.float(), dim=-1)[:-1].gather(
        1, torch.tensor(prompt[1:])[:, None]
    )[:, 0]
    given = samples[0].outputs[0].prompt_logprobs
    assert given is not None
    assert [e.logprob for e in given] == pytest.approx(expected.tolist(), abs=TOLERANCE)
    for sample in samples:
        check_against_peft(Job(prompt, params, adapter="beta"), sample, reference)
