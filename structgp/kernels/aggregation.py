"""AggregationKernel: each observation a weighted sum of the cells of a latent gridded field.

With the latent field ``f ~ GP(0, k)`` on the grid (covariance ``K = K_1 (x) ... (x) K_d``, ``m`` cells) and
observation ``i`` the weighted sum ``y_i = sum_c A_ic f_c`` (areal data, integrals, averages over regions),

    Cov(y) = A K A^T            a ``SparseLifted`` with lift ``A`` ``(n, m)``.

The inputs of this kernel are the weight matrices themselves: ``A`` ``(n, m)`` as a sparse COO / CSR or a
dense tensor. Cross-covariances ``A_1 K A_2^T`` are formed as ``A_2 (K A_1^T)`` (a Kronecker product, then a
sparse one), so nothing ``n x n`` or ``n x m`` is formed for the training set.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor

from structgp.covariance import SparseLifted
from structgp.kernels.base import InputMemo, Kernel, placeholder, sparse_csr
from structgp.kernels.product_grid import ProductGrid


class AggregationKernel(Kernel):
    """``A (K_1 (x) ... (x) K_d) A^T`` for weight matrices ``A`` ``(n, m)`` over the latent grid.

    kernels: one 1-D gpytorch kernel per grid dimension; grid: the latent points ``(n_j,)`` of each
    dimension (``m = prod n_j``, row-major cells: the last dimension varies fastest).
    """

    def __init__(self, kernels: Sequence[gpytorch.kernels.Kernel], grid: Sequence[Tensor]) -> None:
        super().__init__()
        self.grid = ProductGrid(kernels, grid)
        self._train = InputMemo()  # the canonical sparse lift of the training weights

    def check_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        if not isinstance(x, Tensor) or x.layout not in (torch.strided, torch.sparse_coo, torch.sparse_csr):
            raise TypeError(f"{name}: expected a weight matrix (n, m): a dense, sparse COO or sparse CSR tensor")
        if x.dim() != 2 or x.shape[-1] != self.grid.size or x.shape[0] == 0:
            raise ValueError(
                f"{name}: expected a non-empty weight matrix (n, {self.grid.size}) over the latent grid "
                f"{self.grid.sizes}, got shape {tuple(x.shape)}"
            )
        values = _values(x)
        if not values.is_floating_point():
            raise TypeError(f"{name}: expected a floating dtype, got {values.dtype}")
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"{name}: expected finite weights (found NaN or Inf)")
        return x

    check_test_inputs = check_inputs

    def num_points(self, x: Tensor) -> int:
        return x.shape[0]

    def take(self, x: Tensor, start: int, stop: int) -> Tensor:
        return take_rows(x, start, stop)

    def forward(self, x: Tensor) -> SparseLifted:
        cov = self.grid.covariance()
        lifted = self._train.get(x, lambda: SparseLifted(x.to(cov.dtype), placeholder(cov.n, cov.dtype, cov.device)))
        return lifted.with_base(cov)

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        cov = self.grid.covariance()
        latent = cov @ _dense(x1, cov.dtype).mT  # K A_1^T (m, n1)
        return _sparse_matmul(x2, latent).mT  # (A_2 K A_1^T)^T

    def prior(self, x: Tensor) -> SparseLifted:
        cov = self.grid.covariance()
        return SparseLifted(x.to(cov.dtype), cov)

    def prior_diagonal(self, x: Tensor) -> Tensor:
        cov = self.grid.covariance()
        a = _dense(x, cov.dtype)
        return ((cov @ a.mT).mT * a).sum(-1)


def _values(x: Tensor) -> Tensor:
    if x.layout == torch.sparse_coo:
        return x.coalesce().values()
    if x.layout == torch.sparse_csr:
        return x.values()
    return x


def _dense(x: Tensor, dtype: torch.dtype) -> Tensor:
    return (x if x.layout == torch.strided else x.to_dense()).to(dtype)


def _sparse_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for a dense or sparse ``a`` ``(n, m)`` and dense ``b`` ``(..., m, c)``."""
    if a.layout == torch.strided:
        return a.to(b.dtype) @ b
    a = a.to(b.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if b.dim() == 2:
            return a @ b
        flat = b.movedim(-2, 0).reshape(b.shape[-2], -1)
        return (a @ flat).reshape(a.shape[0], *b.shape[:-2], b.shape[-1]).movedim(0, -2)


def take_rows(x: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a dense, sparse COO or sparse CSR matrix."""
    if x.layout == torch.strided:
        return x[start:stop]
    if x.layout == torch.sparse_coo:
        return x.index_select(0, torch.arange(start, stop, device=x.device))
    crow = x.crow_indices()
    lo, hi = int(crow[start]), int(crow[stop])
    rows = crow[start : stop + 1] - lo
    return sparse_csr(rows, x.col_indices()[lo:hi], x.values()[lo:hi], (stop - start, x.shape[1]))
