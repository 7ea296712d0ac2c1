"""Entry point for run.yaml provider entries that say ``module: llama_stack_provider_trl``."""

from .api import trl_provider_spec as get_provider_spec

__all__ = ["get_provider_spec"]
