"""ProductGrid: a product kernel ``k(x, x') = prod_j k_j(x_j, x'_j)`` over a Cartesian grid of points.

On the grid ``g_1 x ... x g_d`` (``g_j`` of ``n_j`` sorted points) the covariance is the Kronecker product
``K_1 (x) ... (x) K_d`` with ``K_j = k_j(g_j, g_j)`` (row-major: the last dimension varies fastest). This
module holds the 1-D gpytorch kernels and the grid, and is shared by the grid, interpolation and
aggregation kernels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import gpytorch
import torch
from torch import Tensor, nn

from structgp.covariance import Dense, Kronecker
from structgp.kernels.base import check_gpytorch_kernel, evaluate, evaluate_diag, symmetrize


class ProductGrid(nn.Module):
    """One 1-D gpytorch kernel per dimension and the grid points ``grid[j]`` ``(n_j,)`` of each.

    Batch dims of the kernels (their ``batch_shape``) broadcast; the grid itself is unbatched.
    """

    def __init__(self, kernels: Sequence[gpytorch.kernels.Kernel], grid: Sequence[Tensor], min_points: int = 1) -> None:
        super().__init__()
        if isinstance(kernels, gpytorch.kernels.Kernel) or not isinstance(kernels, (list, tuple, nn.ModuleList)):
            raise TypeError("kernels: expected a list of 1-D gpytorch kernels, one per grid dimension")
        if not isinstance(grid, (list, tuple)) or len(grid) == 0:
            raise TypeError("grid: expected a non-empty list of 1-D tensors, one per dimension")
        if len(kernels) != len(grid):
            raise ValueError(f"kernels: expected one kernel per grid dimension ({len(grid)}), got {len(kernels)}")
        self.kernels = nn.ModuleList(check_gpytorch_kernel(k, f"kernels[{j}]") for j, k in enumerate(kernels))
        for j, g in enumerate(grid):
            self.register_buffer(f"grid_{j}", _check_axis(g, f"grid[{j}]", min_points))

    @property
    def dim(self) -> int:
        return len(self.kernels)

    @property
    def axes(self) -> list[Tensor]:
        """The grid points of each dimension ``(n_j,)``."""
        return [getattr(self, f"grid_{j}") for j in range(self.dim)]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(g.shape[0] for g in self.axes)

    @property
    def size(self) -> int:
        return math.prod(self.sizes)

    def factor(self, j: int) -> Tensor:
        """``K_j = k_j(g_j, g_j)`` ``(..., n_j, n_j)``."""
        g = self.axes[j].unsqueeze(-1)
        return symmetrize(evaluate(self.kernels[j], g))

    def covariance(self) -> Kronecker:
        """``K_1 (x) ... (x) K_d`` over the whole grid ``(..., N, N)``."""
        return Kronecker(*(Dense(self.factor(j), name=f"K_{j}") for j in range(self.dim)))

    def axis_cross(self, j: int, a: Tensor, b: Tensor) -> Tensor:
        """``k_j(a, b)`` ``(..., n_a, n_b)`` for coordinates ``a`` ``(n_a,)`` and ``b`` ``(n_b,)``."""
        return evaluate(self.kernels[j], a.unsqueeze(-1), b.unsqueeze(-1))

    def axis_diag(self, j: int, a: Tensor) -> Tensor:
        return evaluate_diag(self.kernels[j], a.unsqueeze(-1))

    def check_dims(self, x: Tensor, name: str) -> None:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"{name}: expected {self.dim} columns (one per grid dimension), got shape {tuple(x.shape)}"
            )
        if x.dim() != 2:
            raise ValueError(
                f"{name}: grid kernels take unbatched inputs (n, {self.dim}); batch the kernels' hyperparameters "
                f"instead, got shape {tuple(x.shape)}"
            )


def _check_axis(g, name: str, min_points: int) -> Tensor:
    if not isinstance(g, Tensor) or not g.is_floating_point() or g.dim() != 1:
        raise TypeError(f"{name}: expected a 1-D floating tensor of grid points")
    if g.shape[0] < min_points:
        raise ValueError(f"{name}: expected at least {min_points} grid points, got {g.shape[0]}")
    if not bool(torch.isfinite(g).all()) or (g.shape[0] > 1 and not bool((g.diff() > 0).all())):
        raise ValueError(f"{name}: expected finite, strictly increasing grid points")
    return g.detach().clone()
