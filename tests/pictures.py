"""Checks on the curves picture a job draws (llama_stack_provider_trl/curves.py)."""

from pathlib import Path

import numpy as np
from PIL import Image

TRAIN = np.array([31, 119, 180])  # matplotlib's first line colour, "C0": each panel's training series
VALIDATION = np.array([255, 127, 14])  # "C1": the validation series, where the job evaluates


def assert_shows_curves(path: Path, validation: bool = False) -> None:
    """The file decodes as a PNG, is not one flat colour, and has lines drawn in it (not only empty axes):
    the training series, and the validation series where asked."""
    with Image.open(path) as image:
        assert image.format == "PNG", image.format
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 10, f"{path} is (nearly) one flat colour"
    for name, colour in (("training", TRAIN), ("validation", VALIDATION))[: 2 if validation else 1]:
        drawn = int((np.abs(pixels - colour) <= 40).all(axis=1).sum())
        assert drawn > 100, f"{path} has no {name} curve drawn in it ({drawn} pixels of its colour)"
