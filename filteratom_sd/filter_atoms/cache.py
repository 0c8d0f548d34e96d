"""The decomposition cache: fixed atoms (and stored alpha) computed once per base model and config.

The key is the base weights' fingerprint plus the decomposition settings and targets, so a
cache entry can never be applied to other weights. Entries are read automatically when
present and written by `decompose_unet` (the `fa-sd decompose` command).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_path
from ..core.fingerprint import fingerprint
from ..core.layer import base_layer_of, unmerged_weight
from .config import FilterAtomConfig
from .decomposition import (LayerDecomposition, all_finite, atoms_are_usable, decompose_layers, derives_alpha,
                            needs_alpha)
from .targets import check_block_size, select_targets

logger = logging.getLogger(__name__)

CACHE_ENV = "FILTERATOM_SD_CACHE_DIR"
# Part of the key: 2 stores the blocks' alpha in (a, m, b) order, so entries of the first layout are not read as it.
_FORMAT = 2


def default_cache_dir() -> Path:
    """$FILTERATOM_SD_CACHE_DIR, else ~/.cache/filteratom-sd/decompositions."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "filteratom-sd" / "decompositions"


def cache_key(unet: nn.Module, config: FilterAtomConfig, targets: list[str]) -> str:
    """Hex key from the base fingerprint, the decomposition settings and the target list."""
    payload = json.dumps(
        {"base": fingerprint(unet, targets)["digest"], "config": config.decomposition_key(), "targets": sorted(targets),
         "format": _FORMAT},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _layout(weight_shape: tuple[int, ...]) -> str:
    return "conv" if len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1) else "blocks"


def _read_entry(path: Path, unet: nn.Module, config: FilterAtomConfig,
                targets: list[str]) -> dict[str, LayerDecomposition] | None:
    """The entry's decompositions of `targets`, or None when an atom set is unusable."""
    out = {}
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        for t in targets:
            shape = tuple(base_layer_of(unet.get_submodule(t)).weight.shape)
            layout = _layout(shape)
            wanted = needs_alpha(layout, shape, config)
            alpha = handle.get_tensor(f"{t}.alpha") if wanted and f"{t}.alpha" in keys else None
            if alpha is not None and layout == "blocks":
                alpha = alpha.permute(0, 2, 1)  # stored in the (a, m, b) order `AtomDelta` keeps: no copy
            atoms0 = handle.get_tensor(f"{t}.atoms0")
            if not atoms_are_usable(atoms0) or (alpha is not None and not all_finite(alpha)):
                return None
            out[t] = LayerDecomposition(alpha, atoms0, float("nan"), 0.0, layout, shape)
    return out


def cached_decompositions(unet: nn.Module, config: FilterAtomConfig, targets: list[str],
                          cache_dir: Path | None = None) -> dict[str, LayerDecomposition] | None:
    """{target: LayerDecomposition} from the cache, or None when there is no entry (or an unreadable one, deleted).

    Only the tensors the config needs are read: the atoms, and alpha where it is stored and
    not derived from the weight (`derives_alpha`); the rest stays on disk.
    """
    path = (cache_dir or default_cache_dir()) / f"{cache_key(unet, config, targets)}.safetensors"
    if not path.is_file():
        return None
    try:
        out = _read_entry(path, unet, config, targets)
    except Exception:  # safetensors raises several types for truncated or overwritten files
        out = None
    if out is None:
        logger.warning("the decomposition cache entry %s is unreadable (truncated or corrupt): deleting it and "
                       "decomposing again", path)
        path.unlink(missing_ok=True)
        return None
    logger.info("using cached decomposition %s", path)
    return out


def decompose_unet(unet: nn.Module, config: FilterAtomConfig,
                   cache_dir: Path | None = None) -> tuple[dict[str, LayerDecomposition], Path]:
    """Decompose every target of `config` in `unet` and write the cache entry; returns ({target: report}, path).

    The entry holds every layer's atoms and alpha where it is not derived from the weight
    (`derives_alpha`: for 3x3 convs alpha is as large as W and is rebuilt from W instead).
    Layers with the same row size share one batched eigendecomposition.
    """
    targets, _ = select_targets(unet, config)
    check_block_size(unet, targets, config.kc)
    directory = cache_dir or default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{cache_key(unet, config, list(targets))}.safetensors"
    weights = {name: (unmerged_weight(unet.get_submodule(name)), layout) for name, layout in targets.items()}
    found = decompose_layers(
        weights, config, with_alpha=lambda n: not derives_alpha(weights[n][1], tuple(weights[n][0].shape), config)
    )
    tensors = {}
    for name, layer in found.items():
        if layer.alpha is not None:
            alpha = layer.alpha.float().cpu()
            tensors[f"{name}.alpha"] = (alpha.permute(0, 2, 1) if layer.layout == "blocks" else alpha).contiguous()
        tensors[f"{name}.atoms0"] = layer.atoms0.cpu().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"config": json.dumps(config.decomposition_key())})
    return found, path
