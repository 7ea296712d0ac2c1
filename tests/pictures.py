"""Checks on the curves picture a job draws (llama_stack_provider_trl/curves.py)."""

from pathlib import Path

from PIL import Image

LINE = (31, 119, 180)  # matplotlib's first line colour, "C0": the training series


def assert_shows_curves(path: Path) -> None:
    """The file decodes as a PNG, is not one flat colour, and has lines drawn in it (not only empty axes)."""
    with Image.open(path) as image:
        assert image.format == "PNG", image.format
        pixels = list(image.convert("RGB").get_flattened_data())
    assert len(set(pixels)) > 10, f"{path} is (nearly) one flat colour"
    near_line = sum(1 for p in pixels if all(abs(a - b) <= 40 for a, b in zip(p, LINE)))
    assert near_line > 100, f"{path} has no curve drawn in it ({near_line} pixels of the line colour)"
