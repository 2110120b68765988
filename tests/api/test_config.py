"""Settings: environment, flags generated from the fields, EngineConfig, the default model."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.cli import build_parser, flag_name, main, settings_from_args
from app.config import ENGINE_FIELDS_DERIVED, ModelPathError, Settings, default_model_path
from app.engine.config import EngineConfig


def _parse(*argv: str) -> Settings:
    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def _serve_help() -> str:
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        build_parser().parse_args(["serve", "--help"])
    return out.getvalue()


def test_every_setting_is_a_serve_flag() -> None:
    flags = set(re.findall(r"--[a-z-]+", _serve_help()))
    for name in Settings.model_fields:
        assert flag_name(name) in flags, name


def test_environment_is_read_with_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMGPT_PORT", "9001")
    monkeypatch.setenv("MMGPT_API_KEYS", "alpha, beta,")
    monkeypatch.setenv("MMGPT_ALLOWED_MEDIA_DOMAINS", "Images.Example.com.,cdn.example.com")
    monkeypatch.setenv("MMGPT_ENABLE_PREFIX_CACHING", "false")
    settings = Settings()
    assert settings.port == 9001
    assert settings.api_key_values() == ["alpha", "beta"]
    assert settings.allowed_media_domains == ["images.example.com", "cdn.example.com"]
    assert settings.enable_prefix_caching is False


def test_keys_never_show_in_the_settings_repr() -> None:
    settings = Settings(api_keys="very-secret-key")  # type: ignore[arg-type]
    assert "very-secret-key" not in repr(settings) and "very-secret-key" not in str(settings)


def test_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMGPT_PORT", "9001")
    monkeypatch.setenv("MMGPT_MAX_NUM_SEQS", "7")
    settings = _parse("--port", "9002", "--no-enable-prefix-caching", "--dtype", "bfloat16")
    assert settings.port == 9002
    assert settings.max_num_seqs == 7  # not given as a flag: the environment's
    assert settings.enable_prefix_caching is False
    assert settings.dtype == "bfloat16"


def test_bad_values_are_refused() -> None:
    with pytest.raises(SystemExit):
        _parse("--dtype", "int3")
    with pytest.raises(ValueError):
        _parse("--port", "seventy")


def test_engine_config_copies_every_engine_field(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    settings = Settings(model=str(tmp_path), max_num_seqs=3, kv_cache_bytes=12345, seed=9)
    config = settings.engine_config()
    assert config.model == str(tmp_path)
    for spec in dataclasses.fields(EngineConfig):
        if spec.name not in ENGINE_FIELDS_DERIVED:
            assert getattr(config, spec.name) == getattr(settings, spec.name), spec.name


def test_lora_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not Settings(model=str(tmp_path)).engine_config().enable_lora
    monkeypatch.setenv("MMGPT_LORA_MODULES", "a=/x/a, b = /x/b")
    config = Settings(model=str(tmp_path)).engine_config()
    assert config.enable_lora and config.lora_modules == (("a", "/x/a"), ("b", "/x/b"))
    monkeypatch.delenv("MMGPT_LORA_MODULES")
    flags = Settings(model=str(tmp_path), lora_modules=["a=/x/a", "c=/x/c,d=/x/d"])  # type: ignore[arg-type]
    assert [name for name, _ in flags.engine_config().lora_modules] == ["a", "c", "d"]
    assert Settings(model=str(tmp_path), allow_runtime_lora=True).engine_config().enable_lora
    from_flags = _parse("--lora-modules", "a=/x/a", "b=/x/b", "--api-keys", "k1,k2")
    assert from_flags.lora_modules == ["a=/x/a", "b=/x/b"]
    assert from_flags.api_key_values() == ["k1", "k2"]
    for wrong in (["a=/x", "a=/y"], ["nameless"], ["=/x"]):
        with pytest.raises(ValidationError):
            Settings(lora_modules=wrong)  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="2 adapters in lora_modules but max_loras is 1"):
        Settings(lora_modules=["a=/x", "b=/y"], max_loras=1)  # type: ignore[arg-type]


def test_engine_defaults_are_written_once(tmp_path: Path) -> None:
    """Settings' engine fields take EngineConfig's defaults: unset, the same config results."""
    (tmp_path / "config.json").write_text("{}")
    assert Settings(model=str(tmp_path)).engine_config() == EngineConfig(model=str(tmp_path))


def test_served_model_name(tmp_path: Path) -> None:
    folder = tmp_path / "my-checkpoint"
    assert Settings(model=str(folder)).model_id() == "my-checkpoint"
    assert Settings(model=str(folder), served_model_name="alias").model_id() == "alias"
    assert Settings().model_id() == "mmgpt-scenes"


def test_default_model_lives_in_the_models_package() -> None:
    assert default_model_path().parts[-3:] == ("models", "checkpoints", "mmgpt-scenes")


def test_missing_model_fails_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ModelPathError, match=r"No checkpoint"):
        Settings(model=str(tmp_path / "nothing")).model_path()
    assert main(["serve", "--model", str(tmp_path / "nothing")]) == 2
    assert "No checkpoint at" in capsys.readouterr().err


def test_a_gguf_file_or_a_folder_holding_one_is_a_model(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"GGUF")  # the loader reads it; only the path is checked
    assert Settings(model=str(tmp_path / "model.gguf")).model_path() == tmp_path / "model.gguf"
    assert Settings(model=str(tmp_path)).model_path() == tmp_path
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelPathError, match=r"a \.gguf file or a folder holding one"):
        Settings(model=str(tmp_path / "notes.txt")).model_path()
