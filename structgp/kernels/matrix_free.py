"""MatrixFreeKernel: any gpytorch kernel as a matrix-free ``KernelOperator`` (products by row blocks)."""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

from structgp import _config
from structgp.covariance import KernelOperator
from structgp.kernels.dense import DenseKernel

BACKENDS = ("auto", "torch")


class MatrixFreeKernel(DenseKernel):
    """``K(x, x) = k(x, x)`` as a :class:`~structgp.covariance.KernelOperator` ``(..., n, n)``: held by ``x``
    and ``k``'s hyperparameters, never materialised, so an exact GP needs memory linear in ``n`` (the
    iterative engine runs on its products; its pivoted-Cholesky preconditioner reads single rows).

    base_kernel: any gpytorch kernel evaluable as a function of its parameters; backend: ``"torch"``
    (row blocks of plain torch operations; ``"auto"`` is the same: it is the only backend).
    Hyperparameters are read and set as on :class:`DenseKernel` (on ``k``).
    """

    def __init__(self, base_kernel: gpytorch.kernels.Kernel, backend: str = "auto") -> None:
        super().__init__(base_kernel)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, x: Tensor) -> KernelOperator:
        return KernelOperator(self.base_kernel, x, name="k(x, x), matrix-free")

    def prior(self, x: Tensor) -> KernelOperator:
        return self.forward(x)


def dense_fits(kernel: gpytorch.kernels.Kernel, x: Tensor) -> bool:
    """Whether the dense ``k(x, x)`` fits ``settings(memory_budget=...)``."""
    batch = torch.broadcast_shapes(x.shape[:-2], kernel.batch_shape).numel()
    return batch * x.shape[-2] ** 2 * x.dtype.itemsize <= _config.current().memory_budget


def matrix_free_reason(kernel: gpytorch.kernels.Kernel, x: Tensor) -> str:
    """The operator name that says why a ``DenseKernel`` went matrix-free."""
    n = x.shape[-2]
    need = torch.broadcast_shapes(x.shape[:-2], kernel.batch_shape).numel() * n * n * x.dtype.itemsize
    return (
        f"k(x, x), matrix-free: the dense {n} x {n} matrix ({need / 2**30:.1f} GiB) exceeds "
        f"memory_budget ({_config.current().memory_budget / 2**30:.1f} GiB)"
    )
