"""MatrixFreeKernel: any gpytorch kernel as a matrix-free ``KernelOperator`` (products by tiles)."""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

from structgp import _config
from structgp.covariance import KernelOperator
from structgp.covariance.keops_backend import keops_available
from structgp.covariance.kernel_formula import kernel_formula
from structgp.kernels.dense import DenseKernel

BACKENDS = ("auto", "torch", "keops")


class MatrixFreeKernel(DenseKernel):
    """``K(x, x) = k(x, x)`` as a :class:`~structgp.covariance.KernelOperator` ``(..., n, n)``: held by ``x``
    and ``k``'s hyperparameters, never materialised, so an exact GP needs memory linear in ``n`` (the
    iterative engine runs on its products; its pivoted-Cholesky preconditioner reads single rows).

    base_kernel: any gpytorch kernel evaluable as a function of its parameters; backend: ``"torch"`` (tiles
    of plain torch operations), ``"keops"`` (one KeOps reduction a product: pykeops installed, an
    unbatched RBF or Matern kernel) or ``"auto"``: KeOps for CUDA inputs where it applies, else torch (on the
    CPU the torch tiles run on all cores and are the faster; see ``benchmarks/bench_matrix_free.py``). Under
    an active :mod:`structgp.distributed` process group both backends compute each rank's rows.
    Hyperparameters are read and set as on :class:`DenseKernel` (on ``k``).
    """

    def __init__(self, base_kernel: gpytorch.kernels.Kernel, backend: str = "auto") -> None:
        super().__init__(base_kernel)
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, x: Tensor) -> KernelOperator:
        backend = self.backend
        if backend == "auto":
            keops = x.is_cuda and keops_applies(self.base_kernel, x)
            backend = "keops" if keops else "torch"
        return KernelOperator(self.base_kernel, x, name=f"k(x, x), matrix-free ({backend})", backend=backend)

    def prior(self, x: Tensor) -> KernelOperator:
        return self.forward(x)


def dense_bytes(kernel: gpytorch.kernels.Kernel, x: Tensor) -> int:
    """Bytes of the dense ``k(x, x)`` ``(..., n, n)``."""
    batch = torch.broadcast_shapes(x.shape[:-2], kernel.batch_shape).numel()
    return batch * x.shape[-2] ** 2 * x.dtype.itemsize


def dense_fits(kernel: gpytorch.kernels.Kernel, x: Tensor) -> bool:
    """Whether the dense ``k(x, x)`` fits ``settings(memory_budget=...)``."""
    return dense_bytes(kernel, x) <= _config.current().memory_budget


def matrix_free_reason(kernel: gpytorch.kernels.Kernel, x: Tensor) -> str:
    """The operator name that says why a ``DenseKernel`` went matrix-free."""
    n = x.shape[-2]
    return (
        f"k(x, x), matrix-free: the dense {n} x {n} matrix ({dense_bytes(kernel, x) / 2**30:.1f} GiB) exceeds "
        f"memory_budget ({_config.current().memory_budget / 2**30:.1f} GiB)"
    )


def keops_applies(kernel: gpytorch.kernels.Kernel, x: Tensor) -> bool:
    """Whether the KeOps backend is installed and can express ``kernel`` on ``x`` ``(n, d)``."""
    if not keops_available() or x.dim() != 2:
        return False
    named = list(kernel.named_parameters())
    return kernel_formula(kernel, [n for n, _ in named], [p for _, p in named]) is not None
