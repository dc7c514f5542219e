"""structgp operators as ``linear_operator.LinearOperator``\\ s, so gpytorch (and botorch) use structgp's
exact structured algebra.

``as_linear_operator(op)`` wraps an operator; the wrapper's tensors (the ``LinearOperator`` representation)
are the operator's tensor pytree leaves, so linear_operator can rebuild it inside its autograd functions and
gradients reach every tensor the operator was built from. Leaves that are not tensors (``None`` for the
permutation of a ``BlockDiag`` in natural order) stay in the layout that rebuilds the operator; ``dtype`` is
that of the floating tensors and ``.to(dtype)`` casts only those (a lift's integer indices stay integers).

``inv_quad_logdet``, ``inv_quad``, ``logdet``, ``solve`` and ``_solve`` go to structgp's dispatcher
(``structgp.plan``), ``root_decomposition`` to the structured ``op.root()``, ``diagonalization``/``eigh`` to
structgp's exact eigendecomposition, ``cholesky`` to a factor computed from the structure
(``integrations.cholesky_factor``), and ``+`` a diagonal / ``add_diagonal`` / ``add_jitter`` / positive
scaling keep the structure. Other linear_operator methods use their generic implementations through
``_matmul``.

``cholesky`` matters under botorch: ``import botorch`` turns gpytorch's ``fast_computations.log_prob`` off,
and gpytorch's ``MultivariateNormal.log_prob`` then runs torch's dense ``log_prob``, whose only question to
the covariance is ``cholesky()`` (read as a dense ``scale_tril``). ``MultivariateNormal.to_gpytorch()``
(``StructuredMultivariateNormal``) keeps the exact structured ``inv_quad_logdet`` path in any setting.

The wrapper holds the operator unbroadcast together with the batch shape it stands for, so expanding or
repeating a batch (as gpytorch's ``MultivariateNormal.log_prob`` does for sample dimensions) shares one
factorisation. Batch indexing inside the operator's own batch dimensions uses structgp's structured
indexing; permuting and unsqueezing them have no structured form and materialise the matrix (guarded by
``settings(dense_limit=...)``).

Importing this module imports gpytorch/linear_operator only; it changes none of their settings.
"""

from __future__ import annotations

import math
import warnings

import gpytorch
import torch
from linear_operator.operators import (
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    RootLinearOperator,
    TriangularLinearOperator,
)
from linear_operator.utils.generic import _to_helper
from linear_operator.utils.memoize import cached
from torch import Tensor

from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.indexing import DenseIndexWarning
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator, as_operator
from structgp.inference.eigsh import eigsh, eigvalsh
from structgp.integrations.cholesky_factor import cholesky_factor
from structgp.integrations.tensor_layout import TensorLayout, flatten, floating_dtype, moved

__all__ = [
    "StructuredLinearOperator",
    "StructuredMultivariateNormal",
    "StructuredRootLinearOperator",
    "as_linear_operator",
    "structured_multivariate_normal",
]


def as_linear_operator(op: Operator | Tensor, batch_shape: torch.Size | tuple[int, ...] | None = None):
    """``op`` as a :class:`StructuredLinearOperator` of shape ``(*batch_shape, n, n)``.

    op: a structgp operator (or an SPD tensor, wrapped in ``Dense``); batch_shape: the batch the wrapper
    stands for (default ``op.batch_shape``); ``op`` is broadcast to it lazily.
    """
    op = as_operator(op, "op")
    batch = op.batch_shape if batch_shape is None else torch.Size(batch_shape)
    _check_broadcast(op.batch_shape, batch, "batch_shape")
    tensors, layout = flatten(op)
    return StructuredLinearOperator(*tensors, spec=layout, batch=batch)


class _PyTreeLinearOperator(LinearOperator):
    """A ``LinearOperator`` whose positional tensors are a structgp pytree's tensor leaves.

    ``dtype`` is that of the floating tensors (linear_operator's default reads the first tensor, which can
    be an integer index) and ``.to(...)`` casts only floating tensors (index tensors keep their dtype).
    """

    @property
    def dtype(self) -> torch.dtype:
        return floating_dtype(self._args)

    @property
    def device(self) -> torch.device:
        return self._args[0].device

    def to(self, *args, **kwargs) -> LinearOperator:
        device, dtype = _to_helper(*args, **kwargs)
        return self.__class__(*moved(self._args, device, dtype), **self._kwargs)


