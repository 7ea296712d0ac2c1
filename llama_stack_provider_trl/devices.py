"""Which accelerators this machine has, found without importing torch (the server never does).

The NVIDIA driver lists each GPU under /proc/driver/nvidia/gpus; CUDA_VISIBLE_DEVICES, when set,
narrows what a process may use, and the jobs' worker processes inherit that.
"""

from __future__ import annotations

import os
from pathlib import Path

NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def cuda_devices() -> list[str]:
    """The CUDA device ids jobs may be given ("0", "1", ...); empty without a GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    if not NVIDIA_GPUS.is_dir():
        return []
    return [str(i) for i in range(len(list(NVIDIA_GPUS.iterdir())))]


def training_device(configured: str) -> str:
    """'cuda' or 'cpu' for the provider's device setting; 'cuda' without a GPU is refused."""
    if configured == "cpu":
        return "cpu"
    has_cuda = bool(cuda_devices())
    if configured == "cuda" and not has_cuda:
        raise ValueError("device: 'cuda' is configured but this machine shows no CUDA device "
                         f"({NVIDIA_GPUS} is absent and CUDA_VISIBLE_DEVICES names none); use cpu or auto")
    return "cuda" if has_cuda else "cpu"
