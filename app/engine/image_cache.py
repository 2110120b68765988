"""Vision-tower outputs kept by image content hash, least recently used evicted first."""

from __future__ import annotations

from collections import OrderedDict

import torch


class ImageEmbeddingCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._embeddings: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.queries = 0  # cumulative lookups of an image's first use in a step
        self.hits = 0

    def __len__(self) -> int:
        return len(self._embeddings)

    def __contains__(self, content_hash: str) -> bool:
        return content_hash in self._embeddings

    def clear(self) -> None:
        """Empty, with its counts back at zero."""
        self._embeddings.clear()
        self.queries = self.hits = 0

    def lookup(self, content_hash: str) -> torch.Tensor | None:
        """A counted lookup: the embedding [its tokens, hidden], or None."""
        self.queries += 1
        embedding = self.get(content_hash)
        if embedding is not None:
            self.hits += 1
        return embedding

    def get(self, content_hash: str) -> torch.Tensor | None:
        embedding = self._embeddings.get(content_hash)
        if embedding is not None:
            self._embeddings.move_to_end(content_hash)
        return embedding

    def put(self, content_hash: str, embedding: torch.Tensor) -> None:
        if self.capacity <= 0:
            return
        self._embeddings[content_hash] = embedding
        self._embeddings.move_to_end(content_hash)
        while len(self._embeddings) > self.capacity:
            self._embeddings.popitem(last=False)