class StructuredLinearOperator(_PyTreeLinearOperator):
    """A structgp operator ``(*batch, n, n)`` as a ``LinearOperator`` (build it with ``as_linear_operator``).

    ``leaves`` are the operator's tensors (its tensor pytree leaves, rebuilt with the layout ``spec``);
    ``batch`` is the batch shape represented, to which the operator's own batch broadcasts.
    """

    def __init__(self, *leaves: Tensor, spec: TensorLayout, batch: torch.Size) -> None:
        super().__init__(*leaves, spec=spec, batch=batch)
        self.operator = spec.unflatten(leaves)
        self._batch = torch.Size(batch)

    def _with_batch(self, batch: torch.Size) -> StructuredLinearOperator:
        _check_broadcast(self.operator.batch_shape, batch, "batch_shape")
        return StructuredLinearOperator(*self._args, spec=self._kwargs["spec"], batch=batch)

    # -- the LinearOperator protocol -----------------------------------------------------------------
    def _size(self) -> torch.Size:
        return self._batch + self.operator.shape[-2:]

    def _transpose_nonbatch(self) -> StructuredLinearOperator:
        return self  # symmetric

    def _matmul(self, rhs: Tensor) -> Tensor:
        return _expand_lead(self.operator._matmul(rhs), self._batch, 2)

    def _diagonal(self) -> Tensor:
        return self.operator.diagonal().expand(*self._batch, self.operator.n)

    def _expand_batch(self, batch_shape) -> StructuredLinearOperator:
        return self._with_batch(torch.Size(batch_shape))

    def repeat(self, *sizes) -> LinearOperator:
        if len(sizes) >= 3 and tuple(sizes[-2:]) == (1, 1):
            reps = sizes[:-2]
            current = (1,) * (len(reps) - len(self._batch)) + tuple(self._batch)
            if len(reps) >= len(self._batch) and all(r == 1 or c == 1 for r, c in zip(reps, current)):
                return self._with_batch(torch.Size(r * c for r, c in zip(reps, current)))
        return super().repeat(*sizes)

    def _unsqueeze_batch(self, dim: int) -> LinearOperator:
        # dims in front of the operator's own batch dims are free; the others have no structured form
        if dim <= len(self._batch) - len(self.operator.batch_shape):
            return self._with_batch(self._batch[:dim] + (1,) + self._batch[dim:])
        return self._densified().unsqueeze(dim)

    def _permute_batch(self, *dims: int) -> LinearOperator:
        if len(self.operator.batch_shape) == 0:
            return self._with_batch(torch.Size(self._batch[d] for d in dims))
        return self._densified()._permute_batch(*dims)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        noop = slice(None, None, None)
        if _is_noop(row_index) and _is_noop(col_index) and batch_indices:
            if len(self.operator.batch_shape) == 0:
                batch = torch.empty(self._batch, device="meta")[batch_indices].shape
                return self._with_batch(batch)
            indexed = self._structured_batch_index(batch_indices)
            if indexed is not None:
                return indexed
            return self._densified()._getitem(noop, noop, *batch_indices)
        return super()._getitem(row_index, col_index, *batch_indices)

    def _structured_batch_index(self, batch_indices: tuple) -> StructuredLinearOperator | None:
        """Batch indexing inside the operator's own batch dims by structgp's structured indexing (the
        operator's tensors are indexed; the structure is kept), or None where it has no structured rule."""
        noop = slice(None, None, None)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DenseIndexWarning)  # a dense fallback: linear_operator's own path
            try:
                indexed = self.operator.expand(self._batch)[(*batch_indices, noop, noop)]
            except DenseIndexWarning:
                return None
        return as_linear_operator(indexed) if isinstance(indexed, Operator) else None

    def to_dense(self) -> Tensor:
        return self.operator.to_dense().expand(*self._size())

    # -- exact structured answers --------------------------------------------------------------------
    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool | None = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor, Tensor]:
        """``(rhs^T A^{-1} rhs (summed over columns when reduce_inv_quad), log det A)`` through structgp.

        inv_quad_rhs: ``(..., n, m)`` or ``(n,)``. An absent term is returned as ``zeros(())``.
        """
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        if inv_quad_rhs is None:
            if not logdet:
                raise RuntimeError("Either `inv_quad_rhs` or `logdet` must be specified.")
            return zero, self.logdet()
        vector = inv_quad_rhs.dim() == 1
        rhs = inv_quad_rhs.unsqueeze(-1) if vector else inv_quad_rhs
        if rhs.shape[-2] != self.operator.n:
            n = self.operator.n
            raise RuntimeError(f"inv_quad_rhs: expected shape (..., {n}, m), got {tuple(rhs.shape)}")
        # the columns become leading vectors (m, *batch, n): the dispatcher folds them into one factorisation
        rhs = _with_operator_batch(rhs, self.operator)
        inv_quad, logdet_term = self.operator.inv_quad_logdet(rhs.movedim(-1, 0))
        inv_quad = _expand_lead(inv_quad.movedim(0, -1), self._batch, 1)
        if vector:
            inv_quad = inv_quad.squeeze(-1)
        elif reduce_inv_quad:
            inv_quad = inv_quad.sum(-1)
        return inv_quad, (logdet_term.expand(self._batch) if logdet else zero)

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def logdet(self) -> Tensor:
        return self.operator.logdet().expand(self._batch)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``A^{-1} R`` (or ``L A^{-1} R``) through structgp; ``R`` is ``(..., n, p)`` or ``(n,)``."""
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        out = _expand_lead(self.operator.solve(_with_operator_batch(rhs, self.operator)), self._batch, 2)
        out = out.squeeze(-1) if vector else out
        return out if left_tensor is None else left_tensor @ out

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int | None = 0):
        if num_tridiag:  # Lanczos tridiagonal matrices only come from CG; keep linear_operator's path
            return super()._solve(rhs, preconditioner, num_tridiag)
        return _expand_lead(self.operator.solve(_with_operator_batch(rhs, self.operator)), self._batch, 2)

    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        """``R R^T`` with structgp's structured root ``R`` ``(..., n, k)`` when ``k <= n``.

        gpytorch draws ``n`` base samples per draw (``rsample(base_samples=...)``), so a wider root (a sum's
        side-by-side root) is replaced by the dense Cholesky factor. A named ``method`` is linear_operator's.
        """
        if method is not None:
            return super().root_decomposition(method=method)
        root = self.operator.root()
        if root.shape[-1] <= self.operator.n:
            tensors, layout = flatten(root)
            return RootLinearOperator(StructuredRootLinearOperator(*tensors, spec=layout, batch=self._batch))
        return RootLinearOperator(self._cholesky())

    @cached(name="cholesky")  # as linear_operator's own: one factor per wrapper (and triangle)
    def _cholesky(self, upper: bool | None = False) -> TriangularLinearOperator:
        factor = cholesky_factor(self.operator).expand(*self._size())
        return TriangularLinearOperator(factor.mT if upper else factor, upper=bool(upper))

    def _symeig(
        self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False
    ) -> tuple[Tensor, LinearOperator | None]:
        """The eigenvalues (ascending) and, when asked, eigenvectors from structgp's eigendecomposition:
        exact from the structure where a rule exists (Kronecker, diagonal, low rank + ``s I``), else dense."""
        op = self.operator
        if not eigenvectors:
            return _expand_lead(eigvalsh(op), self._batch, 1), None
        values, vectors = eigsh(op, op.n, largest=False)
        return _expand_lead(values, self._batch, 1), DenseLinearOperator(_expand_lead(vectors, self._batch, 2))

    def diagonalization(self, method: str | None = None) -> tuple[Tensor, LinearOperator | None]:
        """``(eigenvalues, eigenvectors)`` exactly (see ``_symeig``), not by Lanczos; a named ``method`` is
        linear_operator's."""
        if method is not None:
            return super().diagonalization(method=method)
        return self._symeig(eigenvectors=True)

    # -- structure-keeping arithmetic ----------------------------------------------------------------
    def add_diagonal(self, diag: Tensor) -> LinearOperator:
        noise = _diagonal_operator(diag, self.operator)
        if noise is None:
            return super().add_diagonal(diag)
        return as_linear_operator(self.operator + noise, _broadcast(self._batch, noise.batch_shape))

    def __add__(self, other):
        if isinstance(other, StructuredLinearOperator):
            total = self.operator + other.operator
            return as_linear_operator(total, _broadcast(self._batch, other._batch))
        if isinstance(other, ConstantDiagLinearOperator):
            noise = _diagonal_operator(other.diag_values, self.operator)
        elif isinstance(other, DiagLinearOperator):
            noise = _diagonal_operator(other._diag, self.operator)
        else:
            noise = None
        if noise is None:
            return super().__add__(other)
        return as_linear_operator(self.operator + noise, _broadcast(self._batch, other.batch_shape))

    def _mul_constant(self, other) -> LinearOperator:
        c = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if c.dim() == 0 and _all_positive(c):
            return as_linear_operator(self.operator * c, self._batch)
        return super()._mul_constant(other)

    def _densified(self) -> LinearOperator:
        return DenseLinearOperator(self.to_dense())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.operator!r}, batch={tuple(self._batch)})"


