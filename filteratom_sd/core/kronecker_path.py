"""The block-form update applied through the activations: x dW^T for dW = sum_m A_m (x) B_m, never dW itself.

A linear or 1x1 layer whose update is a sum of Kronecker products (filter atoms' blocks layout:
block (i, j) of dW is sum_m A[i, j, m] B_m) can add x dW^T to the base output without building
dW: first the coefficients mix the input blocks (one matmul with A as an (a m) x b matrix), then
each small factor B_m maps the mixed blocks. When few positions pass through a large layer (the
CPU at 64 px) this costs a few percent of one pass over W, where building W + dW, its gradient and
the gradient of dW cost several passes; plain autograd keeps only the mixed blocks for the backward.
"""

from __future__ import annotations

from torch import Tensor


def coefficient_rows(coefficients: Tensor) -> Tensor:
    """A (a, b, m) as the (a m) x b matrix that mixes the input blocks (a copy, contiguous)."""
    a, b, m = coefficients.shape
    return coefficients.permute(0, 2, 1).reshape(a * m, b)


def kronecker_update(x: Tensor, rows: Tensor, factors: Tensor) -> Tensor:
    """x dW^T for x (n, b q), dW[(i, p), (j, q)] = sum_m A[i, j, m] B[m, p, q]; returns (n, a p).

    `rows` is `coefficient_rows(A)`; `factors` is B (m, p, q).
    """
    n = x.shape[0]
    m, p, q = factors.shape
    am, b = rows.shape
    a = am // m
    mixed_in = x.reshape(n, b, q).transpose(0, 1).reshape(b, n * q)
    mixed = (rows @ mixed_in).reshape(a, m, n, q).permute(2, 0, 1, 3).reshape(n * a, m * q)
    return (mixed @ factors.permute(0, 2, 1).reshape(m * q, p)).reshape(n, a * p)


def as_rows(x: Tensor, conv: bool) -> Tensor:
    """The layer input as one row per position: (..., c) for a linear, (N, c, H, W) -> (N H W, c) for a 1x1 conv."""
    if conv:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def from_rows(rows: Tensor, like: Tensor, conv: bool) -> Tensor:
    """Inverse of `as_rows` for an output of `like`'s shape."""
    if conv:
        n, c, h, w = like.shape
        return rows.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return rows.reshape(like.shape)
