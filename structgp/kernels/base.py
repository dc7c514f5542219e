"""The protocol of structure-producing kernels, and the evaluation of gpytorch kernels they build on.

A structgp kernel is a ``torch.nn.Module`` that maps training inputs to a structured covariance operator
and answers what prediction needs without densifying the training covariance:

    kernel(x)               K(x, x) as a structgp operator (Dense, Kronecker, LowRank, SparseLifted, ...)
    kernel.cross(x1, x2)    k(x1, x2), a dense (..., n1, n2) tensor (prediction works on chunks of x1)
    kernel.cross_factor(x)  F(x) (..., n, r) when k(x1, x2) = F(x1) F(x2)^T with small r, else None
    kernel.prior(x)         the prior covariance at test points, an operator (..., n, n)
    kernel.prior_diagonal(x)   its diagonal (..., n), cheaply
    kernel.check_inputs(x, name)       validates training inputs (e.g. on the grid): a clear ValueError
    kernel.check_test_inputs(x, name)  validates test inputs (e.g. inside an interpolation grid)
    kernel.bound_correction(x, noise)  a term a variational bound adds to log p(y) (VFE's trace term), or None

``num_tasks`` is the number of outputs per input point (the covariance is over ``n * num_tasks`` values,
point-major: the task index varies fastest).
"""

from __future__ import annotations

import warnings
import weakref

import gpytorch
import torch
from torch import Tensor, nn

from structgp.covariance import Dense, Operator


class Kernel(nn.Module):
    """Base class of structgp kernels (see the module docstring for the protocol)."""

    num_tasks: int = 1

    def forward(self, x: Tensor) -> Operator:
        """``K(x, x)`` as a structured operator ``(..., N, N)``, ``N = n * num_tasks``."""
        raise NotImplementedError

    def cross(self, x1: Tensor, x2: Tensor) -> Tensor:
        """``k(x1, x2)`` dense ``(..., n1 * num_tasks, n2 * num_tasks)``."""
        raise NotImplementedError

    def cross_factor(self, x: Tensor) -> Tensor | None:
        """``F(x)`` ``(..., n, r)`` with ``k(x1, x2) = F(x1) F(x2)^T``, or None when there is no small one."""
        return None

    def prior(self, x: Tensor) -> Operator:
        """The prior covariance at (test) inputs ``x``; default ``Dense(cross(x, x))``."""
        return Dense(symmetrize(self.cross(x, x)), name="k(x, x)")

    def prior_diagonal(self, x: Tensor) -> Tensor:
        """The prior variances at ``x`` ``(..., n * num_tasks)``."""
        return self.prior(x).diagonal()

    def bound_correction(self, x: Tensor, noise: Tensor) -> Tensor | None:
        """The term a collapsed variational bound adds to ``log N(y; m, K(x, x) + N)`` ``(...)``, given the
        noise variances ``noise`` ``(..., N)`` at ``x``; None for an exact marginal likelihood (the default)."""
        return None

    def check_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        """``x`` as ``(..., n, d)`` (a 1-D ``x`` is ``(n, 1)``), validated; raises naming ``name``."""
        return as_inputs(x, name)

    def check_test_inputs(self, x: Tensor, name: str = "x") -> Tensor:
        """Validate test inputs (default: as training inputs)."""
        return self.check_inputs(x, name)

    def num_points(self, x: Tensor) -> int:
        """The number of input points in ``x`` (``x.shape[-2]`` for ``(..., n, d)`` inputs)."""
        return x.shape[-2]

    def take(self, x: Tensor, start: int, stop: int) -> Tensor:
        """The input points ``start:stop`` of ``x`` (prediction works on chunks of test points)."""
        return x[..., start:stop, :]


def as_inputs(x: Tensor, name: str) -> Tensor:
    """Validate a dense floating input tensor; ``(n,)`` becomes ``(n, 1)``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., n, d), got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense tensor (..., n, d), got layout {x.layout}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() < 2 or x.shape[-2] == 0:
        raise ValueError(f"{name}: expected a non-empty (..., n, d) tensor, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: expected finite inputs (found NaN or Inf)")
    return x


def check_gpytorch_kernel(k, name: str) -> gpytorch.kernels.Kernel:
    if not isinstance(k, gpytorch.kernels.Kernel):
        raise TypeError(f"{name}: expected a gpytorch.kernels.Kernel, got {type(k).__name__}")
    return k


def evaluate(k: gpytorch.kernels.Kernel, x1: Tensor, x2: Tensor | None = None) -> Tensor:
    """The dense matrix ``k(x1, x2)`` ``(..., n1, n2)`` of a gpytorch kernel."""
    out = k(x1, x1 if x2 is None else x2)
    return out if isinstance(out, Tensor) else out.to_dense()


def evaluate_diag(k: gpytorch.kernels.Kernel, x: Tensor) -> Tensor:
    """``diag k(x, x)`` ``(..., n)`` of a gpytorch kernel."""
    out = k(x, x, diag=True)
    return out if isinstance(out, Tensor) else out.to_dense()


def symmetrize(a: Tensor) -> Tensor:
    return (a + a.mT) / 2


def placeholder(size: int, dtype: torch.dtype, device: torch.device) -> Operator:
    """A stand-in base ``I_size``: the sparse lift of a ``SparseLifted`` is built (canonicalised) once with
    it, then ``with_base`` sets the real, hyperparameter-dependent base."""
    from structgp.covariance import ScaledIdentity

    return ScaledIdentity(torch.ones((), dtype=dtype, device=device), size)


def sparse_csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """``torch.sparse_csr_tensor`` without its beta-state warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class InputMemo:
    """Remembers one value computed from an input tensor (e.g. the grid indices or interpolation weights of
    the training inputs) while that very tensor object is alive and unchanged (a weak reference and its
    version counter); inputs that require grad are never remembered."""

    def __init__(self) -> None:
        self._ref: weakref.ref | None = None
        self._version = -1
        self._value = None

    def get(self, x: Tensor, compute):
        value = self.peek(x)
        if value is not None:
            return value
        value = compute()
        if not x.requires_grad:
            self._ref, self._version, self._value = weakref.ref(x), _version(x), value
        return value

    def peek(self, x: Tensor):
        """The remembered value if it was computed from this very ``x`` (unchanged), else None."""
        if self._ref is not None and self._ref() is x and self._version == _version(x):
            return self._value
        return None

    def __getstate__(self) -> dict:  # copies and pickles start empty (a weak reference cannot be copied)
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _version(x: Tensor) -> int:
    return x._version if x.layout == torch.strided else 0
