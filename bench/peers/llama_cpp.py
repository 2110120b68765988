"""llama.cpp's own server as a contender: its build, the checkpoint as GGUF, its command line.

`llama-server` and `llama-quantize` are built once by bench/peers/build_llama_cpp.sh into a cache
outside the repository. The checkpoint under test is converted by the same tree's
convert_hf_to_gguf.py to an f32 GGUF (the weights exactly as mmgpt loads them), then quantised to
Q8_0 where asked; both files are cached next to the build, keyed by the checkpoint's path and
modification time.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

BUILD_SCRIPT = Path(__file__).with_name("build_llama_cpp.sh")
QUANTS = ("f32", "q8_0")


def llama_cpp_home() -> Path:
    """The cache folder with bin/ and src/, built on first use (minutes)."""
    env = os.environ | {"PYTHON": sys.executable}
    out = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], env=env, check=True, capture_output=True, text=True
    )
    return Path(out.stdout.strip().splitlines()[-1])


def gguf_file(model: str, quant: str, home: Path | None = None) -> Path:
    """The checkpoint folder `model` as a GGUF of `quant` (f32 or q8_0), converted once."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    home = home or llama_cpp_home()
    folder = home / "gguf" / _checkpoint_key(Path(model))
    f32 = folder / "model-f32.gguf"
    if not f32.exists():
        _convert(home, Path(model), f32)
    if quant == "f32":
        return f32
    quantised = folder / f"model-{quant}.gguf"
    if not quantised.exists():
        _run([str(home / "bin" / "llama-quantize"), str(f32), str(quantised), quant.upper()])
    return quantised


def server_command(
    model: str, quant: str, host: str, port: int, threads: int, parallel: int, context: int
) -> list[str]:
    """`llama-server` with the thread count of every contender and one slot per stream.

    Each slot gets `context` tokens (llama-server splits -c among its slots); warm-up off so
    that start-up does the same work as the other contenders' readiness."""
    home = llama_cpp_home()
    return [
        str(home / "bin" / "llama-server"),
        *("-m", str(gguf_file(model, quant, home))),
        *("--host", host, "--port", str(port)),
        *("--threads", str(threads), "--threads-batch", str(threads)),
        *("--parallel", str(parallel), "--ctx-size", str(context * parallel)),
        "--cont-batching",
        "--no-webui",
    ]


def _checkpoint_key(model: Path) -> str:
    stamp = "|".join(
        f"{p.name}:{p.stat().st_mtime_ns}:{p.stat().st_size}" for p in sorted(model.iterdir())
    )
    return hashlib.sha256(f"{model.resolve()}|{stamp}".encode()).hexdigest()[:16]


def _convert(home: Path, model: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    converter = [sys.executable, "-m", "bench.peers.llama_cpp_convert"]
    _run([*converter, str(home / "src"), str(model), str(out)], env)


def _run(command: list[str], env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-2000:]}")
