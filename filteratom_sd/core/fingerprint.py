"""Fingerprints of base weights: tell whether an adapter was made for these weights.

Each adapted layer gets a signature: its norm and two fixed pseudo-random projections,
computed in one float32 pass over the weight. Signatures survive a cast to fp16/bf16 (the comparison is relative to the
layer's norm) but change when the weights themselves differ.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch
from torch import Tensor, nn

from .layer import unmerged_weight

# Agreement required between signatures, relative to the layer's norm: bf16 rounding moves a
# projection by up to ~2.3e-3 of the norm (one standard deviation), other weights by their whole
# difference, so bases within ~2% of each other count as the same.
TOLERANCE = 2e-2
_MULTIPLIERS = (2654435761, 2246822519)
_ROW_MULTIPLIERS = (2246822507, 3266489917)
# A signature: the norm, then one projection per multiplier.
SIGNATURE_LENGTH = 1 + len(_MULTIPLIERS)
# Weights are read as rows of this many values: one matrix-vector pass over memory per layer.
_ROW = 1024


def _sign_pattern(n: int, multiplier: int, device: torch.device) -> Tensor:
    # A hash of the index, identical on every device and independent of any RNG state.
    index = torch.arange(n, device=device, dtype=torch.int64)
    bits = ((index * multiplier) % 4294967296) >> 31
    return bits.float() * 2 - 1


def weight_signature(weight: Tensor) -> list[float]:
    """[norm, projection 1, projection 2] of a weight tensor.

    Each projection is a fixed pseudo-random sign pattern b_k^T F a_k over the weight read as
    rows F of `_ROW` values (the tail as one more short row), so the weight is read once, in float32.
    """
    flat = weight.detach().reshape(-1)
    flat = flat if flat.dtype == torch.float32 else flat.float()
    rows, tail = divmod(flat.numel(), _ROW)
    # (k, _ROW), multiplied as its transpose: the CPU's GEMM reads a (rows, _ROW) x (_ROW, k) product 5x slower
    columns = torch.stack([_sign_pattern(_ROW, m, flat.device) for m in _MULTIPLIERS])
    row_signs = torch.stack([_sign_pattern(rows + 1, m, flat.device) for m in _ROW_MULTIPLIERS], dim=1)
    head, rest = flat[: rows * _ROW].view(rows, _ROW), flat[rows * _ROW:]
    per_row = torch.cat([head @ columns.T, (rest @ columns[:, :tail].T)[None]])
    projections = (per_row.double() * row_signs.double()).sum(dim=0)
    return [float(torch.linalg.vector_norm(flat))] + [float(v) for v in projections]


# Signatures by weight object, while it lives and its storage and version stay: a load checks the base and keys the
# decomposition cache with the same signatures, and each costs a pass over every adapted weight.
_SIGNATURES: dict[int, tuple[weakref.ref, tuple, list[float]]] = {}


def _signature(weight: Tensor) -> list[float]:
    try:
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device, tuple(weight.shape))
    except RuntimeError:  # inference-mode tensors carry no version counter: not cached
        return weight_signature(weight)
    found = _SIGNATURES.get(id(weight))
    if found is not None and found[0]() is weight and found[1] == key:
        return found[2]
    signature = weight_signature(weight)
    _SIGNATURES[id(weight)] = (weakref.ref(weight, lambda _, i=id(weight): _SIGNATURES.pop(i, None)), key, signature)
    return signature


def forget_signatures() -> None:
    """Drop every remembered signature (the next fingerprint reads the weights again, as a fresh process would)."""
    _SIGNATURES.clear()


def fingerprint(unet: nn.Module, targets: list[str]) -> dict:
    """{"digest": short hex, "layers": {target: signature}} over the given target modules."""
    layers = {t: _signature(unmerged_weight(unet.get_submodule(t))) for t in targets}
    rounded = json.dumps({t: [f"{v:.3g}" for v in s] for t, s in sorted(layers.items())})
    return {"digest": hashlib.sha256(rounded.encode()).hexdigest()[:16], "layers": layers}


def mismatched_layers(expected: dict, actual: dict) -> list[str]:
    """Targets whose signatures differ beyond TOLERANCE (relative to the layer norm)."""
    bad = []
    for target, sig in expected["layers"].items():
        other = actual["layers"].get(target)
        if other is None or len(other) != len(sig):
            bad.append(target)
            continue
        scale = max(abs(sig[0]), abs(other[0]), 1e-12)
        if any(abs(a - b) > TOLERANCE * scale for a, b in zip(sig, other)):
            bad.append(target)
    return bad
