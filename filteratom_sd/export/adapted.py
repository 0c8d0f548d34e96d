"""The adapted model an export starts from: the base pipeline with the adapter fused in, and each changed tensor's difference."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.adapter_file import AdapterFile, read_adapter
from ..models import load_pipeline
from ..core.api import load_adapter, merge_and_unload


@dataclass
class AdaptedModel:
    """A pipeline whose UNet holds the fused weights (plain diffusers layers), and what the adapter changed."""

    pipe: Any
    adapter: AdapterFile
    # UNet state-dict key -> fused minus base weight (fp32), for every tensor the adapter changes
    deltas: dict[str, Tensor]


def adapted_model(adapter_path: str | os.PathLike, model: str | None = None, scale: float = 1.0) -> AdaptedModel:
    """Load the base `model` (None: the bundled one), fuse the adapter into it at `scale`, and diff the weights."""
    adapter = read_adapter(adapter_path)
    pipe = load_pipeline(model)
    targets = set(adapter.targets)
    base = {k: v.detach().clone() for k, v in pipe.unet.state_dict().items() if k.rpartition(".")[0] in targets}
    load_adapter(pipe, adapter_path, scale=scale)
    merge_and_unload(pipe)
    fused = pipe.unet.state_dict()
    deltas = {k: fused[k].float() - v.float() for k, v in base.items() if not torch.equal(fused[k], v)}
    return AdaptedModel(pipe, adapter, deltas)
