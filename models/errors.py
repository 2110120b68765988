"""The one error a broken or unsupported checkpoint folder raises."""

from __future__ import annotations

from pathlib import Path


class ModelLoadError(Exception):
    """A checkpoint folder cannot be served; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")
