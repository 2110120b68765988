"""What machine a benchmark ran on, read from the machine itself.

python -m bench.machine        # prints the Markdown block BENCHMARKS.md opens with
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

# The CPU features that decide matmul speed: AVX2/AVX-512 for fp32, AVX512-BF16/AMX for bf16.
_FLAGS_OF_INTEREST = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_bf16",
    "avx512_vnni",
    "amx_bf16",
    "amx_tile",
)


def _cpuinfo() -> dict[str, str]:
    path = Path("/proc/cpuinfo")
    if not path.exists():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _gpu() -> str:
    import torch

    if not torch.cuda.is_available():
        return "none"
    return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))


def machine_info() -> dict[str, Any]:
    cpu = _cpuinfo()
    flags = set(cpu.get("flags", "").split())
    return {
        "cpu": cpu.get("model name", platform.processor()),
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "cpu_flags": [flag for flag in _FLAGS_OF_INTEREST if flag in flags],
        "cpu_flags_absent": [flag for flag in _FLAGS_OF_INTEREST if flag not in flags],
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "gpu": _gpu(),
    }


def as_markdown(info: dict[str, Any]) -> str:
    rows = [
        f"| {key} | {', '.join(value) if isinstance(value, list) else value} |"
        for key, value in info.items()
    ]
    return "\n".join(["| | |", "|---|---|", *rows])


if __name__ == "__main__":
    print(as_markdown(machine_info()))
