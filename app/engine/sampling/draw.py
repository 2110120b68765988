"""The last stage: each row cut down by its top_k, top_p and min_p, and one token drawn;
greedy rows take the argmax.

A GPU draws by the exponential race (argmax of probs / Exp(1) noise) after masking the
rows (`truncation`). The race needs a random number for every token, which on the CPU
costs more than a small model's whole step, so the CPU inverts the cumulative
distribution instead, with one number per row, applying top_p and min_p by accepting or
refusing each draw (`draw_cpu`). The race stays on the GPU, where noise is cheap,
because it is the steadier of the two: a bf16 GEMM there rounds differently for each
batch shape, which moves a race's winner only on a near tie but a cumulative draw by the
sum of every earlier token's rounding. (On the CPU a row's logits come out the same in
any batch: `bench.gpu_check --device cpu`.)
"""

from __future__ import annotations

import torch

from app.engine.sampling.draw_cpu import draw_truncated
from app.engine.sampling.kernels import argmax, probabilities
from app.engine.sampling.randomness import RowRandomness
from app.engine.sampling.truncation import Truncation
from app.engine.sequence import Sequence


def draw_tokens(
    scaled: torch.Tensor,
    seqs: list[Sequence],
    greedy: list[bool],
    randomness: RowRandomness,
    by_race: bool,
) -> torch.Tensor:
    """One token per row [N] of `scaled` [N, vocab] (the logits after temperature, which
    the draw truncates in place): argmax for greedy rows, a truncated draw for others."""
    rows = [i for i, is_greedy in enumerate(greedy) if not is_greedy]
    if len(rows) < len(seqs):
        token_ids = argmax(scaled)  # [N]
    else:
        token_ids = torch.empty(len(seqs), dtype=torch.int64, device=scaled.device)
    if not rows:
        return token_ids
    if len(rows) == len(seqs):
        sub, sub_seqs = scaled, seqs  # truncated in place: nothing reads it after
    else:
        sub, sub_seqs = scaled[rows], [seqs[i] for i in rows]  # [R, vocab]
    truncation = Truncation.of(sub_seqs, sub.shape[1])
    if by_race:
        truncation.mask_logits(sub)
        probs = probabilities(sub)  # [R, vocab]
        noise = randomness.exponential_noise(probs, sub_seqs)  # [R, vocab]
        token_ids[rows] = argmax(probs.div_(noise))
        return token_ids

    def uniforms(indices: list[int]) -> torch.Tensor:
        return randomness.uniforms([sub_seqs[i] for i in indices])

    token_ids[rows] = draw_truncated(sub, truncation, uniforms)
    return token_ids
