"""InterpolationKernel (KISS-GP / SKI): a grid product kernel interpolated to arbitrary inputs.

    K(x, x) ~= W (K_1 (x) ... (x) K_d) W^T

with ``W`` ``(n, m)`` the sparse cubic (Keys, ``4^d`` nonzeros a row) or linear (``2^d``) interpolation
weights of the inputs on the latent regular grid (``m = prod n_j``): a ``SparseLifted``. Because the
weights are tensor products and the latent covariance is a Kronecker product, cross-covariances factor
over dimensions,

    W_a K W_b^T = prod_j (W_{a,j} K_j W_{b,j}^T)       (elementwise over j; W_{.,j} ``(n, n_j)``),

so prediction never forms anything ``n x m``: ``d`` products of ``n1 x n_j`` by ``n_j x n2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import gpytorch
from torch import Tensor

from structgp.covariance import SparseLifted
from structgp.kernels.base import InputMemo, Kernel, as_inputs, placeholder
from structgp.kernels.interpolation_weights import KINDS, axis_weights, check_regular, grid_weights, to_csr, to_dense
from structgp.kernels.product_grid import ProductGrid


class InterpolationKernel(Kernel):
    """SKI: ``W (K_1 (x) ... (x) K_d) W^T`` on a regular latent grid.

    kernels: one 1-D gpytorch kernel per dimension; grid: the regular (equally spaced) latent points
        ``(n_j,)`` of each dimension; kind: ``"cubic"`` (Keys, needs ``x_j`` in ``[g_1, g_{n-2}]``) or
        ``"linear"`` (needs ``x_j`` in ``[g_0, g_{n-1}]``). Inputs outside raise ``ValueError``.
    """

    def __init__(
        self, kernels: Sequence[gpytorch.kernels.Kernel], grid: Sequence[Tensor], kind: str = "cubic"
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
        self.grid = ProductGrid(kernels, grid, min_points=KINDS[kind])
        for j, axis in enumerate(self.grid.axes):
            check_regular(axis, f"grid[{j}]", kind)
        self.kind = kind
        self._train = InputMemo()  # the weights of the training inputs (test inputs are not remembered)
        self._lifted_memo = InputMemo()

    def check_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        x = as_inputs(x, name)
        self.grid.check_dims(x, name)
        self._weights(x, name, remember=True)
        return x

    def check_test_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        x = as_inputs(x, name)
        self.grid.check_dims(x, name)
        self._axis_matrices(x, name)
        return x

    def _weights(self, x: Tensor, name: str = "x", remember: bool = False) -> tuple[Tensor, Tensor]:
        """Flat latent indices ``(n, k^d)`` and weights ``(n, k^d)`` of ``x`` ``(n, d)``."""
        compute = lambda: grid_weights(self.grid.axes, x, self.kind, name)  # noqa: E731
        return self._train.get(x, compute) if remember else (self._train.peek(x) or compute())

    def interpolation(self, x: Tensor) -> Tensor:
        """``W`` ``(n, m)`` as a sparse CSR matrix (remembered for the training inputs)."""
        idx, w = self._weights(x, remember=True)
        return to_csr(idx, w, self.grid.size)

    def _axis_matrices(self, x: Tensor, name: str = "x") -> list[Tensor]:
        """The dense 1-D interpolation matrices ``W_j`` ``(n, n_j)`` of each dimension."""
        out = []
        for j, axis in enumerate(self.grid.axes):
            idx, w = axis_weights(axis.to(x.dtype), x[:, j], self.kind, name, j)
            out.append(to_dense(idx, w, axis.shape[0]))
        return out

    def forward(self, x: Tensor) -> SparseLifted:
        cov = self.grid.covariance()
        return self._lifted(x).with_base(cov)

    def _lifted(self, x: Tensor) -> SparseLifted:
        """``W (.) W^T`` with a placeholder base, remembered for the training inputs (so the canonical sparse
        lift and the pattern work cached on it are reused across hyperparameter values)."""

        def compute() -> SparseLifted:
            return SparseLifted(self.interpolation(x), placeholder(self.grid.size, x.dtype, x.device))

        return self._lifted_memo.get(x, compute)

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        w1, w2 = self._axis_matrices(x1), self._axis_matrices(x2)
        out = None
        for j in range(self.grid.dim):
            part = (w1[j] @ self.grid.factor(j)) @ w2[j].mT
            out = part if out is None else out * part
        return out

    def prior_diagonal(self, x: Tensor) -> Tensor:
        out = None
        for j, w in enumerate(self._axis_matrices(x)):
            part = ((w @ self.grid.factor(j)) * w).sum(-1)
            out = part if out is None else out * part
        return out
