"""The small protocol every structured covariance operator follows.

An operator represents a symmetric positive (semi)definite matrix of shape ``(..., n, n)`` by the few
tensors that define it. It owns its data and its exact structured algebra (``@``, ``diagonal``,
``to_dense``, sums, scaling); every expensive question (``solve``, ``logdet``, ``inv_quad_logdet``,
``root``) is a thin call into :mod:`structgp.inference`, which picks the algorithm for the structure.

Operators are registered pytrees (see ``pytree_node``), so ``torch.func.vmap``/``grad`` and
``torch.utils._pytree`` see through them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from structgp.covariance.map import LinearMap
from structgp.covariance.pytree_node import PyTreeNode
from structgp.covariance.validation import as_tensor, check_dense_size, check_nonnegative, check_positive


class Operator(PyTreeNode):
    """Base class of structured covariance operators ``(..., n, n)``."""

    __array_priority__ = 1000  # make ``tensor @ op`` defer to ``op.__rmatmul__``

    # -- shape, dtype, device -----------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        """``(..., n, n)``."""
        raise NotImplementedError

    @property
    def batch_shape(self) -> torch.Size:
        return self.shape[:-2]

    @property
    def n(self) -> int:
        return self.shape[-1]

    @property
    def is_diagonal(self) -> bool:
        """True when the operator is a diagonal matrix (so it can serve as noise in a structured sum)."""
        return False

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the first floating tensor (in pytree leaf order)."""
        return next(t for t in self._tensors() if t.is_floating_point()).dtype

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device

    def _tensors(self) -> list[Tensor]:
        """The tensors among the pytree leaves, in leaf order (walked directly: ``pytree.tree_leaves``
        costs tens of microseconds a call, and every engine call asks for the dtype and device)."""
        found: list[Tensor] = []
        _collect_tensors(self, found)
        return found

    def dim(self) -> int:
        return len(self.shape)

    def to(self, *args: Any, **kwargs: Any) -> Operator:
        """Move/cast like ``Tensor.to``; integer index tensors keep their dtype."""
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)

        def move(t: Any) -> Any:
            if not isinstance(t, Tensor):
                return t
            cast = dtype if (dtype is not None and t.is_floating_point()) else None
            return t.to(device=device, dtype=cast, non_blocking=non_blocking)

        return pytree.tree_map(move, self)

    def expand(self, *batch_shape: int | torch.Size) -> Operator:
        """The operator broadcast to batch shape ``batch_shape``."""
        if len(batch_shape) == 1 and not isinstance(batch_shape[0], int):
            batch_shape = tuple(batch_shape[0])
        target = torch.Size(batch_shape)
        if torch.broadcast_shapes(target, self.batch_shape) != target:
            raise ValueError(f"batch_shape: cannot expand {tuple(self.batch_shape)} to {tuple(target)}")
        return self._expand(target)

    def _expand(self, batch_shape: torch.Size) -> Operator:
        raise NotImplementedError(f"{type(self).__name__} does not support expand yet")

    # -- structured algebra (owned here) ------------------------------------------------------------
    def _matmul(self, rhs: Tensor) -> Tensor:
        """``self @ rhs`` for ``rhs`` of shape ``(..., n, c)``."""
        raise NotImplementedError

    def diagonal(self) -> Tensor:
        """The diagonal ``(..., n)``."""
        raise NotImplementedError

    def _to_dense(self) -> Tensor:
        raise NotImplementedError

    def _dense_is_symmetric(self) -> bool:
        """Whether ``_to_dense()`` is known to equal its transpose up to rounding (``negligibly_asymmetric``)
        without reading it, so that a factorisation may skip symmetrising it; False when not known."""
        return False

    def _scale(self, c: Tensor) -> Operator:
        """``c * self`` for a non-negative tensor ``c`` of shape ``()`` or ``(...)``."""
        raise NotImplementedError

    def _add_diagonal(self, noise: Operator) -> Operator:
        """``self + noise`` for a diagonal ``noise``; structures that can absorb noise override this."""
        from structgp.covariance.sum import AddedDiagonal

        return AddedDiagonal(self, noise)

    def to_dense(self) -> Tensor:
        """The dense matrix ``(..., n, n)``; refuses sizes above ``settings(dense_limit=...)``."""
        guard_dense(self, "to_dense()")
        return self._to_dense()

    def matmul(self, rhs: Tensor) -> Tensor:
        """``self @ rhs``; ``rhs`` is ``(n,)`` (a vector) or ``(..., n, c)``."""
        if not isinstance(rhs, Tensor):
            raise TypeError(f"rhs: expected a torch.Tensor, got {type(rhs).__name__}")
        if rhs.dim() == 0 or rhs.shape[-2 if rhs.dim() > 1 else -1] != self.n:
            raise ValueError(f"rhs: expected shape (n,) or (..., n, c) with n={self.n}, got {tuple(rhs.shape)}")
        if not rhs.is_floating_point():
            raise TypeError(f"rhs: expected a floating-point tensor of the operator's dtype, got {rhs.dtype}")
        try:
            if rhs.dim() == 1:
                return self._matmul(rhs.unsqueeze(-1)).squeeze(-1)
            return self._matmul(rhs)
        except RuntimeError as err:  # torch's dtype/device message does not say which argument is wrong
            _explain_mismatch(self, rhs, err)
            raise

    def __matmul__(self, rhs: Tensor) -> Tensor:
        if isinstance(rhs, (Operator, LinearMap)):
            from structgp.covariance.linear_map import compose  # an operator or map: a lazy product

            return compose(self, rhs)
        return self.matmul(rhs)

    def __rmatmul__(self, lhs: Tensor) -> Tensor:
        # lhs @ self = (self @ lhs^T)^T since self is symmetric
        if lhs.dim() == 1:
            return self.matmul(lhs)
        return self.matmul(lhs.mT).mT

    def __add__(self, other: Any) -> Operator:
        from structgp.covariance.sum import add

        return add(self, other)

    __radd__ = __add__

    def __mul__(self, c: Any) -> Operator:
        if isinstance(c, Operator):
            return NotImplemented
        c = as_tensor(c, "c (scale)", dtype=self.dtype, device=self.device)
        check_nonnegative(c, "c (scale)")  # 0 * op is the zero matrix: PSD
        return self._scale(c)

    __rmul__ = __mul__

    def __truediv__(self, c: Any) -> Operator:
        c = as_tensor(c, "c (divisor)", dtype=self.dtype, device=self.device)
        check_positive(c, "c (divisor)")
        return self._scale(1.0 / c)

    # -- tensor-like behaviour (structgp.covariance.torch_function, structgp.covariance.indexing) ------
    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        """``torch.*`` functions on operators: structured rules where they exist, else the dense tensor."""
        from structgp.covariance.torch_function import dispatch

        return dispatch(func, args, kwargs or {})

    def __getitem__(self, index: Any) -> Any:
        """``op[index]`` as for a tensor of shape ``op.shape``, keeping structure (see ``indexing``)."""
        from structgp.covariance.indexing import getitem

        return getitem(self, index)

    def __iter__(self):
        """Iterate as over a tensor of shape ``op.shape``: the batch members, or the rows of an unbatched
        operator (its dense matrix, refused above ``settings(dense_limit=...)``)."""
        if self.batch_shape:
            return (self[i] for i in range(self.batch_shape[0]))
        guard_dense(self, "iterating over an operator (list(op), for row in op)")
        return iter(self._to_dense())

    def __len__(self) -> int:
        # also what torch.as_tensor / torch.tensor ask first, so they get this message
        raise TypeError(
            f"{self!r} has no len() and is not a sequence: use op.shape[0], or op.to_dense() for the dense tensor"
        )

    def __bool__(self) -> bool:
        return True  # an object, not a tensor: __len__ must not decide truth

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"np.asarray({self!r}): an operator is not an array; use op.to_dense().numpy()")

    @property
    def mT(self) -> Operator:
        """The transpose of the last two dims: the operator itself (it is symmetric)."""
        return self

    @property
    def T(self) -> Operator:
        """The transpose of an unbatched operator: itself; batched operators have ``.mT``."""
        if self.dim() != 2:
            raise ValueError(f"T: defined for unbatched (n, n) operators, got shape {tuple(self.shape)}; use .mT")
        return self

    # -- questions answered by structgp.inference ---------------------------------------------------
    def solve(self, rhs: Tensor) -> Tensor:
        """``self^{-1} rhs``; ``rhs`` is ``(..., n)`` (vectors, as in ``torch.linalg.solve``) or ``(..., n, c)``."""
        from structgp import inference

        return inference.solve(self, rhs)

    def logdet(self) -> Tensor:
        """``log det self``, shape ``batch_shape``."""
        from structgp import inference

        return inference.logdet(self)

    def inv_quad_logdet(self, rhs: Tensor) -> tuple[Tensor, Tensor]:
        """``(rhs^T self^{-1} rhs, log det self)`` in one pass; ``rhs`` is ``(..., n)``."""
        from structgp import inference

        return inference.inv_quad_logdet(self, rhs)

    def root(self):
        """A structured ``R`` with ``R R^T = self`` (see :mod:`structgp.covariance.root`)."""
        from structgp import inference

        return inference.root(self)

    def __repr__(self) -> str:
        dims = "x".join(str(s) for s in self.shape)
        return f"{type(self).__name__}({dims}, {str(self.dtype).replace('torch.', '')})"


