"""Everything in a checkpoint folder besides the weights: config, tokenizer, processor.

Each reader turns a missing or broken file into a `ModelLoadError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, PretrainedConfig
from transformers.utils import is_torchvision_available

from models.errors import ModelLoadError

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MMGPT_FILE = "mmgpt.json"
PREPROCESSOR_CONFIG_FILE = "preprocessor_config.json"
PROCESSOR_CONFIG_FILE = "processor_config.json"
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Generation-config keys that are token ids or bookkeeping, not sampling defaults.
NON_SAMPLING_KEYS = frozenset(
    {"transformers_version", "_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id"}
)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ModelLoadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ModelLoadError(path, f"invalid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(path, "expected a JSON object")
    return data


def read_architecture(folder: Path, supported: list[str]) -> str:
    """The one supported entry of config.json's `architectures`."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise ModelLoadError(path, "missing: not a Hugging Face checkpoint folder")
    architectures = read_json(path).get("architectures") or []
    for architecture in architectures:
        if architecture in supported:
            return str(architecture)
    named = ", ".join(map(str, architectures)) or "none"
    raise ModelLoadError(
        path, f"unsupported architecture ({named}); supported: {', '.join(supported)}"
    )


def load_config(folder: Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a bad config
        raise ModelLoadError(folder / CONFIG_FILE, f"invalid model config ({exc})") from exc


def load_tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        wanted = " or ".join(TOKENIZER_FILES)
        raise ModelLoadError(folder, f"no tokenizer files found (expected {wanted})")
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # a broken tokenizer file surfaces as many exception types
        raise ModelLoadError(folder, f"cannot load the tokenizer ({exc})") from exc


def load_image_processor(folder: Path) -> Any:
    kwargs: dict[str, Any] = {}
    if int(transformers.__version__.split(".")[0]) >= 5 and not is_torchvision_available():
        kwargs["backend"] = "pil"  # the default torchvision backend is not installed
    try:
        try:
            return AutoImageProcessor.from_pretrained(str(folder), **kwargs)
        except ImportError:  # transformers 5.17 (and others) gate the Auto class on torchvision
            return _named_image_processor(folder)
    except Exception as exc:  # a missing or broken preprocessor config
        raise ModelLoadError(
            folder, f"cannot load the image processor ({PREPROCESSOR_CONFIG_FILE}) ({exc})"
        ) from exc


def _named_image_processor(folder: Path) -> Any:
    """The image processor class the checkpoint names, in its PIL form where the installed
    transformers has one (the torchvision form is what failed to import)."""
    if (folder / PREPROCESSOR_CONFIG_FILE).is_file():
        settings = read_json(folder / PREPROCESSOR_CONFIG_FILE)
    else:  # the newer layout: one processor file, the image processor's settings inside
        settings = read_json(folder / PROCESSOR_CONFIG_FILE).get("image_processor", {})
    base = str(settings["image_processor_type"]).removesuffix("Fast")
    processor_class = getattr(transformers, f"{base}Pil", None) or getattr(transformers, base)
    return processor_class.from_pretrained(str(folder))


def generation_config(folder: Path) -> dict[str, Any]:
    path = folder / GENERATION_CONFIG_FILE
    return read_json(path) if path.is_file() else {}


def sampling_defaults(gen_config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in gen_config.items() if key not in NON_SAMPLING_KEYS}


def processor_chat_template(folder: Path) -> str | None:
    """The chat template a processor saved beside the tokenizer, which the tokenizer does not
    read: `chat_template.json` of folders saved before `chat_template.jinja` existed."""
    path = folder / LEGACY_CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    template = read_json(path).get("chat_template")
    if not isinstance(template, str) or not template:
        raise ModelLoadError(path, "chat_template must be a non-empty string")
    return template


def caption_prompt(folder: Path, default: str) -> str:
    path = folder / MMGPT_FILE
    if not path.is_file():
        return default
    prompt = read_json(path).get("caption_prompt", default)
    if not isinstance(prompt, str) or not prompt:
        raise ModelLoadError(path, "caption_prompt must be a non-empty string")
    return prompt


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list | tuple) else [int(value)]


def eos_token_ids(
    gen_config: dict[str, Any], configs: list[Any], tokenizer: Any
) -> tuple[int, ...]:
    """generation_config's EOS ids first, then the model config's, then the tokenizer's."""
    found = _ids(gen_config.get("eos_token_id"))
    for config in configs:
        found += _ids(getattr(config, "eos_token_id", None))
    found += _ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(dict.fromkeys(found))


def first_token_id(
    key: str, gen_config: dict[str, Any], configs: list[Any], tokenizer: Any
) -> int | None:
    """The first of generation_config / model configs / tokenizer that names `key`."""
    candidates = [gen_config.get(key)]
    candidates += [getattr(config, key, None) for config in configs]
    candidates.append(getattr(tokenizer, key, None))
    for candidate in candidates:
        ids = _ids(candidate)
        if ids:
            return ids[0]
    return None
