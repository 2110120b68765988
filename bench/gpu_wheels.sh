#!/usr/bin/env bash
# Wheels of the serving stack for a GPU host that has torch, transformers and the rest of
# a CUDA Python image but no package index: fetched here, at the versions this checkout's
# .venv runs, for that host's Python; `bench/gpu_suite.sh` installs them from DIR.
#
#   bash bench/gpu_wheels.sh [DIR] [PYTHON_VERSION]      # default: .whl 3.12
#
# Pure-Python wheels serve any version; pydantic-core and jiter are built per Python,
# llguidance once for every CPython 3 (abi3).
set -euo pipefail
DIR=${1:-.whl}
PYVER=${2:-3.12}
VENV_PY=${VENV_PY:-.venv/bin/python}
# mmgpt's server (pydantic-settings reads its settings) and `transformers serve` (the
# openai package's types); torch, transformers, tokenizers, numpy, pillow, httpx, aiohttp,
# anyio, uvloop and prometheus-client are expected on the host.
PACKAGES=(fastapi starlette pydantic pydantic-core pydantic-settings python-dotenv
    annotated-types typing-inspection opentelemetry-api uvicorn python-multipart openai jiter
    distro sniffio httpx2 httpcore2 truststore llguidance)

pins=()
for name in "${PACKAGES[@]}"; do  # the .venv's version; the newest where it has none
    version=$("$VENV_PY" -c 'import sys, importlib.metadata as m; print(m.version(sys.argv[1]))' \
        "$name" 2>/dev/null) && pins+=("$name==$version") || pins+=("$name")
done
mkdir -p "$DIR"
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$DIR" "${pins[@]}"
ls "$DIR"
