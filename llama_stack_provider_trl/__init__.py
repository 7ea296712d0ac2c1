"""llama-stack-provider-trl: Llama Stack's post_training API, served by Hugging Face TRL."""

from typing import Any

from .config import TrlPostTrainingConfig


async def get_provider_impl(config: TrlPostTrainingConfig, deps: dict[Any, Any], policy: list[Any] | None = None):
    """`policy` is run.yaml's server.auth.access_policy: Llama Stack passes it to providers that ask for it."""
    from llama_stack_api import Api

    from .hardware import training_device
    from .post_training import TrlPostTrainingImpl

    # device: cuda on a machine that cannot train on CUDA is a configuration error: refuse to start,
    # rather than accept jobs that would all fail
    training_device(config.device)

    impl = TrlPostTrainingImpl(config, datasetio=deps.get(Api.datasetio), datasets=deps.get(Api.datasets),
                               files=deps.get(Api.files), policy=policy)
    await impl.initialize()
    return impl
