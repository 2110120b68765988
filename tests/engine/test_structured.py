"""response_format: a random model held to a JSON schema gives JSON that matches it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from app.engine.sampling.processors import blocked_tokens
from app.engine.sequence import SamplingParams
from app.engine.structured import GrammarError, StructuredOutputs
from models.base import LoadedModel
from tests.engine.drive import Job, make_core, run_jobs

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "shape": {"enum": ["circle", "square", "triangle"]},
        "count": {"type": "integer", "minimum": 1, "maximum": 9},
        "big": {"type": "boolean"},
    },
    "required": ["shape", "count", "big"],
    "additionalProperties": False,
}


def _matches(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"shape", "count", "big"}
        and value["shape"] in ("circle", "square", "triangle")
        and isinstance(value["count"], int)
        and 1 <= value["count"] <= 9
        and isinstance(value["big"], bool)
    )


def test_every_sample_is_json_matching_the_schema(llama: LoadedModel) -> None:
    core = make_core(llama)
    grammar = core.structured.json_schema_grammar(SCHEMA)
    jobs = [
        Job(
            [5, 6, 7],
            SamplingParams(max_tokens=64, temperature=0, ignore_eos=True, grammar=grammar),
        ),
        Job([8, 9], SamplingParams(max_tokens=64, n=3, seed=2, grammar=grammar)),
        Job([8, 9], SamplingParams(max_tokens=64, temperature=1.5, top_p=0.9, grammar=grammar)),
    ]
    unconstrained = Job([5, 6, 7], SamplingParams(max_tokens=16, temperature=0.0))
    free = run_jobs(make_core(llama), [unconstrained])
    *results, beside = run_jobs(core, [*jobs, unconstrained])
    assert beside[0].token_ids == free[0][0].token_ids  # a row without a schema is untouched
    samples = [sample for job_samples in results for sample in job_samples]
    assert len(samples) == 5
    for sample in samples:
        assert sample.finish_reason == "stop", sample.text
        assert _matches(sample.text), sample.text
        assert ": " in sample.text and "\n" not in sample.text  # compact, one line
    assert not _parses(free[0][0].text)  # the model alone writes no such thing
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_json_object_mode_stops_at_the_closing_brace(llama: LoadedModel) -> None:
    core = make_core(llama)
    grammar = core.structured.json_schema_grammar({"type": "object"})
    params = SamplingParams(max_tokens=200, temperature=0.0, grammar=grammar)
    [[sample]] = run_jobs(core, [Job([5, 6, 7], params)])
    assert isinstance(json.loads(sample.text), dict)


def test_invalid_schemas_and_unreadable_tokenizers_are_grammar_errors(
    llama: LoadedModel,
) -> None:
    structured = StructuredOutputs(llama.tokenizer, llama.info.vocab_size, (2,))
    with pytest.raises(GrammarError):
        structured.json_schema_grammar({"type": "no-such-type"})
    wordpiece = AutoTokenizer.from_pretrained(REPO_ROOT / "models/checkpoints/mmgpt-scenes")
    unreadable = StructuredOutputs(wordpiece, len(wordpiece), (wordpiece.sep_token_id,))
    for _ in range(2):  # the failure is remembered, and reported each time
        with pytest.raises(GrammarError, match="tokenizer"):
            unreadable.json_schema_grammar(SCHEMA)


def test_tokens_past_the_tokenizer_are_never_allowed(llama: LoadedModel) -> None:
    """A model's output layer may be wider than its tokenizer (padded vocabularies)."""
    tokenizer_size = len(llama.tokenizer)
    wider = tokenizer_size + 40
    structured = StructuredOutputs(llama.tokenizer, wider, (2,))
    matcher = structured.matcher(structured.json_schema_grammar(SCHEMA))
    allowed = ~blocked_tokens([matcher], wider, torch.device("cpu"))
    assert allowed.shape == (1, wider)
    assert allowed[0, :tokenizer_size].any() and not allowed[0, tokenizer_size:].any()
    first = llama.tokenizer.decode(allowed[0].nonzero().flatten().tolist()[:1])
    assert first.startswith("{")


def test_schemas_hold_through_preemption(llama: LoadedModel) -> None:
    """A preempted sample is recomputed from its tokens; its matcher, which saw each token
    once, goes on from where it was."""
    per_token = llama.info.kv_bytes_per_token()
    core = make_core(llama, kv_cache_bytes=96 * per_token, max_num_batched_tokens=32)
    grammar = core.structured.json_schema_grammar(SCHEMA)
    params = SamplingParams(max_tokens=64, temperature=1.0, n=2, seed=5, grammar=grammar)
    prompts = [[10 + i] * (20 + 7 * i) for i in range(6)]
    results = run_jobs(core, [Job(prompt, params) for prompt in prompts])
    assert core.scheduler.num_preemptions > 0
    for samples in results:
        for sample in samples:
            assert sample.finish_reason == "stop" and _matches(sample.text), sample.text
