"""The post_training external API: protocol, models, routes, and the providers that implement it.

run.yaml points ``external_apis_dir`` at a directory whose YAML names this module;
Llama Stack then imports it for the Protocol (``PostTraining``), the router
(``create_router``) and the provider registry (``available_providers``).
"""

from llama_stack_api import Api, InlineProviderSpec, ProviderSpec

from .models import *  # noqa: F403 - the models are part of the API's public surface
from .protocol import PostTraining
from .routes import create_router

API_NAME = "post_training"
PROVIDER_TYPE = "inline::trl"


def post_training_api() -> Api:
    # llama-stack 0.7 has no Api.post_training member; add() creates it once and returns it after.
    return Api.add(API_NAME)


def trl_provider_spec() -> ProviderSpec:
    return InlineProviderSpec(
        api=post_training_api(),
        provider_type=PROVIDER_TYPE,
        module="llama_stack_provider_trl",
        config_class="llama_stack_provider_trl.config.TrlPostTrainingConfig",
        pip_packages=["llama-stack-provider-trl"],
        api_dependencies=[Api.datasetio, Api.datasets],
        optional_api_dependencies=[Api.files],  # OpenAI fine-tuning's training and results files
        description="DPO and supervised fine-tuning with Hugging Face TRL, in worker processes on one or more "
        "devices.",
    )


def available_providers() -> list[ProviderSpec]:
    return [trl_provider_spec()]


__all__ = ["PostTraining", "create_router", "available_providers", "trl_provider_spec", "post_training_api"]