def _collect_tensors(x: Any, found: list[Tensor]) -> None:
    """Append the tensors of ``x`` in the order of ``pytree.tree_leaves``: depth first, children in
    ``_children`` order, list and tuple items in order, ``None`` empty; other containers through pytree."""
    if isinstance(x, Tensor):
        found.append(x)
    elif isinstance(x, PyTreeNode):
        for name in type(x)._children:
            _collect_tensors(getattr(x, name), found)
    elif type(x) in (list, tuple):
        for item in x:
            _collect_tensors(item, found)
    elif x is not None:
        found.extend(leaf for leaf in pytree.tree_leaves(x) if isinstance(leaf, Tensor))


def _explain_mismatch(op: Operator, rhs: Tensor, err: RuntimeError) -> None:
    """Re-raise a failed product as an error naming ``rhs`` when its dtype or device is not the operator's."""
    if rhs.dtype != op.dtype:
        raise TypeError(f"rhs: expected dtype {op.dtype} (the operator's), got {rhs.dtype}") from err
    if rhs.device != op.device:
        raise ValueError(f"rhs: expected device {op.device} (the operator's), got {rhs.device}") from err


def guard_dense(op: Operator, what: str) -> None:
    """Refuse to materialise ``op`` when its dense form would exceed ``settings(dense_limit=...)``."""
    check_dense_size(
        op.shape, op.dtype, f"{what}: the dense form of {op!r}",
        ". Use its structured methods (solve, logdet, root, @) or the iterative engine "
        "(structgp.settings(method='cg')), or raise structgp.settings(dense_limit=...).",
    )


def as_operator(x: Any, name: str) -> Operator:
    """An operator from an operator, a dense SPD tensor ``(..., n, n)`` or a linear_operator
    ``LinearOperator`` (gpytorch's lazy covariances; see ``covariance.from_linear_operator``)."""
    if isinstance(x, Operator):
        return x
    if isinstance(x, Tensor):
        from structgp.covariance.dense import Dense

        return Dense(x, name=name)
    from structgp.covariance import from_linear_operator as lo

    if lo.is_linear_operator(x):
        return lo.from_linear_operator(x, name)
    raise TypeError(
        f"{name}: expected a structgp operator, a torch.Tensor or a linear_operator LinearOperator, got "
        f"{type(x).__name__}"
    )
