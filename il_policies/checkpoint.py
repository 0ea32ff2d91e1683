"""The checkpoint file: one self-contained file per checkpoint, written atomically.

A checkpoint holds everything `load_policy` needs (policy name, config, observation/action schema,
task metadata, inference weights including the normalizer) and, for resuming, the training state.
It is read with `torch.load(weights_only=True)`, so it contains only tensors and plain Python
values: loading one never runs code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from il_policies.atomic import replaced_atomically

FORMAT = "il_policies.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not one of ours."""


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically: a temporary file in the same directory, fsync, rename.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    with replaced_atomically(path) as tmp:
        torch.save({"format": FORMAT, **payload}, tmp)
    return path


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} could not be read ({type(error).__name__}: {error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an il_policies checkpoint (expected format {FORMAT!r})")
    return payload
