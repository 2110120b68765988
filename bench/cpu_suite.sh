#!/usr/bin/env bash
# Every CPU table of BENCHMARKS.md in one run, on a quiet machine (about 35 minutes on
# 2 cores, plus llama.cpp's one-time build): the machine, its ceilings, and each side-by-side
# comparison. Reports (JSON) and server logs go to $OUT (default bench-results/); each table
# is printed as it ends.
#
#   bash bench/cpu_suite.sh [OUT]
#
# Needs the bench extra for the peer: pip install -e '.[bench]'.
set -euo pipefail

OUT=${1:-bench-results}
PY=${PYTHON:-.venv/bin/python}
CKPT=${CKPT:-/tmp/mmgpt-bench}
SCENES=models/checkpoints/mmgpt-scenes
THREADS=${THREADS:-$(nproc)}
mkdir -p "$OUT" "$CKPT"

for size in tiny small; do
    [ -f "$CKPT/gpt2-$size/config.json" ] || "$PY" -m bench.checkpoints "$CKPT/gpt2-$size" --size "$size"
done
# the same tiny weights, with top_p in the generation config (see bench/checkpoints.py)
[ -f "$CKPT/gpt2-tiny-top-p/config.json" ] ||
    "$PY" -m bench.checkpoints "$CKPT/gpt2-tiny-top-p" --size tiny --top-p 0.9
[ -f "$CKPT/llava-base/config.json" ] || "$PY" -m bench.llava_checkpoint "$CKPT/llava-base"
[ -f "$CKPT/llama-135m/config.json" ] || "$PY" -m bench.checkpoints "$CKPT/llama-135m" --size llama-135m
[ -f "$CKPT/qwen2.5-vl/config.json" ] ||
    "$PY" -m bench.qwen_vl_checkpoint "$CKPT/qwen2.5-vl" --size scaled

compare() {  # name, then bench.compare flags
    local name=$1
    shift
    echo "== $name"
    "$PY" -m bench.compare --threads "$THREADS" --log-dir "$OUT/logs-$name" \
        --json "$OUT/$name.json" "$@"
}

"$PY" -m bench.machine | tee "$OUT/machine.txt"

echo "== ceilings"
"$PY" -m bench.ceiling --model "$CKPT/gpt2-small" --batch-sizes 1,8,32,64 --dtypes float32 \
    --threads "$THREADS" --json "$OUT/ceiling-small.json"
"$PY" -m bench.ceiling --model "$CKPT/gpt2-tiny" --batch-sizes 1,8,32,64 --dtypes float32 \
    --threads "$THREADS" --json "$OUT/ceiling-tiny.json"

compare scenes-chat-image --model "$SCENES" --workloads chat-image --num-prompts 48 \
    --max-concurrency 16 --output-len 32 --ban-eos --image-source scenes
compare scenes-vision --model "$SCENES" --contenders mmgpt --workloads caption,qa \
    --num-prompts 48 --max-concurrency 16 --output-len 32
compare repeat-image --model "$SCENES" --contenders mmgpt --workloads qa --repeat-image 2 \
    --num-prompts 32 --max-concurrency 1 --output-len 16
# The same on a ViT-B/16 tower, where encoding and prefilling the image is the real cost.
compare repeat-image-llava --model "$CKPT/llava-base" --contenders mmgpt --workloads qa \
    --repeat-image 2 --num-prompts 16 --max-concurrency 1 --output-len 16 --image-source synthetic

# Native-resolution images of eight sizes, two in every fourth request; both sides ban EOS
# by the same rule, so that every output must equal mmgpt's (the "same" column).
compare qwen2.5-vl-chat-image-mixed --model "$CKPT/qwen2.5-vl" --contenders mmgpt,transformers \
    --workloads chat-image-mixed --num-prompts 16 --max-concurrency 8 --output-len 32 --ban-eos

compare tiny-c32 --model "$CKPT/gpt2-tiny" --workloads text --num-prompts 128 \
    --max-concurrency 32 --input-len 32 --output-len 64 --ban-eos
# The naive server decodes GPT-2 small at a few tokens/s: it would take a quarter of an hour.
compare small-c32 --model "$CKPT/gpt2-small" --contenders mmgpt,transformers --workloads text \
    --num-prompts 64 --max-concurrency 32 --input-len 32 --output-len 64 --ban-eos
