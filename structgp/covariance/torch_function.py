"""``torch.*`` functions on operators: the handler table behind ``Operator.__torch_function__``.

A torch function called with an operator argument is answered by a structured rule when one exists:

=======================================================  =================================================
``torch.matmul``/``mm``/``mv``, ``Tensor @ op``            ``op @ x``, ``x @ op``; ``op @ op`` a lazy ``Product``
``torch.linalg.solve(op, B, left=...)``                    ``op.solve`` (the engine :func:`structgp.plan` picks)
``torch.logdet``/``det``, ``torch.linalg.slogdet``/``det``  ``op.logdet()`` (sign ``+1``: ``op`` is SPD)
``torch.diagonal``/``diag``/``trace``                      ``op.diagonal()``; off-diagonals gathered by entries
``torch.sum``/``mean`` over dims                           matrix dims: ``op @ 1``; batch dims: a structured sum
``torch.add``/``mul``/``div`` with scalars and tensors     ``op + c 1 1^T`` (rank one), ``c * op``, ``op + B``
``torch.transpose``/``t``/``adjoint``                      ``op`` (symmetric)
``torch.linalg.eigvalsh``                                   :func:`structgp.inference.eigsh.eigvalsh` (by structure)
``torch.clone``/``detach``/``numel``                       on the operator's tensors
=======================================================  =================================================

Anything else (and combinations the rules do not cover, e.g. a negative scale or an elementwise product)
falls back to the dense matrix: a :class:`DenseFallbackWarning` says which function densified which
operator and how large it is, and above ``settings(dense_limit=...)`` the guard raises
:class:`~structgp.covariance.DensifyError` instead of allocating.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from numbers import Number
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.low_rank import LowRank
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator, guard_dense
from structgp.covariance.sum import AddedDiagonal, add
from structgp.covariance.validation import value_checks_enabled


class DenseFallbackWarning(UserWarning):
    """A torch function without a structured rule was computed on the operator's dense matrix."""


FALLBACK = NotImplemented  # a handler's answer for arguments its structured rule does not cover
HANDLERS: dict[Callable, Callable] = {}


def implements(*funcs: Callable) -> Callable:
    """Register a handler (same signature as the torch functions) for ``funcs``."""

    def deco(handler: Callable) -> Callable:
        for f in funcs:
            HANDLERS[f] = handler
        return handler

    return deco


