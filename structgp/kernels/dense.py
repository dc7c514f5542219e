"""DenseKernel: any gpytorch kernel, evaluated to a ``Dense`` operator."""

from __future__ import annotations

import gpytorch
from torch import Tensor

from structgp.covariance import Dense, KernelOperator
from structgp.kernels.base import Kernel, check_gpytorch_kernel, evaluate, evaluate_diag, symmetrize


class DenseKernel(Kernel):
    """``K(x, x) = k(x, x)`` held densely, ``(..., n, n)``; ``k`` is any gpytorch kernel (its
    hyperparameters, priors and constraints are the ones trained). Batch dims of ``k`` and ``x`` broadcast.

    Attributes this wrapper lacks are read from and written to ``k``: ``kernel.outputscale`` of a wrapped
    ``ScaleKernel`` is ``kernel.base_kernel.outputscale``, so hyperparameters are where gpytorch has them.
    """

    def __init__(self, base_kernel: gpytorch.kernels.Kernel) -> None:
        super().__init__()
        self.base_kernel = check_gpytorch_kernel(base_kernel, "base_kernel")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            base = self.__dict__.get("_modules", {}).get("base_kernel")
            if base is None or name.startswith("_"):
                raise
            return getattr(base, name)

    def __setattr__(self, name: str, value) -> None:
        base = self.__dict__.get("_modules", {}).get("base_kernel")
        if base is not None and _forwarded(self, base, name):
            setattr(base, name, value)  # e.g. kernel.outputscale = 2.0 sets the gpytorch kernel's
        else:
            super().__setattr__(name, value)

    def forward(self, x: Tensor) -> Dense | KernelOperator:
        """``Dense(k(x, x))``, or a matrix-free :class:`~structgp.covariance.KernelOperator` when the dense
        matrix would not fit ``settings(memory_budget=...)`` (its name says so, and so does ``sg.plan``)."""
        from structgp.kernels.matrix_free import dense_fits, matrix_free_reason

        if not dense_fits(self.base_kernel, x):
            return KernelOperator(self.base_kernel, x, name=matrix_free_reason(self.base_kernel, x))
        return Dense(symmetrize(evaluate(self.base_kernel, x)), name="k(x, x)")

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        return evaluate(self.base_kernel, x1, x2)

    def prior(self, x: Tensor) -> Dense:
        return self.forward(x)

    def prior_diagonal(self, x: Tensor) -> Tensor:
        return evaluate_diag(self.base_kernel, x)


def _forwarded(wrapper: DenseKernel, base: gpytorch.kernels.Kernel, name: str) -> bool:
    """Whether setting ``name`` on the wrapper means the wrapped kernel's attribute: a public name the wrapper
    does not have itself and the gpytorch kernel does."""
    if name.startswith("_") or name in wrapper.__dict__ or hasattr(type(wrapper), name):
        return False
    return name not in wrapper._modules and hasattr(base, name)


def as_kernel(kernel, name: str = "kernel") -> Kernel:
    """A structgp kernel as it is; a gpytorch kernel wrapped in :class:`DenseKernel`."""
    if isinstance(kernel, Kernel):
        return kernel
    if isinstance(kernel, gpytorch.kernels.Kernel):
        return DenseKernel(kernel)
    raise TypeError(f"{name}: expected a structgp kernel or a gpytorch.kernels.Kernel, got {type(kernel).__name__}")
