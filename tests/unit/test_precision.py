"""Which precision a CPU job trains in: the rules, with the CPU's AMX support stubbed either way."""

import json

import pytest

from llama_stack_provider_trl.config import TrlPostTrainingConfig
from llama_stack_provider_trl.recipes import common
from llama_stack_provider_trl.recipes.context import JobContext


def ctx_for(tmp_path, hidden, dtype):
    model = tmp_path / f"m{hidden}"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps({"hidden_size": hidden}))
    plan = type("Plan", (), {"dtype": dtype})()
    return JobContext(job_uuid="j", job_dir=tmp_path, request={"finetuned_model": str(model)},
                      config=TrlPostTrainingConfig(device="cpu"), plan=plan, report=lambda **k: None)


@pytest.mark.parametrize("amx,hidden,dtype,expected,warned", [
    (True, 512, None, "bf16", False),   # large model, fast bf16: the faster default
    (True, 64, None, "fp32", False),    # tiny models are slower in bf16
    (False, 512, None, "fp32", False),
    (True, 64, "bf16", "bf16", False),  # asked for, and the CPU does it fast
    (False, 512, "bf16", "fp32", True),
    (True, 512, "fp16", "fp32", True),
    (True, 512, "fp32", "fp32", False),
])
def test_cpu_precision(tmp_path, monkeypatch, amx, hidden, dtype, expected, warned):
    monkeypatch.setattr(common, "cpu_has_fast_bf16", lambda: amx)
    device, precision, warnings = common.resolve_device(ctx_for(tmp_path, hidden, dtype))
    assert (device, precision, bool(warnings)) == ("cpu", expected, warned)
