#!/usr/bin/env bash
# The GPU run, in one command that ends inside ten minutes (its stages' limits add up to
# 9.5) on an H100 or H200:
#   1. the engine's correctness on the device (`bench.gpu_check`: batch invariance,
#      preemption, seeded sampling, images, greedy against generate());
#   2. a random Llama of 1.1B parameters (`bench.checkpoints --size llama-1b`);
#   3. `bench.compare` in bf16 at 256 concurrent streams: mmgpt, then
#      `transformers serve --continuous-batching`, on that checkpoint.
# Each stage has its own time limit and writes into OUT as it goes, so a stage that fails
# or runs out of time leaves the others' results.
#
# The image-chat run is a second command of its own (its stages' limits add up to 8.5
# minutes): a random Qwen2.5-VL of about 2B parameters (`bench.qwen_vl_checkpoint --size
# 2b`: Qwen2.5-VL-3B's vision tower, Qwen2.5-1.5B's decoder), then `bench.compare` in
# bf16 on image chat of mixed sizes (VL_WORKLOAD), mmgpt then transformers, both held to
# the same output length (`--ban-eos`) so that their outputs can be compared.
#
#   bash bench/gpu_suite.sh OUT
#   DEVICE=cpu SIZE=llama-tiny PROMPTS=8 CONCURRENCY=4 bash bench/gpu_suite.sh OUT  # dry run
#   STAGES="checkpoint compare" bash bench/gpu_suite.sh OUT                           # some
#   STAGES="vl-checkpoint vl-compare" bash bench/gpu_suite.sh OUT                     # images
#   DEVICE=cpu VL_SIZE=tiny VL_CONTENDERS=mmgpt VL_PROMPTS=8 VL_CONCURRENCY=4 \
#       STAGES="vl-checkpoint vl-compare" bash bench/gpu_suite.sh OUT              # its dry run
#
# A host without a package index gets the serving stack as wheels in WHEELS (default
# .whl, filled by `bench/gpu_wheels.sh`), installed into a scratch folder first.
set -uo pipefail
OUT=${1:?usage: bench/gpu_suite.sh OUT}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-llama-1b}
PROMPTS=${PROMPTS:-512}
CONCURRENCY=${CONCURRENCY:-256}
WHEELS=${WHEELS:-.whl}
SCRATCH=${SCRATCH:-/tmp/mmgpt-gpu-suite}
STAGES=${STAGES:-gpu-check checkpoint compare}
VL_SIZE=${VL_SIZE:-2b}
VL_WORKLOAD=${VL_WORKLOAD:-chat-image-mixed}
VL_CONTENDERS=${VL_CONTENDERS:-mmgpt,transformers}
VL_PROMPTS=${VL_PROMPTS:-256}
VL_CONCURRENCY=${VL_CONCURRENCY:-64}
mkdir -p "$OUT" "$SCRATCH"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade \
        --target "$SCRATCH/site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$SCRATCH/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

stage() {  # stage NAME SECONDS COMMAND...: run, log to OUT/NAME.log, report its status
    local name=$1 limit=$2 start=$SECONDS status
    shift 2
    [[ " $STAGES " == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s)"
    timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    status=${PIPESTATUS[0]}
    echo "=== $name: status $status after $((SECONDS - start))s"
    return "$status"
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch",
        torch.__version__, "transformers", transformers.__version__)'
    nproc
} | tee "$OUT/machine.txt"

stage gpu-check 120 "$PY" -m bench.gpu_check --device "$DEVICE" --skip-throughput
checkpoint="$SCRATCH/$SIZE"
stage checkpoint 90 "$PY" -m bench.checkpoints "$checkpoint" --size "$SIZE" &&
stage compare 360 "$PY" -m bench.compare --model "$checkpoint" \
    --contenders mmgpt,transformers --workloads text --device "$DEVICE" --dtype bfloat16 \
    --threads 4 --mmgpt-args "--max-num-seqs $CONCURRENCY" \
    --num-prompts "$PROMPTS" --max-concurrency "$CONCURRENCY" --input-len 128 \
    --output-len 128 --ignore-eos --startup-timeout 150 --timeout 240 \
    --log-dir "$OUT" --json "$OUT/compare.json"

vl_checkpoint="$SCRATCH/qwen2.5-vl-$VL_SIZE"
stage vl-checkpoint 150 "$PY" -m bench.qwen_vl_checkpoint "$vl_checkpoint" --size "$VL_SIZE" &&
stage vl-compare 360 "$PY" -m bench.compare --model "$vl_checkpoint" \
    --contenders "$VL_CONTENDERS" --workloads "$VL_WORKLOAD" --image-source synthetic \
    --device "$DEVICE" --dtype bfloat16 --threads 4 --mmgpt-args "--max-num-seqs $VL_CONCURRENCY" \
    --num-prompts "$VL_PROMPTS" --max-concurrency "$VL_CONCURRENCY" --output-len 64 \
    --ban-eos --startup-timeout 150 --timeout 240 \
    --log-dir "$OUT/vl" --json "$OUT/vl-compare.json"
