"""C++ CPU kernels, compiled on first use with the machine's own compiler.

`torch.utils.cpp_extension` builds them once into its cache (~/.cache/torch_extensions,
or TORCH_EXTENSIONS_DIR) and loads the library, which registers its ops under
`torch.ops.mmgpt`. Where there is no compiler, or MMGPT_CPU_KERNELS=0, `available()` is
False and the models keep their torch path: the kernels are a speed-up, never a
requirement.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name("llama_decode.cpp")]
DISABLE_VARIABLE = "MMGPT_CPU_KERNELS"


@functools.cache
def available() -> bool:
    """Whether the kernels are loaded, building them the first time this is asked."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return False
    started = time.perf_counter()
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="mmgpt_cpu_kernels",
            sources=[str(path) for path in SOURCES],
            extra_cflags=["-O3", "-fopenmp"],  # at::parallel_for runs on OpenMP
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (OSError, RuntimeError, ImportError) as error:  # no compiler, or a failed build
        logger.warning("CPU kernels unavailable, decoding on the torch path: %s", error)
        return False
    logger.info("CPU kernels loaded in %.1f s", time.perf_counter() - started)
    return hasattr(torch.ops.mmgpt, "llama_decode")
