"""The decomposition cache: alpha and fixed atoms computed once per base model and config.

The key is the base weights' fingerprint plus the decomposition settings and targets, so a
cache entry can never be applied to other weights. Entries are read automatically when
present and written by `decompose_unet` (the `fa-sd decompose` command).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_path
from .config import FilterAtomConfig
from .fingerprint import fingerprint

logger = logging.getLogger(__name__)

CACHE_ENV = "FILTERATOM_SD_CACHE_DIR"


@dataclass
class LayerReport:
    """How one layer decomposed: its layout and shape, relative error and seconds taken."""

    name: str
    layout: str
    shape: tuple[int, ...]
    relative_error: float
    seconds: float


def default_cache_dir() -> Path:
    """$FILTERATOM_SD_CACHE_DIR, else ~/.cache/filteratom-sd/decompositions."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "filteratom-sd" / "decompositions"


def cache_key(unet: nn.Module, config: FilterAtomConfig, targets: list[str]) -> str:
    """Hex key from the base fingerprint, the decomposition settings and the target list."""
    payload = json.dumps(
        {"base": fingerprint(unet, targets)["digest"], "config": config.decomposition_key(), "targets": sorted(targets)},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def cached_decompositions(unet: nn.Module, config: FilterAtomConfig, targets: list[str], cache_dir: Path | None = None):
    """{target: LayerDecomposition} from the cache, or None when there is no entry."""
    from .methods.filter_atoms import LayerDecomposition

    path = (cache_dir or default_cache_dir()) / f"{cache_key(unet, config, targets)}.safetensors"
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    logger.info("using cached decomposition %s", path)
    return {t: LayerDecomposition(tensors[f"{t}.alpha"], tensors[f"{t}.atoms0"], float("nan"), 0.0) for t in targets}


def decompose_unet(unet: nn.Module, config: FilterAtomConfig, cache_dir: Path | None = None) -> tuple[list[LayerReport], Path]:
    """Decompose every target of `config` in `unet` and write the cache entry; returns (reports, path)."""
    from .inject import check_block_size, select_targets
    from .methods.filter_atoms import decompose_layer

    targets, _ = select_targets(unet, config)
    check_block_size(unet, targets, config.kc)
    directory = cache_dir or default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cache_key(unet, config, list(targets))}.safetensors"
    reports, tensors = [], {}
    for name, layout in targets.items():
        weight = unet.get_submodule(name).weight
        found = decompose_layer(weight, layout, config)
        tensors[f"{name}.alpha"] = found.alpha.float().cpu().contiguous()
        tensors[f"{name}.atoms0"] = found.atoms0.cpu().contiguous()
        reports.append(LayerReport(name, layout, tuple(weight.shape), found.relative_error, found.seconds))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(config.decomposition_key())})
    return reports, path
