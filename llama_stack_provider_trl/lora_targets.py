"""Which of a model's modules a LoraFinetuningConfig names.

Llama Stack's LoRA config speaks torchtune's names (q_proj, k_proj, v_proj,
output_proj; MLP; output). Hugging Face models name their modules per
architecture. apply_lora_to_output names the output layer, which the recipes
train in full rather than through an adapter (TRL reads lm_head.weight directly). The model's linear layers are read from its safetensors header
(no torch needed), so a request naming a module the model lacks is a 400 that
lists the ones it has, before the job is accepted.
"""

from __future__ import annotations

import json
import stat
import struct
from pathlib import Path

from .api.models import LoraFinetuningConfig

ATTN_ALIASES: dict[str, tuple[str, ...]] = {
    "q_proj": ("q_proj", "query", "q"),
    "k_proj": ("k_proj", "key", "k"),
    "v_proj": ("v_proj", "value", "v"),
    "output_proj": ("o_proj", "out_proj", "dense", "c_proj"),
    "o_proj": ("o_proj", "out_proj", "dense", "c_proj"),
    "qkv_proj": ("qkv_proj", "query_key_value", "c_attn", "Wqkv"),
}
MLP_NAMES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2", "c_fc", "w1", "w2", "w3",
             "dense_h_to_4h", "dense_4h_to_h", "gate_up_proj")
OUTPUT_NAMES = ("lm_head", "embed_out")
NOT_LINEAR = ("embed_tokens", "wte", "wpe", "embed_positions", "word_embeddings")


# The safetensors format caps its JSON header at 100 MB; a length above that (or above the file)
# is a broken or hostile file, and reading it would allocate whatever the 8 bytes say.
MAX_HEADER_BYTES = 100_000_000


class SafetensorsError(ValueError):
    """A model file whose header cannot be read: a 400 naming the file."""


def _safetensors_header(path: Path) -> dict:
    try:
        info = path.stat()  # stat, never open, anything that is not a regular file: a FIFO would block
    except OSError as exc:
        raise SafetensorsError(f"{path} cannot be examined ({exc.strerror})") from None
    if stat.S_ISDIR(info.st_mode):
        raise SafetensorsError(f"{path} is a directory, not a safetensors file")
    if not stat.S_ISREG(info.st_mode):
        raise SafetensorsError(f"{path} is not a regular file (a FIFO, socket or device)")
    if info.st_size < 8:
        raise SafetensorsError(f"{path} is {info.st_size} bytes, too short for a safetensors header")
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            raw = f.read(length) if length <= min(MAX_HEADER_BYTES, info.st_size - 8) else None
    except OSError as exc:
        raise SafetensorsError(f"{path} cannot be read ({exc.strerror})") from None
    if raw is None:
        raise SafetensorsError(f"{path} declares a {length}-byte header in a {info.st_size}-byte file; "
                               "it is not a valid safetensors file")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SafetensorsError(f"{path} has no valid JSON header; it is not a valid safetensors file") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has no valid JSON header; it is not a valid safetensors file")
    return header


def linear_modules(model_dir: Path) -> set[str]:
    """Leaf names of the 2-D weights (linear layers) in a local safetensors model."""
    files = sorted(model_dir.glob("*.safetensors"))
    names: set[str] = set()
    for file in files:
        for key, info in _safetensors_header(file).items():
            if key == "__metadata__" or not key.endswith(".weight") or not isinstance(info, dict):
                continue
            shape = info.get("shape")
            if not isinstance(shape, list) or len(shape) != 2:
                continue
            leaf = key[: -len(".weight")].rsplit(".", 1)[-1]
            if leaf not in NOT_LINEAR:
                names.add(leaf)
    return names


def lora_target_modules(lora: LoraFinetuningConfig, available: set[str]) -> list[str]:
    """Map the config onto module names the model has; ValueError (a 400) otherwise."""
    targets: list[str] = []
    attn_names = sorted(n for n in available if n not in MLP_NAMES and n not in OUTPUT_NAMES)
    for name in lora.lora_attn_modules:
        candidates = ATTN_ALIASES.get(name, (name,))
        found = [c for c in candidates if c in available]
        if not found:
            raise ValueError(
                f"algorithm_config.lora_attn_modules: the model has no module '{name}'; its attention/linear "
                f"modules are: {', '.join(attn_names) or 'none'}"
            )
        targets.append(found[0])
    if lora.apply_lora_to_mlp:
        mlp = [n for n in MLP_NAMES if n in available]
        if not mlp:
            raise ValueError("algorithm_config.apply_lora_to_mlp: the model has no MLP projection modules that LoRA knows")
        targets.extend(mlp)
    if lora.apply_lora_to_output:
        out = [n for n in OUTPUT_NAMES if n in available]
        if not out:
            raise ValueError("algorithm_config.apply_lora_to_output: the model has no separate output projection")
        targets.extend(out)
    if not any(t not in OUTPUT_NAMES for t in targets):
        # apply_lora_to_output trains the output layer in full (recipes/lora.py), so it adds no adapter
        raise ValueError("algorithm_config: LoRA needs at least one of lora_attn_modules or apply_lora_to_mlp")
    return sorted(set(targets))
