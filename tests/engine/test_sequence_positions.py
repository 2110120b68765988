"""RopePositions: a prompt's multi-section positions, continued past it by the offset."""

from __future__ import annotations

import numpy as np

from app.engine.sequence import RopePositions
from models.mrope import prompt_positions


def test_columns_continue_the_prompt_by_the_offset() -> None:
    prompt, offset = prompt_positions(7, [2], [(1, 2, 2)])  # text, text, a 2x2 image, text
    assert prompt.tolist() == [
        [0, 1, 2, 2, 2, 2, 4],
        [0, 1, 2, 2, 3, 3, 4],
        [0, 1, 2, 3, 2, 3, 4],
    ]
    assert offset == -2  # the image's four tokens took two positions
    positions = RopePositions(prompt, offset)
    # the last two prompt tokens, then two past it at p + offset in every section
    expected = [[2, 4, 5, 6], [3, 4, 5, 6], [3, 4, 5, 6]]
    np.testing.assert_array_equal(positions.columns(5, 9), expected)
    np.testing.assert_array_equal(positions.columns(8, 9), [[6], [6], [6]])
