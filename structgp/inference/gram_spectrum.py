"""The spectrum of ``W W^T`` from the small Gram matrix ``W^T W``: the one place it is computed.

For a low-rank factor ``W`` ``(..., n, k)``, ``W^T W = V diag(mu) V^T`` (``n k^2`` flops for the product,
``O(k^3)`` for ``eigh``) gives everything about the ``n x n`` matrix ``W W^T``:

    nonzero eigenvalues:  mu
    eigenvectors:         U = W V diag(mu)^{-1/2}
    W V diag(h) V^T W^T x, applied right to left (2 n k + 2 k^2 flops a column, ``W V`` never formed),

so that ``f(W W^T + s I) = f(s) I + W V diag(h(mu)) V^T W^T`` with ``h(mu) = (f(mu + s) - f(s)) / mu``.

``eigh`` runs in float64; ``mu`` is clamped at 0 (``W^T W`` is positive semidefinite by construction, so a
negative eigenvalue is rounding). Nothing is detached: ``eigsh`` and the matrix functions differentiate
through the decomposition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class GramSpectrum:
    """``W^T W = V diag(mu) V^T`` for the factor ``W``, eigenvalues ascending."""

    factor: Tensor  # W (..., n, k)
    values: Tensor  # mu (..., k), >= 0, float64
    vectors: Tensor  # V (..., k, k)
    # sums over ranks of products W^T X where W holds this rank's rows only (structgp.distributed.Rows.sum)
    reduce: Callable[[Tensor], Tensor] | None = None

    def to(self, dtype: torch.dtype) -> GramSpectrum:
        """Factor, values and vectors in ``dtype`` (e.g. the data's, for products with it)."""
        return GramSpectrum(self.factor.to(dtype), self.values.to(dtype), self.vectors.to(dtype), self.reduce)

    def spectral_matmul(self, weights: Tensor, x: Tensor) -> Tensor:
        """``W V diag(weights) V^T W^T x`` for ``weights`` ``(..., k)`` and ``x`` ``(..., n, c)``."""
        w, v = self.factor, self.vectors
        wx = w.mT @ x if self.reduce is None else self.reduce(w.mT @ x)
        return w @ (v @ (weights.unsqueeze(-1) * (v.mT @ wx)))

    def eigenvectors(self, vectors: Tensor, values: Tensor) -> Tensor:
        """``U = W V_S diag(mu_S)^{-1/2}`` ``(..., n, r)`` for chosen columns ``V_S`` ``(..., k, r)`` of ``V``
        and their eigenvalues ``mu_S`` ``(..., r)``: orthonormal eigenvectors of ``W W^T`` (for ``mu > 0``)."""
        tiny = torch.finfo(values.dtype).tiny
        return (self.factor @ vectors) * values.clamp_min(tiny).rsqrt().unsqueeze(-2)


def gram_spectrum(
    w: Tensor, *, product_in_float64: bool = True, reduce: Callable[[Tensor], Tensor] | None = None
) -> GramSpectrum:
    """The Gram eigendecomposition of ``w`` ``(..., n, k)``.

    ``product_in_float64``: form ``W^T W`` from ``W`` in float64 (then the returned factor is float64); else
    form it in ``w``'s precision and only decompose it in float64, for callers whose set-up cost is this
    ``n k^2`` product (the returned factor is ``w`` itself). ``reduce``: where ``w`` is this rank's rows of
    a factor partitioned across processes, the sum over ranks of ``W^T X`` products (``W^T W`` here and in
    :meth:`GramSpectrum.spectral_matmul`).
    """
    factor = w.double() if product_in_float64 else w
    gram = factor.mT @ factor
    mu, v = torch.linalg.eigh((gram if reduce is None else reduce(gram)).double())
    return GramSpectrum(factor, mu.clamp_min(0), v, reduce)
