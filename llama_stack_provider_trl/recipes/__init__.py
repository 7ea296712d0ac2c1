"""Training recipes, one file per method. Each exposes ``train(ctx) -> list[Checkpoint]``.

They import torch, transformers and TRL at module level; the scheduler imports a
recipe only when the first job of its kind starts, so the server starts without them.
"""