def dispatch(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Answer ``func(*args, **kwargs)`` by its structured rule, else on the dense matrices (warned, guarded)."""
    handler = HANDLERS.get(func)
    if handler is not None:
        out = handler(*args, **kwargs)
        if out is not FALLBACK:
            return out
    return dense_fallback(func, args, kwargs)


def dense_fallback(func: Callable, args: tuple, kwargs: dict) -> Any:
    name = _name(func)

    def densify(x: Any) -> Any:
        return _densify(x, name) if isinstance(x, Operator) else x

    args, kwargs = pytree.tree_map(densify, (args, kwargs), is_leaf=lambda x: isinstance(x, Operator))
    return func(*args, **kwargs)


def _densify(op: Operator, name: str) -> Tensor:
    guard_dense(op, name)
    nbytes = math.prod(op.shape) * op.dtype.itemsize
    warnings.warn(
        f"{name} has no structured rule for {op!r} (or these arguments): computing it on the dense matrix "
        f"({nbytes / 2**20:.3g} MiB)",
        DenseFallbackWarning,
        stacklevel=5,
    )
    return op._to_dense()


def _name(func: Callable) -> str:
    name = torch.overrides.resolve_name(func)
    return name or getattr(func, "__qualname__", None) or repr(func)


def _split(a: Any, b: Any) -> tuple[Operator, Any]:
    """``(operator, other)`` of a commutative binary call, whichever side the operator is on."""
    return (a, b) if isinstance(a, Operator) else (b, a)


def _scalar(op: Operator, x: Any) -> Tensor | None:
    """``x`` as a scale ``()`` / ``(...)`` of ``op``'s dtype when it is a number, a 0-d tensor or a batch of
    them ``(..., 1, 1)``; else None."""
    if isinstance(x, bool):
        return None
    if isinstance(x, Number) and not isinstance(x, complex):
        return torch.tensor(float(x), dtype=op.dtype, device=op.device)
    if isinstance(x, Tensor) and x.is_floating_point():
        if x.dim() == 0:
            return x.to(op.dtype)
        if x.dim() >= 2 and x.shape[-2:] == (1, 1):
            return x[..., 0, 0].to(op.dtype)
    return None


def _all(c: Tensor, test: Callable[[Tensor], Tensor]) -> bool:
    """``test(c).all()`` where values may be read; under vmap/compile the values are trusted (True)."""
    if not value_checks_enabled(c):
        return True
    return bool(test(c).all())


# -- products and solves ------------------------------------------------------------------------------
@implements(torch.matmul, torch.linalg.matmul, torch.Tensor.matmul, torch.mm, torch.mv)
def _matmul(input: Any, other: Any, *, out: Any = None) -> Any:
    if out is not None:
        return FALLBACK
    if isinstance(input, Operator):
        if isinstance(other, (Operator, LinearMap, Tensor)):
            return input @ other
        return FALLBACK
    if isinstance(input, Tensor):
        return other.__rmatmul__(input)
    if isinstance(input, LinearMap):
        return input @ other
    return FALLBACK


@implements(torch.linalg.solve)
def _solve(A: Any, B: Any, *, left: bool = True, out: Any = None) -> Any:
    if out is not None or not isinstance(A, Operator):
        return FALLBACK
    if isinstance(B, Operator):
        B = _densify(B, "torch.linalg.solve (right-hand side)")
    if not isinstance(B, Tensor):
        return FALLBACK
    if left:
        return A.solve(B)
    if B.dim() < 2:
        return FALLBACK
    return A.solve(B.mT).mT  # X A = B  <=>  A X^T = B^T (A symmetric)


@implements(torch.logdet)
def _logdet(input: Operator) -> Tensor:
    return input.logdet()


@implements(torch.det, torch.linalg.det)
def _det(A: Operator, *, out: Any = None) -> Any:
    return FALLBACK if out is not None else A.logdet().exp()


@implements(torch.linalg.slogdet)
def _linalg_slogdet(A: Operator, *, out: Any = None) -> Any:
    if out is not None:
        return FALLBACK
    logdet = A.logdet()
    return torch.return_types.linalg_slogdet((torch.ones_like(logdet), logdet))


@implements(torch.slogdet)
def _slogdet(input: Operator) -> Any:
    logdet = input.logdet()
    return torch.return_types.slogdet((torch.ones_like(logdet), logdet))


@implements(torch.linalg.eigvalsh)
def _eigvalsh(A: Operator, UPLO: str = "L", *, out: Any = None) -> Any:
    if out is not None:
        return FALLBACK
    from structgp.inference.eigsh import eigvalsh

    return eigvalsh(A)


# -- diagonals ----------------------------------------------------------------------------------------
def _off_diagonal(op: Operator, offset: int) -> Tensor:
    """``diag(op, offset)`` ``(..., n - |offset|)`` (symmetric: the sign does not matter)."""
    k = abs(offset)
    if k == 0:
        return op.diagonal().expand(*op.batch_shape, op.n)
    if k >= op.n:
        return torch.zeros(*op.batch_shape, 0, dtype=op.dtype, device=op.device)
    from structgp.covariance.indexing import entries

    i = torch.arange(op.n - k, device=op.device)
    return entries(op, i, i + k)


@implements(torch.diagonal)
def _diagonal(input: Operator, offset: int = 0, dim1: int = 0, dim2: int = 1) -> Any:
    nd = input.dim()
    dims = {dim1 % nd, dim2 % nd} if -nd <= dim1 < nd and -nd <= dim2 < nd else set()
    if dims != {nd - 2, nd - 1}:
        return FALLBACK
    return _off_diagonal(input, offset)


@implements(torch.diag)
def _diag(input: Operator, diagonal: int = 0, *, out: Any = None) -> Any:
    if out is not None or input.dim() != 2:
        return FALLBACK
    return _off_diagonal(input, diagonal)


@implements(torch.trace)
def _trace(input: Operator) -> Any:
    return input.diagonal().sum(-1) if input.dim() == 2 else FALLBACK


# -- reductions ---------------------------------------------------------------------------------------
@implements(torch.sum)
def _sum(input: Operator, dim: Any = None, keepdim: bool = False, *, dtype: Any = None, out: Any = None) -> Any:
    return _reduce(input, dim, keepdim, dtype, out, mean=False)


@implements(torch.mean)
def _mean(input: Operator, dim: Any = None, keepdim: bool = False, *, dtype: Any = None, out: Any = None) -> Any:
    return _reduce(input, dim, keepdim, dtype, out, mean=True)


def _reduce(op: Operator, dim: Any, keepdim: bool, dtype: Any, out: Any, mean: bool) -> Any:
    if dtype is not None or out is not None or not isinstance(op, Operator):
        return FALLBACK
    nd = op.dim()
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        dims = set(range(nd))
    else:
        dims_list = [dim] if isinstance(dim, int) else list(dim)
        if any(not -nd <= d < nd for d in dims_list):
            return FALLBACK  # torch raises the right IndexError on the dense tensor
        dims = {d % nd for d in dims_list}
    batch_dims = sorted((d for d in dims if d < nd - 2), reverse=True)
    matrix_dims = dims - set(batch_dims)
    if batch_dims and keepdim:
        return FALLBACK
    count = math.prod([op.shape[d] for d in dims])
    reduced = op
    for d in batch_dims:  # highest first, so that the lower dims keep their positions
        reduced = sum_batch(reduced._expand(reduced.batch_shape), d)
    if not matrix_dims:
        return reduced._scale(torch.tensor(1.0 / count, dtype=op.dtype, device=op.device)) if mean else reduced
    ones = torch.ones(reduced.n, 1, dtype=op.dtype, device=op.device)
    rows = reduced._matmul(ones)  # (..., n, 1): row sums = column sums (symmetric)
    if len(matrix_dims) == 2:
        result = rows.sum((-2, -1), keepdim=keepdim)
    elif keepdim:
        result = rows if nd - 1 in matrix_dims else rows.mT
    else:
        result = rows.squeeze(-1)
    return result / count if mean else result


@functools.singledispatch
def sum_batch(op: Operator, dim: int) -> Operator:
    """``sum_i op[..., i, ...]`` over batch dim ``dim`` (``op`` expanded to its batch shape): an operator.
    Without a rule of its own, the sum of the indexed members (structure-keeping ``+``)."""
    from structgp.covariance.indexing import batch_getitem

    lead = (slice(None),) * dim
    rest = (slice(None),) * (len(op.batch_shape) - dim - 1)
    out = None
    for i in range(op.batch_shape[dim]):
        member = batch_getitem(op, lead + (i,) + rest)
        out = member if out is None else add(out, member)
    return out


@sum_batch.register
def _(op: Dense, dim: int) -> Operator:
    return op._replace(matrix=op.matrix.sum(dim))


@sum_batch.register
def _(op: Diagonal, dim: int) -> Operator:
    return op._replace(diag=op.diag.sum(dim))


@sum_batch.register
def _(op: ScaledIdentity, dim: int) -> Operator:
    return op._replace(scale=op.scale.sum(dim))


@sum_batch.register
def _(op: LowRank, dim: int) -> Operator:
    # sum_i W_i W_i^T = [W_1, ..., W_b] [W_1, ..., W_b]^T: the members' columns side by side
    return op._replace(factor=op.factor.movedim(dim, -2).flatten(-2))


@sum_batch.register
def _(op: AddedDiagonal, dim: int) -> Operator:
    batch = op.batch_shape
    return add(sum_batch(op.base._expand(batch), dim), sum_batch(op.noise._expand(batch), dim))


# -- elementwise arithmetic with scalars and tensors --------------------------------------------------
@implements(torch.add)
def _add(input: Any, other: Any, *, alpha: Any = 1, out: Any = None) -> Any:
    if out is not None:
        return FALLBACK
    if alpha != 1:
        other = _mul(other, alpha) if isinstance(other, Operator) else other * alpha
        if other is FALLBACK:
            return FALLBACK
    op, x = _split(input, other)
    if isinstance(x, Operator):
        return add(op, x)
    c = _scalar(op, x)
    if c is not None:  # c added to every entry: op + c 1 1^T, a rank-one term when c >= 0
        if not _all(c, lambda t: t >= 0):
            return FALLBACK
        ones = torch.ones(op.n, 1, dtype=op.dtype, device=op.device)
        return add(op, LowRank(c.sqrt()[..., None, None] * ones))
    if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[-2:] == op.shape[-2:] and x.is_floating_point():
        try:
            dense = Dense(x.to(op.dtype), name="other")
        except ValueError:  # not symmetric: the sum is not a covariance
            return FALLBACK
        return add(op, dense)
    return FALLBACK


@implements(torch.mul, torch.multiply)
def _mul(input: Any, other: Any, *, out: Any = None) -> Any:
    if out is not None:
        return FALLBACK
    op, x = _split(input, other)
    c = _scalar(op, x)
    if c is None or not _all(c, lambda t: t > 0):
        return FALLBACK  # elementwise (Hadamard) products and non-positive scales
    return op._scale(c)


@implements(torch.div, torch.true_divide)
def _div(input: Any, other: Any, *, rounding_mode: Any = None, out: Any = None) -> Any:
    if out is not None or rounding_mode is not None or not isinstance(input, Operator):
        return FALLBACK
    c = _scalar(input, other)
    if c is None or not _all(c, lambda t: t > 0):
        return FALLBACK
    return input._scale(1.0 / c)


# ``tensor + op``, ``tensor * op`` (and ``tensor.add(op)``, ``tensor.mul(op)``) arrive here as Tensor methods and go
# to the operator's reflected operators, so they mean what ``op + tensor`` and ``op * tensor`` mean (``c * op``
# with ``c`` ``(...)`` is a batch of scales, ``t + op`` adds the symmetric ``t`` as a Dense term); the handlers of
# ``torch.add`` / ``torch.mul`` above read ``c`` with torch's broadcasting instead.
@implements(torch.Tensor.add)
def _tensor_add(self: Any, other: Any, *, alpha: Any = 1, out: Any = None) -> Any:
    if isinstance(self, Tensor) and isinstance(other, Operator) and alpha == 1 and out is None:
        return other.__radd__(self)
    return _add(self, other, alpha=alpha, out=out)


@implements(torch.Tensor.mul)
def _tensor_mul(self: Any, other: Any, *, out: Any = None) -> Any:
    if isinstance(self, Tensor) and isinstance(other, Operator) and out is None:
        return other.__rmul__(self)
    return _mul(self, other, out=out)


# -- transposes and tensor bookkeeping ----------------------------------------------------------------
@implements(torch.transpose, torch.swapaxes, torch.swapdims)
def _transpose(input: Operator, dim0: int, dim1: int) -> Any:
    nd = input.dim()
    if not (-nd <= dim0 < nd and -nd <= dim1 < nd):
        return FALLBACK
    dims = {dim0 % nd, dim1 % nd}
    return input if dims in ({nd - 2, nd - 1}, {dim0 % nd}) else FALLBACK


@implements(torch.t)
def _t(input: Operator) -> Any:
    return input if input.dim() == 2 else FALLBACK


@implements(torch.adjoint)
def _adjoint(input: Operator) -> Operator:
    return input  # real symmetric


@implements(torch.clone)
def _clone(input: Operator, *, memory_format: Any = None) -> Operator:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, input)


@implements(torch.detach)
def _detach(input: Operator) -> Operator:
    return pytree.tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, input)


@implements(torch.numel)
def _numel(input: Operator) -> int:
    return math.prod(input.shape)