# bf16 (AVX512-BF16 or AMX): mmgpt in bf16 against the peer in its default fp32, then both in bf16.
compare small-c32-bf16 --model "$CKPT/gpt2-small" --contenders mmgpt,transformers \
    --mmgpt-args="--dtype bfloat16" --workloads text --num-prompts 64 --max-concurrency 32 \
    --input-len 32 --output-len 64 --ban-eos
compare small-c32-both-bf16 --model "$CKPT/gpt2-small" --contenders mmgpt,transformers \
    --dtype bfloat16 --workloads text --num-prompts 64 --max-concurrency 32 --input-len 32 \
    --output-len 64 --ban-eos

# Sampled at temperature 1 (the OpenAI default), as most clients ask, rather than greedy.
compare tiny-c32-sampled --model "$CKPT/gpt2-tiny" --contenders mmgpt,transformers \
    --workloads text --num-prompts 128 --max-concurrency 32 --input-len 32 --output-len 64 \
    --ban-eos --temperature 1.0
compare small-c32-sampled --model "$CKPT/gpt2-small" --contenders mmgpt,transformers \
    --workloads text --num-prompts 64 --max-concurrency 32 --input-len 32 --output-len 64 \
    --ban-eos --temperature 1.0
compare tiny-c32-top-p --model "$CKPT/gpt2-tiny-top-p" --contenders mmgpt,transformers \
    --workloads text --num-prompts 128 --max-concurrency 32 --input-len 32 --output-len 64 \
    --ban-eos --temperature 1.0 --top-p 0.9

compare tiny-c1 --model "$CKPT/gpt2-tiny" --workloads text --num-prompts 16 \
    --max-concurrency 1 --input-len 32 --output-len 128 --ban-eos
# The same stream against the bare loop, in alternating windows (bench/loop_share.py): the
# tiny model's speed moves with the host's other tenants, so the two are measured together.
echo "== loop-share-tiny"
"$PY" -m bench.loop_share --model "$CKPT/gpt2-tiny" --threads "$THREADS" --rounds 12 \
    --contenders mmgpt,mmgpt-each-token --log-dir "$OUT/logs-loop-share-tiny" |
    tee "$OUT/loop-share-tiny.txt"
compare small-c1 --model "$CKPT/gpt2-small" --contenders mmgpt,mmgpt-int8,transformers,llama.cpp \
    --workloads text --num-prompts 4 --max-concurrency 1 --input-len 32 --output-len 128 --ban-eos

# llama.cpp's own server on the same weights (f32 and Q8_0 GGUF; built once, ~14 minutes),
# beside mmgpt in each weight form: fp32, bf16 and int8.
compare llama135m-c1 --model "$CKPT/llama-135m" \
    --contenders mmgpt,mmgpt-bf16,mmgpt-int8,llama.cpp,llama.cpp-q8 --workloads text \
    --num-prompts 8 --max-concurrency 1 --input-len 32 --output-len 128 --ban-eos
compare llama135m-c32 --model "$CKPT/llama-135m" \
    --contenders mmgpt,mmgpt-bf16,mmgpt-int8,llama.cpp,llama.cpp-q8 --workloads text \
    --num-prompts 128 --max-concurrency 32 --input-len 32 --output-len 64 --ban-eos
compare llama135m-c64 --model "$CKPT/llama-135m" \
    --contenders mmgpt,mmgpt-bf16,mmgpt-int8,llama.cpp,llama.cpp-q8 --workloads text \
    --num-prompts 128 --max-concurrency 64 --input-len 32 --output-len 64 --ban-eos
compare small-c32-llama.cpp --model "$CKPT/gpt2-small" --contenders mmgpt,mmgpt-int8,llama.cpp \
    --workloads text --num-prompts 64 --max-concurrency 32 --input-len 32 --output-len 64 --ban-eos

compare efficiency-small --model "$CKPT/gpt2-small" --contenders mmgpt --workloads text \
    --num-prompts 128 --max-concurrency 64 --input-len 32 --output-len 128 --ignore-eos
compare efficiency-tiny --model "$CKPT/gpt2-tiny" --contenders mmgpt --workloads text \
    --num-prompts 256 --max-concurrency 64 --input-len 32 --output-len 128 --ignore-eos