class StructuredRootLinearOperator(_PyTreeLinearOperator):
    """A structgp root ``R`` ``(*batch, n, k)`` (or ``R^T`` when ``transposed``) as a ``LinearOperator``."""

    def __init__(self, *leaves: Tensor, spec: TensorLayout, batch: torch.Size, transposed: bool = False) -> None:
        super().__init__(*leaves, spec=spec, batch=batch, transposed=transposed)
        self.root: LinearMap = spec.unflatten(leaves)
        self._batch = torch.Size(batch)
        self._transposed = transposed

    def _size(self) -> torch.Size:
        n, k = self.root.shape[-2:]
        return self._batch + ((k, n) if self._transposed else (n, k))

    def _matmul(self, rhs: Tensor) -> Tensor:
        out = self.root.tmatmul(rhs) if self._transposed else self.root._matmul(rhs)
        return _expand_lead(out, self._batch, 2)

    def _transpose_nonbatch(self) -> StructuredRootLinearOperator:
        return StructuredRootLinearOperator(
            *self._args, spec=self._kwargs["spec"], batch=self._batch, transposed=not self._transposed
        )

    def _expand_batch(self, batch_shape) -> StructuredRootLinearOperator:
        batch = torch.Size(batch_shape)
        _check_broadcast(self.root.batch_shape, batch, "batch_shape")
        return StructuredRootLinearOperator(
            *self._args, spec=self._kwargs["spec"], batch=batch, transposed=self._transposed
        )

    def to_dense(self) -> Tensor:
        dense = self.root.to_dense()
        return (dense.mT if self._transposed else dense).expand(*self._size())


