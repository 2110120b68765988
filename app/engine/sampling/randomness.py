"""Random numbers for the draws, one stream per seeded sequence.

A seeded row draws its numbers from its own generator, so its tokens depend only on its
own logits and seed, not on its batch-mates (a refused draw takes its next number from
the same generator); unseeded rows share the sampler's generator.
"""

from __future__ import annotations

import torch

from app.engine.sequence import Sequence


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index` of a request seeded with `seed`."""
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 64)


class RowRandomness:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)  # unseeded rows

    def uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One number in [0, 1) per row [R] float64: from the row's own generator if seeded."""

        def draw(count: int, generator: torch.Generator) -> torch.Tensor:
            return torch.rand(count, dtype=torch.float64, device=self.device, generator=generator)

        uniforms = draw(len(seqs), self.generator)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                uniforms[i] = draw(1, self._generator_of(seq))[0]
        return uniforms

    def exponential_noise(self, like: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Exp(1) noise of `like`'s shape [R, vocab], each seeded row's from its own
        generator."""
        noise = torch.empty_like(like)  # [R, vocab]
        unseeded = [i for i, seq in enumerate(seqs) if seq.params.seed is None]
        if len(unseeded) == len(seqs):
            return noise.exponential_(generator=self.generator)
        if unseeded:
            noise[unseeded] = torch.empty(
                (len(unseeded), like.shape[1]), device=like.device
            ).exponential_(generator=self.generator)
        for i, seq in enumerate(seqs):
            if seq.params.seed is not None:
                noise[i].exponential_(generator=self._generator_of(seq))
        return noise

    def _generator_of(self, seq: Sequence) -> torch.Generator:
        if seq.generator is None:
            seed = sample_seed(seq.params.seed or 0, seq.index)
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        generator: torch.Generator = seq.generator
        return generator
