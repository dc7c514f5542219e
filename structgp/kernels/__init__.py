"""Structure-producing kernels built on gpytorch kernels: each maps inputs to a structgp operator.

    DenseKernel(k)                      -> Dense                     (any gpytorch kernel; KernelOperator
                                                                      when the dense matrix exceeds the
                                                                      memory budget)
    MatrixFreeKernel(k)                 -> KernelOperator            (any gpytorch kernel, never materialised)
    GridKernel(kernels, grid)           -> Kronecker (full grid) / SparseLifted selection (cells missing)
    InducingPointKernel(k, z, method)   -> LowRank (SoR, DTC, VFE) / LowRank + Diagonal (FITC)
    InterpolationKernel(kernels, grid)  -> SparseLifted(W, Kronecker)   (KISS-GP / SKI)
    AggregationKernel(kernels, grid)    -> SparseLifted(A, Kronecker)   (weighted sums of latent cells)
    GroupKernel(k)                      -> BlockDiag, or Permuted(BlockDiag) for rows in any order
    MultitaskKernel(k, num_tasks)       -> Kronecker(K_x, B)         (task covariance (x) data covariance)

``interpolation_grid(x)`` / ``choose_grid_size(x)`` choose the latent grid of an ``InterpolationKernel`` from
the data (size and padding), as gpytorch's ``GridInterpolationKernel`` does.

Each also gives what prediction needs without densifying the training covariance: ``cross(x1, x2)``
(or ``cross_factor(x)`` for low-rank kernels), ``prior(x)`` and ``prior_diagonal(x)``.
"""

from structgp.kernels.aggregation import AggregationKernel
from structgp.kernels.base import Kernel
from structgp.kernels.dense import DenseKernel, as_kernel
from structgp.kernels.grid import GridKernel
from structgp.kernels.grid_choice import choose_grid_size, interpolation_grid
from structgp.kernels.group import GroupKernel
from structgp.kernels.inducing import InducingPointKernel
from structgp.kernels.interpolation import InterpolationKernel
from structgp.kernels.matrix_free import MatrixFreeKernel
from structgp.kernels.multitask import MultitaskKernel
from structgp.kernels.product_grid import ProductGrid

__all__ = [
    "AggregationKernel",
    "DenseKernel",
    "GridKernel",
    "GroupKernel",
    "InducingPointKernel",
    "InterpolationKernel",
    "Kernel",
    "MatrixFreeKernel",
    "MultitaskKernel",
    "ProductGrid",
    "as_kernel",
    "choose_grid_size",
    "interpolation_grid",
]
