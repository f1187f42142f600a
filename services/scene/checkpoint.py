"""Scene checkpoints: tensors in safetensors, everything else as JSON in its header. Never pickles.

A checkpoint is one safetensors file whose metadata holds the format name and version, the stage, the stage
config (JSON) and the state's non-tensor structure (nested dicts/lists with int keys preserved, numbers, strings),
in which each tensor appears as a reference to its safetensors entry.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shared.errors import FailedPrecondition, InvalidArgument

FORMAT = "magic3d.scene.checkpoint"
VERSION = 1


@dataclass
class Checkpoint:
    stage: str
    config_json: str
    state: dict[str, Any]


def _encode(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().cpu().contiguous()
        return {"__tensor__": path}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, tensors, f"{path}/{k}") for k, v in value.items()}}
        return {"__items__": [[k, _encode(v, tensors, f"{path}/{k}")] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_encode(v, tensors, f"{path}/{i}") for i, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot checkpoint {type(value).__name__} at {path}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _decode(v, tensors) for k, v in value["__dict__"].items()}
        if "__items__" in value:
            return {k: _decode(v, tensors) for k, v in value["__items__"]}
        if "__list__" in value:
            return [_decode(v, tensors) for v in value["__list__"]]
    return value


def dumps(checkpoint: Checkpoint) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(checkpoint.state, tensors, "state")
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "stage": checkpoint.stage,
        "config": checkpoint.config_json,
        "structure": json.dumps(structure),
    }
    return save_safetensors(tensors, metadata=metadata)


def loads(data: bytes, source: str = "checkpoint") -> Checkpoint:
    """Parses and checks a checkpoint; errors name `source` (its URI) and say what is wrong."""
    try:
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__", {})
        tensors = load_safetensors(data)
    except Exception as error:  # noqa: BLE001 - any parse failure means the file is not a checkpoint
        raise InvalidArgument(f"{source} is not a readable checkpoint ({type(error).__name__})", "checkpoint") from None
    if metadata.get("format") != FORMAT:
        raise InvalidArgument(f"{source} is not a Magic3D scene checkpoint", "checkpoint")
    if metadata.get("version") != str(VERSION):
        raise FailedPrecondition(
            f"{source} has checkpoint format version {metadata.get('version')}; this service reads version {VERSION}",
            "checkpoint",
        )
    state = _decode(json.loads(metadata["structure"]), tensors)
    return Checkpoint(stage=metadata["stage"], config_json=metadata["config"], state=state)
