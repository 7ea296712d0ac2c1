"""Is there a CUDA device torch could train on? Answered without importing torch.

The server must not import torch (it costs seconds and a gigabyte, and jobs may run in
another process), yet `device: auto|cuda` and request checks such as activation
offloading need the answer before any job starts. The NVIDIA driver's own library
answers it: libcuda's cuInit + cuDeviceGetCount honour CUDA_VISIBLE_DEVICES exactly as
torch does. The probe runs in a short-lived subprocess so that the server itself never
initialises CUDA (a process that has, and later forks without exec, cannot use CUDA in
the child). A torch wheel built without CUDA, or for a newer CUDA major version than the
driver supports, cannot use the GPU either: torch's version.py says which it is built for,
read as text.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

_PROBE = r"""
import ctypes, sys
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError:
    print("no-driver"); sys.exit()
rc = cuda.cuInit(0)
if rc != 0:
    print(f"init-error {rc}"); sys.exit()
count, version = ctypes.c_int(0), ctypes.c_int(0)
cuda.cuDeviceGetCount(ctypes.byref(count))
cuda.cuDriverGetVersion(ctypes.byref(version))
print(f"ok {count.value} {version.value}")
"""


@dataclass(frozen=True)
class Cuda:
    available: bool
    reason: str  # why not, or what was found
    count: int = 0


def _torch_cuda_version() -> str | None:
    """The CUDA version torch was built for ('12.8'), None for a CPU-only build, '' when torch is absent."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return ""
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return ""
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*['\"]([\d.]+)['\"]", text, re.M)
    return match.group(1) if match else None


@functools.cache
def cuda() -> Cuda:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return Cuda(False, f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU")
    # Linux's NVIDIA kernel driver lists its GPUs here: no entries, no point starting a probe
    gpus = Path("/proc/driver/nvidia/gpus")
    if sys.platform.startswith("linux") and not (gpus.is_dir() and any(gpus.iterdir())):
        return Cuda(False, "no NVIDIA GPU driver found (/proc/driver/nvidia/gpus)")
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        return Cuda(False, f"the CUDA probe failed: {exc}")
    if not out or out[0] != "ok":
        return Cuda(False, "the NVIDIA driver library libcuda.so.1 " +
                    ("is not installed" if out[:1] == ["no-driver"] else f"did not initialise ({' '.join(out)})"))
    count, driver = int(out[1]), int(out[2])
    if count == 0:
        return Cuda(False, "the NVIDIA driver sees no GPU")
    built_for = _torch_cuda_version()
    if built_for is None:
        return Cuda(False, "the installed torch is a CPU-only build")
    driver_text = f"{driver // 1000}.{driver % 1000 // 10}"
    if built_for and int(built_for.split(".")[0]) > driver // 1000:
        return Cuda(False, f"torch is built for CUDA {built_for}, newer than the driver's CUDA {driver_text}; "
                           f"update the NVIDIA driver or install a torch built for CUDA {driver // 1000}")
    return Cuda(True, f"{count} GPU(s), driver CUDA {driver_text}", count)


def cuda_devices() -> list[str]:
    """The CUDA device ids jobs may be given ("0", "1", ...), in the numbering of this process's
    CUDA_VISIBLE_DEVICES; empty when the provider cannot train on CUDA."""
    if not cuda().available:
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    return [str(i) for i in range(cuda().count)]


def training_device(configured: str) -> str:
    """The device jobs train on for the provider's `device` setting. Raises ValueError for 'cuda' without CUDA."""
    if configured == "cpu":
        return "cpu"
    found = cuda()
    if configured == "cuda" and not found.available:
        raise ValueError(f"device: 'cuda', but this machine cannot train on CUDA: {found.reason}. "
                         "Use device: cpu or auto (TRL_DEVICE in run.yaml)")
    return "cuda" if found.available else "cpu"