# -- helpers -------------------------------------------------------------------------------------------
def _check_broadcast(inner: torch.Size, batch: torch.Size, name: str) -> None:
    try:
        ok = torch.broadcast_shapes(inner, batch) == batch
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{name}: the operator's batch {tuple(inner)} does not broadcast to {tuple(batch)}")


def _broadcast(a: torch.Size, b: torch.Size) -> torch.Size:
    return torch.broadcast_shapes(a, b)


def _expand_lead(t: Tensor, batch: torch.Size, trailing: int) -> Tensor:
    """``t`` ``(*b, *trail)`` expanded to ``(*broadcast(b, batch), *trail)``."""
    lead = _broadcast(t.shape[: t.dim() - trailing], batch)
    return t.expand(*lead, *t.shape[t.dim() - trailing :])


def _with_operator_batch(rhs: Tensor, op: Operator) -> Tensor:
    """``rhs`` ``(..., n, m)`` expanded (a view) to at least the operator's batch dims, so that structgp's
    dispatcher reads it as columns, never as a batch of vectors."""
    return rhs.expand(*_broadcast(rhs.shape[:-2], op.batch_shape), *rhs.shape[-2:])


def _is_noop(index) -> bool:
    return isinstance(index, slice) and index == slice(None, None, None)


def _all_positive(t: Tensor) -> bool:
    try:
        return bool(torch.isfinite(t).all() and (t > 0).all())
    except RuntimeError:  # a transform that refuses host reads
        return False


def _diagonal_operator(diag: Tensor, op: Operator) -> Operator | None:
    """``diag(d)`` as a structgp noise operator for ``d`` ``(..., n)``, ``(..., 1)`` or ``()``, or None when
    it is not strictly positive (linear_operator's generic sum then takes over)."""
    if not isinstance(diag, Tensor) or not diag.is_floating_point() or not _all_positive(diag):
        return None
    diag = diag.to(dtype=op.dtype, device=op.device)
    if diag.dim() == 0 or diag.shape[-1] == 1:
        scale = diag if diag.dim() == 0 else diag.squeeze(-1)
        return ScaledIdentity(scale, op.n)
    if diag.shape[-1] != op.n:
        return None
    return Diagonal(diag)


class StructuredMultivariateNormal(gpytorch.distributions.MultivariateNormal):
    """A gpytorch ``MultivariateNormal`` whose ``log_prob`` always takes structgp's exact structured path.

    gpytorch's own ``log_prob`` densifies when ``fast_computations.log_prob`` is off, which importing
    botorch switches globally; this subclass ignores that flag (the value is exact either way).
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        diff = value - self.loc
        cov = self.lazy_covariance_matrix
        batch = torch.broadcast_shapes(diff.shape[:-1], cov.batch_shape)
        inv_quad, logdet = cov.expand(*batch, *cov.shape[-2:]).inv_quad_logdet(
            inv_quad_rhs=diff.expand(*batch, diff.shape[-1]).unsqueeze(-1), logdet=True
        )
        return -0.5 * (inv_quad + logdet + diff.shape[-1] * math.log(2 * math.pi))


def structured_multivariate_normal(loc: Tensor, covariance: StructuredLinearOperator) -> StructuredMultivariateNormal:
    """``StructuredMultivariateNormal(loc, covariance)``."""
    return StructuredMultivariateNormal(loc, covariance)
