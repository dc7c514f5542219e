"""Products with Kronecker-structured matrices without forming them."""

from __future__ import annotations

import math

from torch import Tensor


def kron_matmul(mats: list[Tensor], rhs: Tensor) -> Tensor:
    """``(A_1 (x) A_2 (x) ... ) @ rhs``.

    mats: ``A_i`` of shape ``(..., n_i, k_i)`` (batch dims broadcast);
    rhs: ``(..., k_1 k_2 ..., c)``. Returns ``(..., n_1 n_2 ..., c)``.
    One batched product per factor: the row index is viewed as ``(left, k_i, right)``.
    """
    out_sizes = [a.shape[-2] for a in mats]
    in_sizes = [a.shape[-1] for a in mats]
    y = rhs
    for i, a in enumerate(mats):
        left = math.prod(out_sizes[:i])
        right = math.prod(in_sizes[i + 1 :]) * rhs.shape[-1]
        y = a.unsqueeze(-3) @ y.reshape(*y.shape[:-2], left, in_sizes[i], right)
        y = y.reshape(*y.shape[:-3], left * out_sizes[i] * right // rhs.shape[-1], rhs.shape[-1])
    return y


def kron_vector(vectors: list[Tensor]) -> Tensor:
    """``v_1 (x) v_2 (x) ...`` for vectors ``(..., n_i)`` -> ``(..., n_1 n_2 ...)``."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)
    return out


def kron_dense(mats: list[Tensor]) -> Tensor:
    """``A_1 (x) A_2 (x) ...`` for ``(..., n_i, k_i)`` -> ``(..., prod n_i, prod k_i)`` (small sizes only)."""
    out = mats[0]
    for a in mats[1:]:
        prod = out[..., :, None, :, None] * a[..., None, :, None, :]
        out = prod.reshape(*prod.shape[:-4], prod.shape[-4] * prod.shape[-3], prod.shape[-2] * prod.shape[-1])
    return out
