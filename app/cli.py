"""`mmgpt serve [flags]`, the one place that parses the server's arguments, and `mmgpt bench`.

The flags of `serve` are generated from the fields of `Settings`, so every
setting is a flag (`--max-body-bytes`), an environment variable
(`MMGPT_MAX_BODY_BYTES`) and a row of the README's table, with one source of truth.
Flags given on the command line win over the environment. `mmgpt bench ...` hands
its arguments to the serving benchmark (bench/serve.py), which has its own flags.
`mmgpt finetune ...` trains a LoRA adapter (models/finetune); its flags are parsed here,
with the defaults of `FinetuneConfig`, once the subcommand is known (they import torch).
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from app import __version__
from app.config import ModelPathError, Settings


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _is_list(annotation: Any) -> bool:
    return annotation is list or typing.get_origin(annotation) is list


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(choice) for choice in typing.get_args(annotation)]
    return None


def _metavar(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        names = [_metavar(arg) for arg in typing.get_args(annotation) if arg is not type(None)]
        return names[0] if names else "VALUE"
    if origin is list or annotation is list:
        return "A,B,..."
    name = getattr(annotation, "__name__", "value")
    return "TEXT" if name == "str" else name.upper()


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; absent flags stay absent so the environment applies."""
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        help_text = _help(field)
        if _is_bool(annotation):
            parser.add_argument(
                flag_name(name), action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
        else:
            parser.add_argument(
                flag_name(name), default=argparse.SUPPRESS, choices=_choices(annotation),
                metavar=None if _choices(annotation) else _metavar(annotation), help=help_text,
                nargs="+" if _is_list(annotation) else None,
            )  # fmt: skip


def _help(field: FieldInfo) -> str:
    shown = field.default_factory is None and field.default is not None
    default = f" (default: {field.default})" if shown else ""
    return ((field.description or "") + default).replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmgpt", description="An OpenAI-compatible server for multimodal GPTs."
    )
    parser.add_argument("--version", action="version", version=f"mmgpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Serve a model over HTTP.",
        description="Serve a model over HTTP. Every flag is also an MMGPT_<NAME> variable.",
    )
    add_settings_flags(serve)
    commands.add_parser(
        "bench",
        add_help=False,  # `mmgpt bench --help` is the benchmark's own help
        help="Benchmark a running server (every flag: mmgpt bench --help).",
    )
    commands.add_parser(
        "finetune",
        add_help=False,  # parsed by finetune_parser(), which needs torch for its defaults
        help="Train a LoRA adapter on fine-tuning JSONL (every flag: mmgpt finetune --help).",
    )
    return parser


def finetune_parser() -> argparse.ArgumentParser:
    from models.finetune import FinetuneConfig

    defaults = {name: field.default for name, field in FinetuneConfig.__dataclass_fields__.items()}
    parser = argparse.ArgumentParser(
        prog="mmgpt finetune",
        description="Train a LoRA adapter (a standard PEFT folder) on OpenAI fine-tuning JSONL: "
        'one {"messages": [...]} per line, images as image_url parts (data: URLs or file '
        "paths relative to the JSONL file); the loss is on the assistant turns only.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--model", type=Path, required=True, help="the base checkpoint folder")
    parser.add_argument("--data", type=Path, required=True, help="training JSONL")
    parser.add_argument(
        "--eval", dest="eval_data", type=Path, metavar="EVAL", help="evaluation JSONL"
    )
    parser.add_argument("--out", type=Path, required=True, help="the adapter folder to write")
    for name, kind, help_text in FINETUNE_KNOBS:
        shown = "" if defaults[name] is None else f" (default: {defaults[name]})"
        parser.add_argument(flag_name(name), type=kind, help=help_text + shown)
    parser.add_argument(
        "--target-modules", type=lambda text: tuple(filter(None, text.split(","))),
        metavar="A,B,...", help="leaf names of the decoder's linear layers to adapt "
        "(default: every attention and MLP projection)",
    )  # fmt: skip
    parser.add_argument(
        "--train-projector", action="store_true", help="also adapt the multimodal projector"
    )
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no bar")
    return parser


FINETUNE_KNOBS: list[tuple[str, Callable[[str], Any], str]] = [
    ("rank", int, "LoRA rank"),
    ("alpha", int, "LoRA alpha (the update is scaled by alpha / rank)"),
    ("dropout", float, "LoRA dropout"),
    ("learning_rate", float, "AdamW learning rate"),
    ("epochs", int, "passes over the training data"),
    ("max_steps", int, "stop after this many optimizer steps, whatever --epochs says"),
    ("batch_size", int, "examples per step"),
    ("seed", int, "seed of the LoRA initialisation and the shuffling"),
    ("threads", int, "torch intra-op threads (default: torch's own choice)"),
    ("device", str, "cpu, cuda, cuda:1, ..."),
]


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    return Settings(**overrides)


def run_serve(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
        settings.model_path()  # fail now, with a clear message, rather than after startup
    except (ValidationError, ModelPathError) as error:
        print(f"mmgpt serve: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from app.main import create_app  # imports torch: only once the arguments are known good
    from app.server import serve

    return serve(create_app(settings), settings)


def run_bench(argv: Sequence[str]) -> int:
    """`mmgpt bench ...`: bench.serve parses its own flags (imported only when asked for)."""
    from bench.serve import main as bench_main

    return bench_main(list(argv))


def run_finetune(argv: Sequence[str]) -> int:
    """`mmgpt finetune ...`: every bad line of the data is reported before training starts."""
    from models import ModelLoadError

    try:
        from models.finetune import DataError, FinetuneConfig, finetune
    except ModuleNotFoundError as error:  # peft is an extra: the serving image leaves it out
        print(f"mmgpt finetune needs {error.name}: pip install 'mmgpt[finetune]'", file=sys.stderr)
        return 2

    args = finetune_parser().parse_args(list(argv))
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        metrics = finetune(FinetuneConfig(**vars(args)))
    except DataError as error:
        print(f"mmgpt finetune: the data has {len(error.problems)} problems:", file=sys.stderr)
        print(str(error), file=sys.stderr)
        return 2
    except (ModelLoadError, ValueError) as error:
        print(f"mmgpt finetune: {error}", file=sys.stderr)
        return 2
    last = metrics["epochs"][-1]
    print(f"adapter written to {args.out} after {metrics['steps']} steps: {last}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:
        return run_bench(arguments[1:])
    if arguments[:1] == ["finetune"]:
        return run_finetune(arguments[1:])
    args = build_parser().parse_args(arguments)
    if args.command == "serve":
        return run_serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
