"""Sums of operators, with the structure-keeping rules of ``a + b``.

``base + noise`` with a diagonal ``noise`` (``Diagonal``, ``ScaledIdentity`` or a Kronecker product of
diagonals) becomes :class:`AddedDiagonal`, which the engines recognise (Woodbury for low-rank and lifted
bases, eigendecomposition for Kronecker bases, block-wise for block-diagonal ones). Other sums are
:class:`Sum`, answered densely when small or iteratively.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.low_rank import LowRank
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.validation import broadcast_batch, check_same_kind


class AddedDiagonal(Operator):
    """``base + noise`` where ``noise`` is diagonal; shape ``(..., n, n)``."""

    _children = ("base", "noise")

    def __init__(self, base: Operator, noise: Operator) -> None:
        super().__init__()
        if not noise.is_diagonal:
            raise TypeError(f"noise: expected a diagonal operator, got {type(noise).__name__}")
        _check_compatible(base, noise, ("base", "noise"))
        self.base = base
        self.noise = noise

    @property
    def shape(self) -> torch.Size:
        return torch.broadcast_shapes(self.base.batch_shape, self.noise.batch_shape) + self.base.shape[-2:]

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.base._matmul(rhs) + self.noise._matmul(rhs)

    def diagonal(self) -> Tensor:
        return self.base.diagonal() + self.noise.diagonal()

    def _to_dense(self) -> Tensor:
        return self.base._to_dense() + self.noise._to_dense()

    def _scale(self, c: Tensor) -> AddedDiagonal:
        return self._replace(base=self.base._scale(c), noise=self.noise._scale(c))

    def _expand(self, batch_shape: torch.Size) -> AddedDiagonal:
        return self._replace(base=self.base._expand(batch_shape), noise=self.noise._expand(batch_shape))

    def _add_diagonal(self, noise: Operator) -> Operator:
        return self.base._add_diagonal(add_diagonals(self.noise, noise))


class Sum(Operator):
    """``t_1 + t_2 + ...`` with no structured rule; shape ``(..., n, n)``."""

    _children = ("terms",)

    def __init__(self, *terms: Operator) -> None:
        super().__init__()
        if len(terms) < 2:
            raise ValueError(f"terms: expected at least two operators, got {len(terms)}")
        for i, t in enumerate(terms[1:], 1):
            _check_compatible(terms[0], t, ("terms[0]", f"terms[{i}]"))
        self.terms = list(terms)

    @property
    def shape(self) -> torch.Size:
        return torch.broadcast_shapes(*(t.batch_shape for t in self.terms)) + self.terms[0].shape[-2:]

    def _matmul(self, rhs: Tensor) -> Tensor:
        return sum(t._matmul(rhs) for t in self.terms)

    def diagonal(self) -> Tensor:
        return sum(t.diagonal() for t in self.terms)

    def _to_dense(self) -> Tensor:
        return sum(t._to_dense() for t in self.terms)

    def _scale(self, c: Tensor) -> Sum:
        return self._replace(terms=[t._scale(c) for t in self.terms])

    def _expand(self, batch_shape: torch.Size) -> Sum:
        return self._replace(terms=[t._expand(batch_shape) for t in self.terms])


def _check_compatible(a: Operator, b: Operator, names: tuple[str, str]) -> None:
    if a.n != b.n:
        raise ValueError(f"{names[1]}: expected size n={a.n} to match {names[0]}, got n={b.n}")
    broadcast_batch(a.batch_shape, b.batch_shape, names=names)
    check_same_kind({names[0]: a._first_float(), names[1]: b._first_float()})


def add_diagonals(a: Operator, b: Operator) -> Operator:
    """The sum of two diagonal operators, still diagonal."""
    if isinstance(a, ScaledIdentity) and isinstance(b, ScaledIdentity):
        return ScaledIdentity(a.scale + b.scale, a.n)
    return Diagonal(a.diagonal() + b.diagonal())


def _adopt_weak(op: Operator, other: Operator) -> Operator:
    """A ScaledIdentity built from a Python number takes the other operand's dtype and device."""
    if isinstance(op, ScaledIdentity) and op.weak is not None:
        if not (isinstance(other, ScaledIdentity) and other.weak is not None):
            scale = torch.full(op.scale.shape, op.weak, dtype=other.dtype, device=other.device)
            return op._replace(scale=scale, weak=None)
    return op


def add(a: Operator, b: Any) -> Operator:
    """``a + b`` keeping whatever structure the pair has."""
    if isinstance(b, Tensor):
        b = as_operator(b, "other")
    if not isinstance(b, Operator):
        raise TypeError(
            f"other: expected a structgp operator or an (..., n, n) tensor, got {type(b).__name__}; "
            "to add s to the diagonal use ScaledIdentity(s, n)"
        )
    a, b = _adopt_weak(a, b), _adopt_weak(b, a)
    _check_compatible(a, b, ("self", "other"))
    if a.is_diagonal and b.is_diagonal:
        return add_diagonals(a, b)
    if b.is_diagonal:
        return a._add_diagonal(b)
    if a.is_diagonal:
        return b._add_diagonal(a)
    if isinstance(a, AddedDiagonal):
        return add(a.base, b)._add_diagonal(a.noise)
    if isinstance(b, AddedDiagonal):
        return add(a, b.base)._add_diagonal(b.noise)
    if isinstance(a, LowRank) and isinstance(b, LowRank):
        wa, wb = torch.broadcast_tensors(a.factor[..., :1], b.factor[..., :1])
        fa = a.factor.expand(*wa.shape[:-1], a.rank)
        fb = b.factor.expand(*wb.shape[:-1], b.rank)
        return LowRank(torch.cat([fa, fb], dim=-1))
    terms = (a.terms if isinstance(a, Sum) else [a]) + (b.terms if isinstance(b, Sum) else [b])
    return Sum(*terms)
