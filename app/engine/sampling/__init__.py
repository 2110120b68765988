"""Sampling: one token per row of a step's logits (see `sampler.Sampler.sample`)."""

from app.engine.sampling.logprobs import RowLogprobs
from app.engine.sampling.sampler import Sampler, SamplerOutput

__all__ = ["RowLogprobs", "Sampler", "SamplerOutput"]
