"""The CUDA answer the server gives without torch, and what `device` makes of it."""

import pytest

from llama_stack_provider_trl import hardware


def test_hidden_gpus_mean_no_cuda(monkeypatch):
    hardware.cuda.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    try:
        assert not hardware.cuda().available
        assert hardware.training_device("auto") == "cpu"
        with pytest.raises(ValueError, match="device: 'cuda'.*CUDA_VISIBLE_DEVICES"):
            hardware.training_device("cuda")
    finally:
        hardware.cuda.cache_clear()


def test_cpu_never_probes(monkeypatch):
    monkeypatch.setattr(hardware, "cuda", lambda: pytest.fail("probed for device: cpu"))
    assert hardware.training_device("cpu") == "cpu"


def test_the_server_process_does_not_import_torch_to_answer():
    import subprocess
    import sys

    code = ("import sys; from llama_stack_provider_trl import hardware; hardware.training_device('auto'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_torch_build_is_read_without_importing_it():
    import torch

    assert hardware._torch_cuda_version() == torch.version.cuda
