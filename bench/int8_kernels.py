"""int8 and packed float32 products against plain float32, over SmolLM2-135M's matrices.

Times one decode step's products (30 layers of q/k/v, o, gate/up, down) and, apart, the
output layer, for each way of multiplying:

    python -m bench.int8_kernels --threads 2

- fp32: F.linear on the float32 weights;
- packed: models/cpu_weights.py's PackedWeight (float32 in oneDNN's layout);
- fbgemm: models/cpu_weights.py's FbgemmInt8Weight (int8, activations quantised per row);
- widen: models/linear.py's Int8Weight (int8 widened, then F.linear, then the scales);
- int8pack: PyTorch's torch.ops.aten._weight_int8pack_mm;
- torchao: torchao's Int8WeightOnlyConfig on nn.Linear, when torchao is installed.
Best of `--repeats` passes, milliseconds; compare only within one run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from models.cpu_weights import FbgemmInt8Weight, PackedWeight
from models.linear import Int8Weight

LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))  # [out, in]
NUM_LAYERS = 30
OUTPUT_SHAPE = (49_152, 576)
Method = Callable[[torch.Tensor], torch.Tensor]


def methods(weight: torch.Tensor) -> dict[str, Method]:
    """Each way to compute x @ weight.T, set up once for this weight."""
    quantized = Int8Weight.quantize(weight)
    packed, fbgemm = PackedWeight(weight), FbgemmInt8Weight(weight)
    found: dict[str, Method] = {
        "fp32": lambda x: F.linear(x, weight),
        "packed": lambda x: packed.linear(x, None),
        "fbgemm": lambda x: fbgemm.linear(x, None),
        "widen": lambda x: quantized.linear(x, None),
        "int8pack": lambda x: torch.ops.aten._weight_int8pack_mm(
            x, quantized.values, quantized.scales
        ),
    }
    torchao = _torchao_linear(weight)
    if torchao is not None:
        found["torchao"] = torchao
    return found


def _torchao_linear(weight: torch.Tensor) -> Method | None:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return None
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    quantize_(linear, Int8WeightOnlyConfig())
    return linear


Timed = list[tuple[Method, int]]  # each product with its fan-in, in the order a step meets them


def build(shapes: Sequence[tuple[int, int]]) -> dict[str, Timed]:
    by_method: dict[str, Timed] = {}
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features) * 0.02
        for name, method in methods(weight).items():
            by_method.setdefault(name, []).append((method, in_features))
    return by_method


@torch.inference_mode()
def best_passes_ms(by_method: dict[str, Timed], rows: int, repeats: int) -> dict[str, float]:
    """Each method's best pass; the methods alternate so that a noisy moment hits them all."""
    inputs = {k: torch.randn(rows, k) for timed in by_method.values() for _, k in timed}
    best = dict.fromkeys(by_method, float("inf"))
    for _ in range(repeats):
        for name, timed in by_method.items():
            started = time.perf_counter()
            for product, fan_in in timed:
                product(inputs[fan_in])
            best[name] = min(best[name], 1000 * (time.perf_counter() - started))
    return best


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    parts = {
        "30 layers": build(LAYER_SHAPES * NUM_LAYERS),
        "output layer": build([OUTPUT_SHAPE]),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms, best of {args.repeats}"
    )
    names = list(parts["30 layers"])
    print("| part | rows | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for part, by_method in parts.items():
        for rows in args.rows:
            best = best_passes_ms(by_method, rows, args.repeats)
            cells = " | ".join(f"{best[name]:.1f}" for name in names)
            print(f"| {part} | {rows} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
