"""Would torch.compile shorten a decode step? One Llama MLP block, eager against compiled.

The block is a decode step's per-layer tail at SmolLM2-135M's shape: RMSNorm, the fused
gate/up product, SiLU(gate) * up, the down product and the residual, on `--rows` rows, with
the weights in each form the engine serves (float32 packed by oneDNN, FBGEMM int8):

    python -m bench.compile_probe --threads 2 --rows 1 32

Prints microseconds per block call, best of `--repeats` rounds, and the compile time. The
compiled function is built once per form with static shapes (its most favourable case).
Dynamo cannot trace a oneDNN-packed tensor, so the float32 row compiles the plain-weight
block (weights as module parameters) with inductor's freezing on, which packs them itself.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.cpu_weights import FbgemmInt8Weight, PackedWeight
from models.linear import PreparedWeight

HIDDEN, INTERMEDIATE = 576, 1536
Block = Callable[[torch.Tensor], torch.Tensor]


def mlp(hidden: torch.Tensor, gate_up: Block, down: Block, norm: torch.Tensor) -> torch.Tensor:
    """The block itself, with each product given as a function of its input."""
    normed = F.rms_norm(hidden, (HIDDEN,), norm, 1e-5)
    gate, up = gate_up(normed).chunk(2, dim=-1)
    return hidden + down(F.silu(gate) * up)


def mlp_block(gate_up: PreparedWeight, down: PreparedWeight, norm: torch.Tensor) -> Block:
    return lambda hidden: mlp(
        hidden, lambda x: gate_up.linear(x, None), lambda x: down.linear(x, None), norm
    )


class PlainMlp(torch.nn.Module):
    """The float32 block with its weights as module parameters, which freezing packs."""

    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor, norm: torch.Tensor) -> None:
        super().__init__()
        self.gate_up = torch.nn.Parameter(gate_up, requires_grad=False)
        self.down = torch.nn.Parameter(down, requires_grad=False)
        self.norm = torch.nn.Parameter(norm, requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return mlp(
            hidden,
            lambda x: F.linear(x, self.gate_up),
            lambda x: F.linear(x, self.down),
            self.norm,
        )


def microseconds(block: Block, rows: torch.Tensor, calls: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(calls):
            block(rows)
        best = min(best, (time.perf_counter() - started) / calls)
    return best * 1e6


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gate_up = torch.randn(2 * INTERMEDIATE, HIDDEN) * 0.02
    down = torch.randn(HIDDEN, INTERMEDIATE) * 0.02
    norm = torch.ones(HIDDEN)
    torch._inductor.config.freezing = True
    int8_block = mlp_block(FbgemmInt8Weight(gate_up), FbgemmInt8Weight(down), norm)
    # name: (the block as the engine runs it, the block handed to torch.compile)
    forms: dict[str, tuple[Block, Block]] = {
        "float32 packed": (
            mlp_block(PackedWeight(gate_up), PackedWeight(down), norm),
            PlainMlp(gate_up, down, norm).eval(),
        ),
        "int8 FBGEMM": (int8_block, int8_block),
    }
    print(f"torch {torch.__version__}, {args.threads} threads; us per MLP block, best of "
          f"{args.repeats}")  # fmt: skip
    print("| weights | rows | eager | compiled | compile s |\n|---|---|---|---|---|")
    for name, (block, traced) in forms.items():
        for num_rows in args.rows:
            rows = torch.randn(num_rows, HIDDEN)
            torch._dynamo.reset()  # a fresh compile for each shape, under no recompile limit
            started = time.perf_counter()
            compiled = torch.compile(traced, dynamic=False)
            compiled(rows)
            compile_s = time.perf_counter() - started
            eager = microseconds(block, rows, args.calls, args.repeats)
            fast = microseconds(compiled, rows, args.calls, args.repeats)
            print(f"| {name} | {num_rows} | {eager:.1f} | {fast:.1f} | {compile_s:.1f} |")


if __name__ == "__main__":
    main()
