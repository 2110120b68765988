"""`mmgpt serve --model x.gguf`: a GGUF file served end to end, greedy text as transformers'."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.checkpoints import make_tiny_qwen3
from tests.conftest import ServerProcess, start_server
from tests.gguf_files import write_gguf

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_qwen3(tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def gguf_server(
    qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    path = write_gguf(qwen3_dir, tmp_path_factory.mktemp("gguf") / "tiny-qwen3.gguf", "f32")
    process = start_server(path, tmp_path_factory.mktemp("gguf-logs"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def _reference_text(folder: Path, prompt: str) -> str:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    input_ids = torch.tensor([tokenizer(prompt).input_ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, max_new_tokens=MAX_TOKENS, do_sample=False)
    return str(tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True))


def test_a_gguf_file_answers_completions_and_chats(
    gguf_server: ServerProcess, qwen3_dir: Path
) -> None:
    client = OpenAI(base_url=f"{gguf_server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny-qwen3.gguf"]
    prompt = "the red circle is left of"
    completion = client.completions.create(
        model="tiny-qwen3.gguf", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0
    )
    expected = _reference_text(qwen3_dir, prompt)
    assert expected and completion.choices[0].text == expected
    chat = client.chat.completions.create(
        model="tiny-qwen3.gguf",
        messages=[{"role": "user", "content": "describe the picture"}],
        max_tokens=MAX_TOKENS,
        temperature=0.0,
    )
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage is not None and chat.usage.prompt_tokens > 5  # the file's chat template
