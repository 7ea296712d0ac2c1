"""Checks on the curves picture a job draws (llama_stack_provider_trl/curves.py)."""

from pathlib import Path

import numpy as np
from PIL import Image

LINE = np.array([31, 119, 180])  # matplotlib's first line colour, "C0": the training series


def assert_shows_curves(path: Path) -> None:
    """The file decodes as a PNG, is not one flat colour, and has lines drawn in it (not only empty axes)."""
    with Image.open(path) as image:
        assert image.format == "PNG", image.format
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 10, f"{path} is (nearly) one flat colour"
    near_line = int((np.abs(pixels - LINE) <= 40).all(axis=1).sum())
    assert near_line > 100, f"{path} has no curve drawn in it ({near_line} pixels of the line colour)"
