"""Adapter files: whether a LoRA adapter folder can be attached to the loaded base model.

Owns the file names of peft's adapter format and the check made before an adapter touches the
model: its config parses, its weights open, and every LoRA matrix fits the layer it targets. It
knows nothing about loading, routing or generation (engine.py), nor about training (train.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def shape_problem(path: Path, base: torch.nn.Module) -> str | None:
    """Compare the adapter's LoRA matrices with the base's layers before touching the model."""
    from safetensors import safe_open

    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        return f"{ADAPTER_CONFIG} is missing in {path}"
    try:
        json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        return f"{ADAPTER_CONFIG} is not valid JSON ({exc})"
    if not weights.is_file():
        return f"{ADAPTER_WEIGHTS} is missing in {path}"
    modules = dict(base.named_modules())
    try:
        with safe_open(str(weights), framework="pt") as handle:
            for key in handle.keys():
                if ".lora_A." not in key and ".lora_B." not in key:
                    continue
                module_name = key.split(".lora_")[0].removeprefix("base_model.model.")
                layer = modules.get(module_name)
                if layer is None or not hasattr(layer, "in_features"):
                    return f"it targets '{module_name}', which the base model does not have (trained on another base?)"
                shape = handle.get_slice(key).get_shape()
                expected = layer.in_features if ".lora_A." in key else layer.out_features
                actual = shape[1] if ".lora_A." in key else shape[0]
                if actual != expected:
                    return (
                        f"its weights for '{module_name}' have size {actual} where the base has {expected} "
                        "(trained on another base model)"
                    )
    except Exception as exc:  # a truncated or foreign file: safetensors raises several types
        return f"{ADAPTER_WEIGHTS} cannot be read ({type(exc).__name__}: {exc})"
    return None
