"""A job's processes: what runs outside the server. `python -m llama_stack_provider_trl.worker`."""
