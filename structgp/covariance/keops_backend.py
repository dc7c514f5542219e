"""The KeOps backend of :class:`~structgp.covariance.KernelOperator`: ``k(x, x) @ V`` as one KeOps reduction.

KeOps (the optional ``pykeops`` package, ``pip install structgp[keops]``) compiles a kernel formula into a
reduction that never stores the ``n x n`` matrix, with its own gradients for ``x``, the hyperparameters and
``V``. It expresses the stationary kernels most GPs use; :func:`keops_formula` translates those gpytorch
kernels (``RBFKernel``, ``MaternKernel`` with nu in {1/2, 3/2, 5/2}, each optionally inside a ``ScaleKernel``,
scalar or ARD lengthscales, no batch dimensions) from the parameter tensors the operator holds (each raw
parameter through the kernel's own constraint), and returns None for anything else (the torch backend then
runs). The first product of each formula compiles it (10-60 s, cached by KeOps in its build folder).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence

import gpytorch
from torch import Tensor

SUPPORTED_NU = (0.5, 1.5, 2.5)


def keops_available() -> bool:
    """Whether ``pykeops`` is installed (it is not imported here: its import prints and probes for CUDA)."""
    return importlib.util.find_spec("pykeops") is not None


def keops_formula(kernel: gpytorch.kernels.Kernel, names: Sequence[str], params: Sequence[Tensor]):
    """``(family, nu, lengthscale (1, d) or (1, 1), outputscale ())`` of a kernel KeOps can express, from
    ``params`` (raw values, in ``names`` order), else None."""
    values = dict(zip(names, params))
    scale, inner, prefix = None, kernel, ""
    if isinstance(kernel, gpytorch.kernels.ScaleKernel):
        scale = kernel.raw_outputscale_constraint.transform(values["raw_outputscale"])
        inner, prefix = kernel.base_kernel, "base_kernel."
    if inner.batch_shape or kernel.batch_shape or inner.active_dims is not None:
        return None
    if type(inner) is gpytorch.kernels.RBFKernel:
        family, nu = "rbf", None
    elif type(inner) is gpytorch.kernels.MaternKernel and inner.nu in SUPPORTED_NU:
        family, nu = "matern", inner.nu
    else:
        return None
    raw = values.get(prefix + "raw_lengthscale")
    if raw is None or any(n.startswith(prefix) and n != prefix + "raw_lengthscale" for n in names):
        return None  # a prior or extra parameter this translation does not know
    lengthscale = inner.raw_lengthscale_constraint.transform(raw)
    return family, nu, lengthscale, scale


def keops_matmul(formula, x: Tensor, rhs: Tensor) -> Tensor:
    """``k(x, x) @ rhs`` ``(n, c)`` for ``x`` ``(n, d)`` by one KeOps reduction (differentiable)."""
    from pykeops.torch import LazyTensor

    family, nu, lengthscale, scale = formula
    z = x / lengthscale.reshape(1, -1)
    zi, zj = LazyTensor(z[:, None, :]), LazyTensor(z[None, :, :])
    sq = ((zi - zj) ** 2).sum(-1)
    if family == "rbf":
        k = (-0.5 * sq).exp()
    else:
        r = (sq + 1e-30).sqrt()  # the KeOps sqrt's gradient at 0 would be infinite: 0 * inf on the diagonal
        c = math.sqrt(2 * nu)
        k = (-c * r).exp()
        if nu == 1.5:
            k = (1 + c * r) * k
        elif nu == 2.5:
            k = (1 + c * r + (5.0 / 3.0) * sq) * k
    out = k @ rhs
    return out if scale is None else scale * out
