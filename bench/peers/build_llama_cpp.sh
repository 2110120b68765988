#!/usr/bin/env bash
# Build llama.cpp's `llama-server` and `llama-quantize` once, from the llama.cpp tree that the
# registry's llama-cpp-python sdist carries (the only source this machine may fetch), into a cache
# outside the repository. Prints the cache folder on its last line.
#
#   bench/peers/build_llama_cpp.sh            # build (or reuse) the pinned version
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 LLAMA_CPP_CACHE=~/.cache/mmgpt bench/peers/build_llama_cpp.sh
#
# The folder holds bin/llama-server, bin/llama-quantize and src/ (the tree, whose
# convert_hf_to_gguf.py and gguf-py turn a Hugging Face folder into an f32 GGUF).
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${LLAMA_CPP_CACHE:-$HOME/.cache/mmgpt}/llama.cpp-$version"
python="${PYTHON:-python3}"

if [[ -x "$cache/bin/llama-server" && -x "$cache/bin/llama-quantize" ]]; then
    echo "$cache"
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
"$python" -m pip download "llama-cpp-python==$version" --no-binary :all: --no-deps \
    -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
mkdir -p "$cache"
rm -rf "$cache/src"
mv "$work/llama_cpp_python-$version/vendor/llama.cpp" "$cache/src"

# Native code for this CPU (as llama.cpp's own release builds do for a local machine); no curl,
# no GPU back end, only the two programs the comparison runs.
cmake -S "$cache/src" -B "$cache/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON >&2
cmake --build "$cache/build" --target llama-server llama-quantize -j "$(nproc)" >&2
# The programs load their shared libraries from build/bin (their run path): keep it there.
ln -sfn build/bin "$cache/bin"
echo "$cache"
