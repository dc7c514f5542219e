"""GridKernel: a product kernel whose training inputs lie on a grid -> ``Kronecker`` (or a lifted selection).

For data on every cell of the grid ``g_1 x ... x g_d``, in row-major order, ``K(x, x)`` is exactly
``K_1 (x) ... (x) K_d``. For data on a subset of the cells (missing cells, repeated cells, any order) it is
``S (K_1 (x) ... (x) K_d) S^T`` with a 0/1 selection ``S`` (one nonzero a row): a ``SparseLifted``. Test
inputs may lie anywhere: ``k(x1, x2) = prod_j k_j(x1_j, x2_j)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor

from structgp.covariance import Kronecker, Operator, SparseLifted
from structgp.kernels.base import InputMemo, Kernel, as_inputs, placeholder, sparse_csr
from structgp.kernels.product_grid import ProductGrid


class GridKernel(Kernel):
    """``k(x, x') = prod_j k_j(x_j, x'_j)`` with training inputs on the grid ``grid[0] x ... x grid[d-1]``.

    kernels: one 1-D gpytorch kernel per dimension (wrap one of them in ``ScaleKernel`` for an output
        scale); grid: the sorted points ``(n_j,)`` of each dimension. Training inputs ``(n, d)`` must be grid
        points (else ``ValueError``); a point is on the grid when each coordinate is within
        ``1e-4`` of the smallest spacing of a grid point.
    """

    def __init__(self, kernels: Sequence[gpytorch.kernels.Kernel], grid: Sequence[Tensor]) -> None:
        super().__init__()
        self.grid = ProductGrid(kernels, grid)
        self._located = InputMemo()  # (indices, lifted selection or None) of the training inputs

    # -- inputs ---------------------------------------------------------------------------------------
    def check_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        x = self.check_test_inputs(x, name)
        self._layout(x, name)
        return x

    def check_test_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        x = as_inputs(x, name)
        self.grid.check_dims(x, name)
        return x

    def locate(self, x: Tensor, name: str = "x") -> Tensor:
        """The grid index of each coordinate ``(n, d)`` (int64); ``ValueError`` if a point is off the grid."""
        return self._layout(x, name)[0]

    def _layout(self, x: Tensor, name: str = "x") -> tuple[Tensor, SparseLifted | None]:
        """Grid indices ``(n, d)`` and the selection (``None`` for the full grid in row-major order), as a
        ``SparseLifted`` with a placeholder base; remembered while ``x`` is unchanged (the training inputs)."""

        def compute() -> tuple[Tensor, SparseLifted | None]:
            idx = locate_on_axes(self.grid.axes, x, name)
            flat = torch.zeros_like(idx[:, 0])
            for j, n_j in enumerate(self.grid.sizes):
                flat = flat * n_j + idx[:, j]
            size = self.grid.size
            if flat.shape[0] == size and bool((flat == torch.arange(size, device=flat.device)).all()):
                return idx, None
            return idx, SparseLifted(selection(flat, size, x.dtype), placeholder(size, x.dtype, x.device))

        return self._located.get(x, compute)

    # -- covariances ----------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Operator:
        cov = self.grid.covariance()
        lifted = self._layout(x)[1]
        return cov if lifted is None else lifted.with_base(cov)

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        layout = self._located.peek(x2)  # the training inputs: already located on the grid
        idx2 = None if layout is None else layout[0]
        out = None
        for j, axis in enumerate(self.grid.axes):
            if idx2 is not None:  # k_j(x1_j, g_j) gathered at the grid indices of x2
                part = self.grid.axis_cross(j, x1[:, j], axis).index_select(-1, idx2[:, j])
            else:
                part = self.grid.axis_cross(j, x1[:, j], x2[:, j])
            out = part if out is None else out * part
        return out

    def prior_diagonal(self, x: Tensor) -> Tensor:
        out = None
        for j in range(self.grid.dim):
            part = self.grid.axis_diag(j, x[:, j])
            out = part if out is None else out * part
        return out

    def dense_equivalent(self) -> Kronecker:
        """The Kronecker covariance over the whole grid (for inspection and tests)."""
        return self.grid.covariance()


def locate_on_axes(axes: list[Tensor], x: Tensor, name: str) -> Tensor:
    """Indices ``(n, d)`` of the grid points each coordinate of ``x`` ``(n, d)`` lies on."""
    cols = []
    for j, g in enumerate(axes):
        g = g.to(device=x.device, dtype=x.dtype)
        xj = x[:, j].detach()
        right = torch.searchsorted(g, xj.contiguous()).clamp(max=g.shape[0] - 1)
        left = (right - 1).clamp(min=0)
        nearest = torch.where((xj - g[left]).abs() <= (g[right] - xj).abs(), left, right)
        dist = (xj - g[nearest]).abs()
        spacing = g.diff().min() if g.shape[0] > 1 else g.abs().max().clamp_min(1.0)
        tol = torch.maximum(1e-4 * spacing, 8 * torch.finfo(x.dtype).eps * g.abs().max())
        off = dist > tol
        if bool(off.any()):
            i = int(off.nonzero()[0, 0])
            raise ValueError(
                f"{name}: point {i} is not on the grid: coordinate {j} = {float(xj[i]):.6g} is not a grid point "
                f"(grid[{j}] spans [{float(g[0]):.6g}, {float(g[-1]):.6g}] with {g.shape[0]} points); "
                f"{int(off.sum())} point(s) off the grid"
            )
        cols.append(nearest)
    return torch.stack(cols, dim=-1)


def selection(flat: Tensor, size: int, dtype: torch.dtype) -> Tensor:
    """The 0/1 selection ``(n, size)`` as sparse CSR: row ``r`` picks column ``flat[r]``."""
    n = flat.shape[0]
    crow = torch.arange(n + 1, device=flat.device)
    values = torch.ones(n, dtype=dtype, device=flat.device)
    return sparse_csr(crow, flat, values, (n, size))
