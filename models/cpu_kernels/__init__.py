"""C++ CPU kernels, compiled on first use with the machine's own compiler.

`torch.utils.cpp_extension` builds them once into its cache (~/.cache/torch_extensions,
or TORCH_EXTENSIONS_DIR) and loads the library, which registers its ops under
`torch.ops.mmgpt`. An image without a compiler ships the library built beside the same
torch and names it in MMGPT_CPU_KERNELS_LIBRARY (`python -m models.cpu_kernels` builds
it and prints its path). Where there is neither, or MMGPT_CPU_KERNELS=0, `available()`
is False and the models keep their torch path: the kernels are a speed-up, never a
requirement.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [
    Path(__file__).with_name(name)
    for name in ("decode_weights.cpp", "llama_decode.cpp", "gpt2_decode.cpp", "row_products.cpp")
]
NAME = "mmgpt_cpu_kernels"
DISABLE_VARIABLE = "MMGPT_CPU_KERNELS"  # "0": keep the torch path
LIBRARY_VARIABLE = "MMGPT_CPU_KERNELS_LIBRARY"  # a library built ahead, loaded as it is


@functools.cache
def library() -> str | None:
    """The loaded library's path, building it the first time this is asked; None where
    the kernels are off or cannot be had."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None
    started = time.perf_counter()
    try:
        path = _load_prebuilt(os.environ.get(LIBRARY_VARIABLE, "")) or _build()
    except Exception as error:  # no compiler, no ninja, a failed build: never fatal
        logger.warning("CPU kernels unavailable, decoding on the torch path: %s", error)
        return None
    logger.info("CPU kernels loaded from %s in %.1f s", path, time.perf_counter() - started)
    return path


def available() -> bool:
    return library() is not None


def int8_rows_available() -> bool:
    """The VNNI int8 product (int8_rows.h) runs here: the kernels load and the CPU has
    AVX-512 VNNI."""
    return available() and _cpu_runs("int8_linear_available")


def float_rows_available() -> bool:
    """The float32 row product (float_rows.h) runs here: the kernels load and the CPU has
    AVX-512."""
    return available() and _cpu_runs("float_linear_available")


@functools.cache
def _cpu_runs(probe: str) -> bool:
    """What a loaded library's probe op says of this CPU (asked once: it never changes)."""
    return bool(getattr(torch.ops.mmgpt, probe)())


def _load_prebuilt(path: str) -> str | None:
    if not path:
        return None
    torch.ops.load_library(path)
    return path


# cpp_extension holds a lock file in the build folder while it builds (or checks) the
# library, and every other load waits for it to go. A build takes about 20 s: a lock this
# old was left by a process killed mid-build, and would keep every later start waiting.
STALE_LOCK_SECONDS = 600


def _build() -> str:
    from torch.utils import cpp_extension

    clear_stale_lock(Path(cpp_extension._get_build_directory(NAME, verbose=False)))
    with _interpreter_tools_on_path():
        return cpp_extension.load(  # a path when not a module
            name=NAME,
            sources=[str(path) for path in SOURCES],
            # at::parallel_for runs on OpenMP; sqrt needs no errno branch
            extra_cflags=["-O3", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )


def clear_stale_lock(build_directory: Path) -> None:
    lock = build_directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        logger.warning("removing %s, left %.0f s ago by a build that never finished", lock, age)
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def _interpreter_tools_on_path() -> Iterator[None]:
    """cpp_extension looks for ninja on PATH; the ninja package installs it beside this
    interpreter, which an unactivated virtualenv leaves off PATH."""
    before = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), before])
    try:
        yield
    finally:
        os.environ["PATH"] = before


def main() -> None:
    """Build the library (or load the one named) and print its path."""
    path = library()
    if path is None:
        sys.exit("the CPU kernels could not be built or loaded (see the warning above)")
    print(path)
