"""MultitaskKernel: task covariance (x) data covariance -> ``Kronecker``.

    K = K_x (x) B,      B = V V^T + diag(v)  (a gpytorch ``IndexKernel``: rank-r factor plus diagonal)

over the ``n t`` values ordered point-major (the task index varies fastest, as gpytorch's interleaved
multitask layout): ``y`` ``(n, t)`` flattened row-major. With per-task noise ``I_n (x) diag(s)`` the noisy
covariance is a Kronecker product plus a Kronecker-structured diagonal, solved exactly by the symmetrised
eigendecomposition (``t^3 + n^3``, then ``n t (n + t)`` a solve).
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor

from structgp.covariance import Dense, Kronecker
from structgp.kernels.base import Kernel, check_gpytorch_kernel, evaluate, evaluate_diag, symmetrize


class MultitaskKernel(Kernel):
    """``k_x(x, x') B[i, j]`` for ``num_tasks`` outputs; ``B`` is an ``IndexKernel``'s ``V V^T + diag(v)``.

    data_kernel: any gpytorch kernel over the inputs; rank: the rank of ``V``; task_covar_prior: a gpytorch
    prior over ``B`` (as ``IndexKernel``'s ``prior``); batch_shape: of the task covariance.
    """

    def __init__(
        self,
        data_kernel: gpytorch.kernels.Kernel,
        num_tasks: int,
        rank: int = 1,
        task_covar_prior=None,
        batch_shape: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks: expected a positive int, got {num_tasks!r}")
        self.data_kernel = check_gpytorch_kernel(data_kernel, "data_kernel")
        self.task_kernel = gpytorch.kernels.IndexKernel(
            num_tasks=num_tasks, rank=rank, prior=task_covar_prior, batch_shape=torch.Size(batch_shape)
        )
        self.num_tasks = num_tasks

    @property
    def data_covar_module(self) -> gpytorch.kernels.Kernel:
        """gpytorch's name (``MultitaskKernel.data_covar_module``) of :attr:`data_kernel`."""
        return self.data_kernel

    @property
    def task_covar_module(self) -> gpytorch.kernels.IndexKernel:
        """gpytorch's name (``MultitaskKernel.task_covar_module``) of :attr:`task_kernel`."""
        return self.task_kernel

    def task_covariance(self) -> Tensor:
        """``B = V V^T + diag(v)`` ``(..., t, t)``."""
        return self.task_kernel.covar_matrix.to_dense()

    def forward(self, x: Tensor) -> Kronecker:
        kx = symmetrize(evaluate(self.data_kernel, x))
        return Kronecker(Dense(kx, name="k_x(x, x)"), Dense(self.task_covariance(), name="B"))

    def prior(self, x: Tensor) -> Kronecker:
        return self.forward(x)

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        kx = evaluate(self.data_kernel, x1, x2)
        b = self.task_covariance()
        prod = kx[..., :, None, :, None] * b[..., None, :, None, :]
        return prod.reshape(*prod.shape[:-4], prod.shape[-4] * prod.shape[-3], prod.shape[-2] * prod.shape[-1])

    def prior_diagonal(self, x: Tensor) -> Tensor:
        d = evaluate_diag(self.data_kernel, x)
        v = self.task_covariance().diagonal(dim1=-2, dim2=-1)
        return (d.unsqueeze(-1) * v.unsqueeze(-2)).flatten(-2)
