"""The Vendi score (Friedman & Dieng 2022): the effective number of distinct items in a sample.

VS = exp(-sum_i l_i log l_i), with l_i the eigenvalues of K / n and K the n x n similarity
kernel (here cosine similarity of embeddings, so K_ii = 1). Identical items give 1, n mutually
orthogonal items give n.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserInputError


def cosine_kernel(embeddings: Tensor) -> Tensor:
    """K_ij = cos(x_i, x_j) in float64, for embeddings of shape (n, d)."""
    x = embeddings.detach().reshape(len(embeddings), -1).double()
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise UserInputError("An embedding is all zeros, so its cosine similarity is undefined.")
    x = x / norms
    return x @ x.T


def vendi_from_kernel(kernel: Tensor) -> float:
    """exp(entropy of the eigenvalues of K / n) for a similarity kernel with unit diagonal."""
    n = kernel.shape[0]
    if n == 0:
        raise UserInputError("The Vendi score needs at least one item.")
    eigenvalues = torch.linalg.eigvalsh(kernel.double() / n).clamp_min(0.0)  # rounding can make tiny ones negative
    eigenvalues = eigenvalues[eigenvalues > 0]
    return float(torch.exp(-(eigenvalues * eigenvalues.log()).sum()))


def vendi_score(embeddings: Tensor) -> float:
    """Vendi score of a set of embeddings (n, d) under the cosine-similarity kernel."""
    return vendi_from_kernel(cosine_kernel(embeddings))
