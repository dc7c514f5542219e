"""The KeOps backend of :class:`~structgp.covariance.KernelOperator`: ``k(x, x) @ V`` as one KeOps reduction.

KeOps (the optional ``pykeops`` package, ``pip install structgp[keops]``) compiles a kernel formula into a
reduction that never stores the ``n x n`` matrix, with its own gradients for ``x``, the hyperparameters and
``V``. It expresses the kernels :func:`~structgp.covariance.kernel_formula.kernel_formula` translates (RBF and
Matern, optionally scaled, unbatched). The first product of each formula compiles it (10-60 s, cached by KeOps
in its build folder).
"""

from __future__ import annotations

import importlib.util
import math

from torch import Tensor

from structgp.covariance.kernel_formula import Formula


def keops_available() -> bool:
    """Whether ``pykeops`` is installed (it is not imported here: its import prints and probes for CUDA)."""
    return importlib.util.find_spec("pykeops") is not None


def keops_matmul(formula: Formula, x: Tensor, rhs: Tensor, rows: tuple[int, int] | None = None) -> Tensor:
    """``k(x, x) @ rhs`` ``(n, c)`` for ``x`` ``(n, d)`` by one KeOps reduction (differentiable); with ``rows``
    ``(start, stop)`` only those rows, ``(stop - start, c)`` (a reduction over every column for each of them,
    so each row is the whole product's: a partitioned product's share)."""
    from pykeops.torch import LazyTensor

    family, nu, lengthscale, scale = formula
    z = x / lengthscale.reshape(1, -1)
    zr = z if rows is None else z[rows[0] : rows[1]]
    zi, zj = LazyTensor(zr[:, None, :]), LazyTensor(z[None, :, :])
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
