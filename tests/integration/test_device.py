"""What needs a GPU is refused before any work where there is none, and how the API gets registered.

The device checks only hold on a machine that cannot train on CUDA; on one that can, they are skipped."""

import httpx
import pytest
from stack_server import REPO, StackServer, dpo_request

from llama_stack_provider_trl.hardware import cuda

pytestmark = pytest.mark.integration

no_cuda = pytest.mark.skipif(cuda().available, reason="this machine can train on CUDA")


@no_cuda
def test_device_cuda_without_cuda_stops_the_server_at_start_up_naming_the_setting(workspace):
    server = StackServer(workspace / "no-cuda", provider={"device": "cuda"})
    with pytest.raises(RuntimeError, match="device: 'cuda', but this machine cannot train on CUDA"):
        server.start()
    server.stop()


@no_cuda
@pytest.mark.parametrize("method", ["preference-optimize", "supervised-fine-tune"])
def test_activation_offloading_on_a_cpu_provider_is_a_400_naming_the_field(server, tiny_model, seed_file, method):
    # device auto resolves to the CPU here, like the shared server's explicit cpu
    request = dpo_request(f"offload-{method}", str(tiny_model), str(seed_file))
    request["training_config"]["efficiency_config"] = {"enable_activation_offloading": True}
    if method == "supervised-fine-tune":
        request["model"] = request.pop("finetuned_model")
        request.pop("algorithm_config")
        sft_rows = seed_file.parent / "offload-sft.jsonl"
        sft_rows.write_text((REPO / "test_sft_data.jsonl").read_text())
        request["training_config"]["dataset"] = str(sft_rows)
    r = httpx.post(f"{server.url}/v1/post-training/{method}", json=request, timeout=30)
    assert r.status_code == 400, r.text
    assert "training_config.efficiency_config.enable_activation_offloading" in r.text
    assert httpx.get(f"{server.url}/v1/post-training/job/status", params={"job_uuid": request["job_uuid"]}).status_code == 404
    assert not (server.output_dir / request["job_uuid"]).exists()


def test_external_providers_dir_alone_does_not_define_the_api(workspace):
    """The README says providers.d works only beside external_apis_dir (test_dpo_options covers the pair)."""
    server = StackServer(workspace / "providers-d-alone", run_overrides={
        "external_providers_dir": str(REPO / "providers.d"), "external_apis_dir": None})
    with pytest.raises(RuntimeError, match="API 'post_training' does not exist"):
        server.start()
    server.stop()
