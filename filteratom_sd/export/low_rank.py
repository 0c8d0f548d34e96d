"""Truncated-SVD factors of a weight difference, in kohya LoRA / LoCon shapes.

A linear dW (o, i) becomes down (r, i) and up (o, r); a k x k conv dW (o, i, k, k) becomes a
k x k conv down (r, i, k, k) and a 1x1 conv up (o, r, 1, 1). The singular values are split
evenly between the factors, so both stay in fp16's range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ConfigError


@dataclass
class LowRankFactors:
    """down / up factors (in the storage dtype) and the relative Frobenius error of up @ down against dW."""

    down: Tensor
    up: Tensor
    error: float

    @property
    def rank(self) -> int:
        """The number of rows of `down`."""
        return self.down.shape[0]


def relative_error(delta: Tensor, down: Tensor, up: Tensor, scale: float = 1.0) -> float:
    """||dW - scale * up @ down||_F / ||dW||_F, computed in float64 from the stored factors."""
    matrix = delta.reshape(delta.shape[0], -1).double()
    product = scale * up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()
    norm = torch.linalg.matrix_norm(matrix).item()
    return 0.0 if norm == 0.0 else torch.linalg.matrix_norm(matrix - product).item() / norm


def rank_for_error(singular_values: Tensor, max_error: float) -> int:
    """The smallest rank whose discarded singular values hold at most `max_error` of ||dW||_F."""
    energy = singular_values.double().square()
    # tail[r] = energy of the values from index r on, i.e. what rank r discards
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    allowed = (max_error ** 2) * energy.sum()
    return int(torch.nonzero(tail <= allowed)[0].item())


def low_rank_factors(delta: Tensor, rank: int | None = None, max_error: float | None = None,
                     dtype: torch.dtype = torch.float16) -> LowRankFactors:
    """Factors of `delta` at a fixed `rank`, or at the smallest rank meeting `max_error` once stored in `dtype`."""
    if (rank is None) == (max_error is None):
        raise ConfigError("Give either a rank or a maximum relative error for the LoRA extraction.")
    if rank is not None and rank < 1:
        raise ConfigError(f"The LoRA rank must be at least 1, got {rank}.")
    if max_error is not None and not 0.0 <= max_error < 1.0:
        raise ConfigError(f"The maximum relative error must be in [0, 1), got {max_error}.")
    out_channels, shape = delta.shape[0], delta.shape
    u, s, vh = torch.linalg.svd(delta.reshape(out_channels, -1).double(), full_matrices=False)
    full = s.shape[0]

    def factors(r: int) -> LowRankFactors:
        root = s[:r].sqrt()
        down = (root[:, None] * vh[:r]).reshape(r, *shape[1:]).to(dtype)
        up = (u[:, :r] * root[None, :]).reshape(out_channels, r, *([1] * (len(shape) - 2))).to(dtype)
        return LowRankFactors(down.contiguous(), up.contiguous(), relative_error(delta, down, up))

    if rank is not None:
        return factors(min(rank, full))
    chosen = factors(max(rank_for_error(s, max_error), 1))
    # rounding to the storage dtype adds its own error: grow the rank until the stored factors meet the bound
    while chosen.error > max_error and chosen.rank < full:
        chosen = factors(min(full, chosen.rank + max(1, math.ceil(0.1 * chosen.rank))))
    return chosen
