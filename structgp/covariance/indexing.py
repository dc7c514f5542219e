"""``op[index]``: indexing that keeps structure and never materialises the operator.

An index is read as torch reads it for a tensor of shape ``op.shape`` (``(..., n, n)``), and answered by
per-type rules (``functools.singledispatch``):

- batch dims only (``op[0]``, ``op[1:3]``, ``op[idx]``): :func:`batch_getitem` indexes the operator's
  tensors; the result has the same structure.
- a principal submatrix (the same rows and columns, ``op[..., s, s]``): :func:`principal`, a covariance
  again: ``Dense``/``Diagonal``/``LowRank`` index their tensors, a ``Kronecker`` grid slice stays Kronecker,
  a contiguous range of a ``BlockDiag`` stays block diagonal, a ``SparseLifted`` keeps its base and selects
  rows of its lift, a ``Permuted`` takes its base's submatrix on the permuted rows, sums are taken term by
  term (noise stays noise); anything else becomes ``SparseLifted(S, op)`` with the selection ``S`` (lifted,
  never dense).
- other submatrices (``op[..., rows, cols]``, rows != cols): :func:`submatrix`, a general linear map
  (:mod:`structgp.covariance.linear_map`), not a covariance: ``S_r A S_c^T`` as a lazy product, with
  structured factors where the structure allows (``W_r W_c^T`` for LowRank, ``L_r B L_c^T`` for SparseLifted).
- entries (``op[..., i, j]`` with ints or index tensors, broadcast as torch does): :func:`entries`, a
  gather from the structure (a Kronecker entry is a product of factor entries, a SparseLifted entry sums
  ``v_a v_b B[c_a, c_b]`` over the stored entries of rows ``i`` and ``j``).
- a row or column (``op[..., i, :]``): entries of that row.

Index tensors in both batch and matrix dims at once, multi-dimensional boolean masks and ``None`` are not
structured: they fall back to indexing the dense matrix (guarded by ``settings(dense_limit=...)``, warned).

Every rule of these tables is registered in this module, so each table is complete once it is imported.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from torch import Tensor

from structgp.covariance.block_diag import BlockDiag
from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.kernel_operator import KernelOperator, evaluate_kernel
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.linear_map import DenseMap, OperatorMap, Product, Selection, SparseMap
from structgp.covariance.low_rank import LowRank
from structgp.covariance.map import LinearMap
from structgp.covariance.operator import Operator, guard_dense
from structgp.covariance.permuted import Permuted
from structgp.covariance.sparse_lifted import Lift, SparseLifted
from structgp.covariance.sum import AddedDiagonal, Sum, add
from structgp.covariance.validation import value_checks_enabled

Rows = range | Tensor  # a selection of rows: a range (from a slice) or a 1-D int64 tensor


class DenseIndexWarning(UserWarning):
    """An index without a structured rule was answered by indexing the dense matrix."""


# -- the entry point ----------------------------------------------------------------------------------
@functools.singledispatch
def getitem(op: Operator, index: Any) -> Operator | LinearMap | Tensor:
    """``op[index]`` with torch's indexing semantics; structured results where a rule exists (see module)."""
    full = _normalise(op, index)
    if full is None:
        return _dense_getitem(op, index, "this index (None, or a multi-dimensional boolean mask)")
    shape = op.shape
    batch_idx, r, c = full[:-2], full[-2], full[-1]
    batch_advanced = any(isinstance(i, Tensor) for i in batch_idx)
    if batch_advanced and (isinstance(r, Tensor) or isinstance(c, Tensor)):
        return _dense_getitem(op, index, "index tensors in both batch and matrix dims")
    if any(not (isinstance(i, slice) and i == slice(None)) for i in batch_idx):
        op = batch_getitem(op._expand(op.batch_shape), batch_idx)
    out = _matrix_getitem(op, r, c)
    if out is None:
        return _dense_getitem(op, (..., r, c), "a slice combined with a multi-dimensional index tensor")
    _check_shape(out, shape, full)
    return out


def _matrix_getitem(op: Operator, r: Any, c: Any) -> Operator | LinearMap | Tensor | None:
    n = op.n
    if isinstance(r, slice) and isinstance(c, slice):
        rows, cols = range(n)[r], range(n)[c]
        if rows == cols:
            return op if rows == range(n) else principal(op, rows)
        return submatrix(op, rows, cols)
    if isinstance(r, (int, Tensor)) and isinstance(c, (int, Tensor)):
        i, j = (torch.as_tensor(x, device=op.device) for x in (r, c))
        i, j = torch.broadcast_tensors(i, j)
        if i.dim() == 2 and i.shape[1] > 0 and _outer(i, j):  # op[..., rows[:, None], cols[None, :]]
            rows, cols = i[:, 0], j[0, :]
            if _same(rows, cols):
                return principal(op, rows)
            return submatrix(op, rows, cols)
        return entries(op, i.reshape(-1), j.reshape(-1)).reshape((*op.batch_shape, *i.shape))
    if isinstance(r, int) or isinstance(c, int):  # a row (or, by symmetry, a column) restricted to a selection
        fixed, other = (r, c) if isinstance(r, int) else (c, r)
        if isinstance(other, Tensor) and other.dim() != 1:
            return None
        picked = _as_index(range(n)[other] if isinstance(other, slice) else other, op.device)
        return entries(op, torch.full_like(picked, fixed), picked)
    # a slice and a 1-D index tensor: a submatrix
    if (isinstance(r, Tensor) and r.dim() != 1) or (isinstance(c, Tensor) and c.dim() != 1):
        return None
    rows = range(n)[r] if isinstance(r, slice) else r
    cols = range(n)[c] if isinstance(c, slice) else c
    if _same(rows, cols):
        return principal(op, rows)
    return submatrix(op, rows, cols)


# -- index normalisation ------------------------------------------------------------------------------
def _normalise(op: Operator, index: Any) -> tuple | None:
    """The index as one entry per dim of ``op.shape`` (ints, slices, int64 tensors), or None if unsupported."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(i is None for i in items):
        return None
    items = [_as_item(i, op.device) for i in items]
    if any(isinstance(i, Tensor) and i.dtype == torch.bool and i.dim() != 1 for i in items):
        return None  # a multi-dimensional mask
    ellipses = sum(1 for i in items if i is Ellipsis)
    if ellipses > 1:
        raise IndexError("an index can only have a single ellipsis ('...')")
    ndim = op.dim()
    if len(items) - ellipses > ndim:
        raise IndexError(f"too many indices for an operator of shape {tuple(op.shape)}: got {len(items) - ellipses}")
    if ellipses:
        at = next(k for k, i in enumerate(items) if i is Ellipsis)
        items[at : at + 1] = [slice(None)] * (ndim - len(items) + 1)
    items += [slice(None)] * (ndim - len(items))
    return tuple(_bound(i, size, d) for d, (i, size) in enumerate(zip(items, op.shape)))


def _as_item(i: Any, device: torch.device) -> Any:
    if i is Ellipsis or isinstance(i, slice):
        return i
    if isinstance(i, bool):
        raise IndexError("a Python bool index is not supported on an operator")
    if isinstance(i, int):
        return i
    if isinstance(i, (list, tuple)):
        i = torch.as_tensor(i, device=device)
    if isinstance(i, Tensor):
        if i.dtype == torch.bool:
            return i
        if i.is_floating_point() or i.is_complex():
            raise IndexError(f"index tensors must be integer or boolean, got {i.dtype}")
        return i.to(torch.int64) if i.dim() else int(i)
    raise IndexError(f"unsupported index of type {type(i).__name__}")


def _bound(i: Any, size: int, dim: int) -> Any:
    """Negative positions wrapped and range-checked (ints always, tensors where values may be read)."""
    if isinstance(i, int):
        if not -size <= i < size:
            raise IndexError(f"index {i} is out of bounds for dim {dim} of size {size}")
        return i % size
    if isinstance(i, Tensor) and i.dtype == torch.bool:  # a mask along this dim
        if i.shape[0] != size:
            raise IndexError(f"a boolean mask of length {i.shape[0]} does not match dim {dim} of size {size}")
        return i.nonzero().squeeze(-1)
    if isinstance(i, Tensor):
        if value_checks_enabled(i) and i.numel() and bool(((i < -size) | (i >= size)).any()):
            raise IndexError(f"index tensor out of bounds for dim {dim} of size {size}")
        return torch.where(i < 0, i + size, i)
    return i


def _as_index(rows: Rows, device: torch.device) -> Tensor:
    if isinstance(rows, range):
        return torch.arange(rows.start, rows.stop, rows.step, device=device)
    return rows


def _same(rows: Rows, cols: Rows) -> bool:
    """Whether two selections are equal (principal); unknown (under vmap/compile) counts as different."""
    if isinstance(rows, range) and isinstance(cols, range):
        return rows == cols
    a, b = _as_index(rows, _device(rows, cols)), _as_index(cols, _device(rows, cols))
    if a.shape != b.shape or not value_checks_enabled(a) or not value_checks_enabled(b):
        return False
    return bool(torch.equal(a, b))


def _device(*sels: Rows) -> torch.device | None:
    return next((s.device for s in sels if isinstance(s, Tensor)), None)


def _outer(i: Tensor, j: Tensor) -> bool:
    """Whether broadcast ``(k, l)`` index tensors are an outer grid ``i[a, b] = r_a``, ``j[a, b] = c_b``."""
    if not (value_checks_enabled(i) and value_checks_enabled(j)):
        return False
    return bool((i == i[:, :1]).all()) and bool((j == j[:1, :]).all())


def _check_shape(out: Any, shape: torch.Size, full: tuple) -> None:
    """The result has the shape torch gives a tensor of ``shape`` indexed by ``full`` (computed on 'meta')."""
    meta = torch.empty(shape, device="meta")
    want = meta[tuple(i.to("meta") if isinstance(i, Tensor) else i for i in full)].shape
    if tuple(out.shape) != tuple(want):
        raise AssertionError(f"internal indexing error: result shape {tuple(out.shape)}, torch gives {tuple(want)}")


def _dense_getitem(op: Operator, index: Any, why: str) -> Tensor:
    guard_dense(op, f"op[...] with {why}")
    warnings.warn(
        f"indexing {op!r} with {why} has no structured rule: indexing its dense matrix", DenseIndexWarning, stacklevel=4
    )
    return op.to_dense()[index]


# -- batch indexing -----------------------------------------------------------------------------------
@functools.singledispatch
def batch_getitem(op: Operator, idx: tuple) -> Operator:
    """``op`` indexed in its batch dims by ``idx`` (one entry per batch dim; ``op`` expanded to its batch
    shape), same structure. Operators without a rule are indexed densely (warned)."""
    guard_dense(op, "batch indexing")
    warnings.warn(f"{type(op).__name__} has no batch-indexing rule: indexing its dense matrix", DenseIndexWarning, 3)
    return Dense(op.to_dense()[idx + (slice(None), slice(None))])


def _index(t: Tensor, idx: tuple, trailing: int) -> Tensor:
    return t[idx + (slice(None),) * trailing]


@batch_getitem.register
def _(op: Dense, idx: tuple) -> Operator:
    return op._replace(matrix=_index(op.matrix, idx, 2))


@batch_getitem.register
def _(op: Diagonal, idx: tuple) -> Operator:
    return op._replace(diag=_index(op.diag, idx, 1))


@batch_getitem.register
def _(op: ScaledIdentity, idx: tuple) -> Operator:
    return op._replace(scale=_index(op.scale, idx, 0))


@batch_getitem.register
def _(op: LowRank, idx: tuple) -> Operator:
    return op._replace(factor=_index(op.factor, idx, 2))


@batch_getitem.register
def _(op: Kronecker, idx: tuple) -> Operator:
    return op._replace(factors=[batch_getitem(f._expand(op.batch_shape), idx) for f in op.factors])


@batch_getitem.register
def _(op: AddedDiagonal, idx: tuple) -> Operator:
    base, noise = op.base._expand(op.batch_shape), op.noise._expand(op.batch_shape)
    return op._replace(base=batch_getitem(base, idx), noise=batch_getitem(noise, idx))


@batch_getitem.register
def _(op: Sum, idx: tuple) -> Operator:
    return op._replace(terms=[batch_getitem(t._expand(op.batch_shape), idx) for t in op.terms])


# -- principal submatrices (covariances) --------------------------------------------------------------
@functools.singledispatch
def principal(op: Operator, rows: Rows) -> Operator:
    """``S op S^T`` for the selection ``S`` of ``rows``: a covariance. Without a structured rule it is
    ``SparseLifted(S, op)``: lifted, never dense."""
    return _lifted(op, rows)


def _lifted(op: Operator, rows: Rows) -> Operator:
    return SparseLifted(selection_matrix(rows, op.n, op.dtype, op.device), op)


def selection_matrix(rows: Rows, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The sparse COO selection ``S`` ``(k, n)`` with ``S[a, rows[a]] = 1``."""
    idx = _as_index(rows, device)
    k = idx.shape[0]
    indices = torch.stack([torch.arange(k, device=device), idx])
    values = torch.ones(k, dtype=dtype, device=device)
    return torch.sparse_coo_tensor(indices, values, (k, n), is_coalesced=True, check_invariants=False)


@principal.register
def _(op: Dense, rows: Rows) -> Operator:
    idx = _as_index(rows, op.device)
    return op._replace(matrix=op.matrix.index_select(-2, idx).index_select(-1, idx))


@principal.register
def _(op: Diagonal, rows: Rows) -> Operator:
    return op._replace(diag=op.diag.index_select(-1, _as_index(rows, op.device)))


@principal.register
def _(op: ScaledIdentity, rows: Rows) -> Operator:
    if len(rows) == 0:
        raise IndexError("an empty principal submatrix has no operator")
    return op._replace(size=len(rows))


@principal.register
def _(op: LowRank, rows: Rows) -> Operator:
    return op._replace(factor=op.factor.index_select(-2, _as_index(rows, op.device)))


@principal.register
def _(op: AddedDiagonal, rows: Rows) -> Operator:
    return add(principal(op.base, rows), principal(op.noise, rows))


@principal.register
def _(op: Sum, rows: Rows) -> Operator:
    out = principal(op.terms[0], rows)
    for t in op.terms[1:]:
        out = add(out, principal(t, rows))
    return out


@principal.register
def _(op: Kronecker, rows: Rows) -> Operator:
    if op.is_diagonal:
        return Diagonal(op.diagonal().index_select(-1, _as_index(rows, op.device)))
    if isinstance(rows, range) and rows.step == 1 and len(rows) > 0:
        factors = _kron_range(op.factors, rows.start, rows.stop)
        if factors is not None:
            return Kronecker(*factors)
    return _lifted(op, rows)


def _kron_range(factors: list[Operator], start: int, stop: int) -> list[Operator] | None:
    """Factors of the principal block ``[start, stop)`` of ``K_1 (x) K_2 (x) ...`` when it is itself a
    Kronecker product: a range of the first factor's index times whole trailing factors, or one index of
    the first factor times a Kronecker range of the rest (row-major, the last factor fastest)."""
    first, rest = factors[0], factors[1:]
    stride = 1
    for f in rest:
        stride *= f.n
    if start % stride == 0 and stop % stride == 0:
        return [principal(first, range(start // stride, stop // stride)), *rest]
    i = start // stride
    if rest and (stop - 1) // stride == i:
        inner = _kron_range(rest, start - i * stride, stop - i * stride)
        if inner is not None:
            return [principal(first, range(i, i + 1)), *inner]
    return None


# -- general submatrices (linear maps) ----------------------------------------------------------------
@functools.singledispatch
def submatrix(op: Operator, rows: Rows, cols: Rows) -> LinearMap:
    """``S_r op S_c^T`` ``(..., k, l)``, a general (non-symmetric) map: a lazy product of the selections and
    the operator unless the structure gives a better one."""
    n, dtype = op.n, op.dtype
    left = Selection(_as_index(rows, op.device), n, dtype=dtype)
    right = Selection(_as_index(cols, op.device), n, dtype=dtype)
    return Product(left, OperatorMap(op), right.mT)


@submatrix.register
def _(op: Dense, rows: Rows, cols: Rows) -> LinearMap:
    m = op.matrix.index_select(-2, _as_index(rows, op.device)).index_select(-1, _as_index(cols, op.device))
    return DenseMap(m)


@submatrix.register
def _(op: LowRank, rows: Rows, cols: Rows) -> LinearMap:
    w = op.factor
    return Product(DenseMap(w.index_select(-2, _as_index(rows, op.device))),
                   DenseMap(w.index_select(-2, _as_index(cols, op.device)).mT))


# -- entries ------------------------------------------------------------------------------------------
@functools.singledispatch
def entries(op: Operator, i: Tensor, j: Tensor) -> Tensor:
    """``op[..., i, j]`` for broadcasting index tensors (e.g. vectors ``(P,)`` -> ``(..., P)``), gathered from
    the structure; operators without a rule are read from their dense matrix (guarded, warned)."""
    guard_dense(op, "entries")
    warnings.warn(f"{type(op).__name__} has no entry rule: gathering from its dense matrix", DenseIndexWarning, 3)
    return op.to_dense()[..., i, j]


@entries.register
def _(op: Dense, i: Tensor, j: Tensor) -> Tensor:
    return op.matrix[..., i, j]


@entries.register
def _(op: Diagonal, i: Tensor, j: Tensor) -> Tensor:
    d = op.diag[..., i]
    return torch.where(i == j, d, torch.zeros_like(d))


@entries.register
def _(op: ScaledIdentity, i: Tensor, j: Tensor) -> Tensor:
    s = op.scale.reshape(*op.scale.shape, *(1,) * max(i.dim(), 1))  # batch dims before the index dims
    return torch.where(i == j, s, torch.zeros_like(s))


@entries.register
def _(op: LowRank, i: Tensor, j: Tensor) -> Tensor:
    return (op.factor[..., i, :] * op.factor[..., j, :]).sum(-1)


@entries.register
def _(op: Kronecker, i: Tensor, j: Tensor) -> Tensor:
    out, stride = None, op.n
    for f in op.factors:  # row-major: the last factor varies fastest
        stride //= f.n
        part = entries(f, i // stride % f.n, j // stride % f.n)
        out = part if out is None else out * part
    return out


@entries.register
def _(op: KernelOperator, i: Tensor, j: Tensor) -> Tensor:
    if i.dim() == 2 and i.shape[-1] == 1 and j.dim() == 1:  # a block (m, 1) x (k,): k(x[i], x[j]), O(m k)
        block = evaluate_kernel(op.kernel, op.names, op.params, op.x[..., i[:, 0], :], op.x[..., j, :])
        return op.scale[..., None, None] * block
    # each pair (i, j) evaluated on its own (the kernel's diag mode on the paired inputs): O(pairs x d)
    i, j = torch.broadcast_tensors(i, j)
    x1, x2 = op.x[..., i.reshape(-1), :], op.x[..., j.reshape(-1), :]
    pairs = evaluate_kernel(op.kernel, op.names, op.params, x1, x2, diag=True)
    pairs = op.scale[..., None] * pairs.expand(*op.batch_shape, i.numel())
    return pairs.reshape(*op.batch_shape, *i.shape)


@entries.register
def _(op: AddedDiagonal, i: Tensor, j: Tensor) -> Tensor:
    return entries(op.base, i, j) + entries(op.noise, i, j)


@entries.register
def _(op: Sum, i: Tensor, j: Tensor) -> Tensor:
    return sum(entries(t, i, j) for t in op.terms)


# -- BlockDiag ----------------------------------------------------------------------------------------
@batch_getitem.register
def _(op: BlockDiag, idx: tuple) -> Operator:
    groups = [batch_getitem(g._expand(op.batch_shape + g.batch_shape[-1:]), idx + (slice(None),)) for g in op.groups]
    return op._replace(groups=groups)


@principal.register
def _(op: BlockDiag, rows: Rows) -> Operator:
    if not (isinstance(rows, range) and rows.step == 1 and len(rows) > 0):
        return _lifted(op, rows)
    return _block_range(op, rows.start, rows.stop)


@entries.register
def _(op: BlockDiag, i: Tensor, j: Tensor) -> Tensor:
    group, block, local = _block_tables(op)
    out = None
    for g_id, g in enumerate(op.groups):
        same = (group[i] == g_id) & (group[j] == g_id) & (block[i] == block[j])
        blocks = g._to_dense()  # (..., g, m, m): the data of the group, not an n x n matrix
        vals = blocks[..., block[i].clamp_max(blocks.shape[-3] - 1), local[i].clamp_max(g.n - 1),
                      local[j].clamp_max(g.n - 1)]
        vals = torch.where(same, vals, torch.zeros_like(vals))
        out = vals if out is None else out + vals
    return out


def _block_tables(op: BlockDiag) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of a BlockDiag: its group, its block within the group and its position within the block."""
    n = op.n
    group = torch.empty(n, dtype=torch.int64, device=op.device)
    block = torch.empty_like(group)
    local = torch.empty_like(group)
    for g_id, rows in enumerate(op.group_rows()):
        g, m = rows.shape
        group[rows] = g_id
        block[rows] = torch.arange(g, device=op.device).unsqueeze(-1).expand(g, m)
        local[rows] = torch.arange(m, device=op.device).expand(g, m)
    return group, block, local


def _block_range(op: BlockDiag, start: int, stop: int) -> Operator:
    """The principal block ``[start, stop)`` of a BlockDiag: block diagonal again (partial blocks at the ends
    are trimmed); a block-aligned range of a single uniform group is a view of that group."""
    nb = len(op.batch_shape)
    if len(op.groups) == 1 and op.members is None:
        g = op.groups[0]
        m = g.n
        if start % m == 0 and stop % m == 0:
            part = batch_getitem(g._expand(op.batch_shape + g.batch_shape[-1:]),
                                 (slice(None),) * nb + (slice(start // m, stop // m),))
            return BlockDiag(part)
    pieces, offset = [], 0
    where = {b: (g_id, k) for g_id, members in enumerate(op.group_blocks()) for k, b in enumerate(members)}
    for b in range(op.num_blocks):
        g_id, k = where[b]
        g = op.groups[g_id]
        lo, hi = max(start, offset), min(stop, offset + g.n)
        if lo < hi:
            block = batch_getitem(g._expand(op.batch_shape + g.batch_shape[-1:]), (slice(None),) * nb + (k,))
            if hi - lo < g.n:
                block = principal(block, range(lo - offset, hi - offset))
            pieces.append(block)
        offset += g.n
    return BlockDiag(pieces)


# -- SparseLifted -------------------------------------------------------------------------------------
@batch_getitem.register
def _(op: SparseLifted, idx: tuple) -> Operator:
    return op._replace(base=batch_getitem(op.base._expand(op.batch_shape), idx))


@principal.register
def _(op: SparseLifted, rows: Rows) -> Operator:
    return op._replace(lift=lift_rows(op.lift, _as_index(rows, op.device)))


@submatrix.register
def _(op: SparseLifted, rows: Rows, cols: Rows) -> LinearMap:
    left = SparseMap(lift_rows(op.lift, _as_index(rows, op.device)))
    right = SparseMap(lift_rows(op.lift, _as_index(cols, op.device)), transposed=True)
    return Product(left, OperatorMap(op.base), right)


@entries.register
def _(op: SparseLifted, i: Tensor, j: Tensor) -> Tensor:
    return _lifted_entries(op, i, j)


def lift_rows(lift: Lift, rows: Tensor) -> Lift:
    """The lift made of rows ``rows`` ``(k,)`` of ``lift``, values differentiable."""
    counts = lift.crow.diff()[rows]
    owner, entry = _expand_rows(lift.crow[rows], counts)
    indices = torch.stack([owner, lift.col[entry]])
    shape = (rows.shape[0], lift.n_in)
    coo = torch.sparse_coo_tensor(indices, lift.values[entry], shape, is_coalesced=True, check_invariants=False)
    return Lift.from_tensor(coo, "lift")


def _expand_rows(starts: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """For rows with stored entries ``starts[k] .. starts[k] + counts[k]``: each entry's row ``k`` and position."""
    k = torch.arange(counts.shape[0], device=counts.device)
    owner = torch.repeat_interleave(k, counts)
    first = torch.cumsum(counts, 0) - counts
    within = torch.arange(owner.shape[0], device=counts.device) - first[owner]
    return owner, starts[owner] + within


def _lifted_entries(op: SparseLifted, i: Tensor, j: Tensor) -> Tensor:
    """``(L B L^T)[i_k, j_k] = sum_{a in row i_k, b in row j_k} v_a v_b B[c_a, c_b]``: the pairs of stored
    entries of the two rows, ``sum_k nnz(i_k) nnz(j_k)`` gathers of ``B``. Broadcasting index tensors are
    flattened to vectors and the result is shaped back ``(..., *index shape)``."""
    i, j = torch.broadcast_tensors(i, j)
    index_shape = i.shape
    i, j = i.reshape(-1), j.reshape(-1)
    lift, v = op.lift, op.lift.values
    ci, cj = lift.crow.diff()[i], lift.crow.diff()[j]
    pair_owner, t = _expand_rows(torch.zeros_like(ci), ci * cj)
    a = lift.crow[i][pair_owner] + t // cj[pair_owner]
    b = lift.crow[j][pair_owner] + t % cj[pair_owner]
    weight = v[a] * v[b]
    vals = weight * entries(op.base, lift.col[a], lift.col[b])
    out = vals.new_zeros(*vals.shape[:-1], i.shape[0])
    return out.index_add(-1, pair_owner, vals).reshape(*vals.shape[:-1], *index_shape)


# -- Permuted: (P B P^T)[i, j] = B[perm[i], perm[j]] --------------------------------------------------
@batch_getitem.register
def _(op: Permuted, idx: tuple) -> Operator:
    return op._replace(base=batch_getitem(op.base._expand(op.batch_shape), idx))


@principal.register
def _(op: Permuted, rows: Rows) -> Operator:
    """Rows ``rows`` of ``P B P^T`` are rows ``perm[rows]`` of ``B``: the base's principal submatrix on those
    rows sorted (a contiguous run becomes a range, which keeps e.g. a ``BlockDiag`` block diagonal), put
    back in the order asked by a smaller ``Permuted`` (none when already in order)."""
    picked = op.perm.index_select(0, _as_index(rows, op.device))
    if not value_checks_enabled(picked) or picked.numel() == 0:
        return principal(op.base, picked)
    ordered, order = torch.sort(picked, stable=True)
    inner = principal(op.base, _as_run(ordered))
    local = torch.argsort(order)  # picked[a] = ordered[local[a]]
    if torch.equal(local, torch.arange(local.shape[0], device=local.device)):
        return inner
    return Permuted(inner, local)


@submatrix.register
def _(op: Permuted, rows: Rows, cols: Rows) -> LinearMap:
    r = op.perm.index_select(0, _as_index(rows, op.device))
    c = op.perm.index_select(0, _as_index(cols, op.device))
    return submatrix(op.base, r, c)


@entries.register
def _(op: Permuted, i: Tensor, j: Tensor) -> Tensor:
    return entries(op.base, op.perm[i], op.perm[j])


def _as_run(ordered: Tensor) -> Rows:
    """Sorted rows as a ``range`` when they are one contiguous run (structured principal rules want ranges)."""
    start = int(ordered[0])
    run = torch.arange(start, start + ordered.shape[0], device=ordered.device)
    return range(start, start + ordered.shape[0]) if torch.equal(ordered, run) else ordered


# -- dispatch caches ----------------------------------------------------------------------------------
def _warm_caches(*functions: Any) -> None:
    """Fill the per-type caches of ``functools.singledispatch`` functions for every operator class defined so
    far. torch.compile guards on the contents of those caches: a compiled call that is the first to dispatch
    a type fills the cache while it is traced, which fails the guard and recompiles on the next call.
    Registering a rule clears a cache, so this runs after the last registration, at the end of this module."""
    seen, stack = set(), [Operator]
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.add(cls)
            stack.extend(cls.__subclasses__())
    for fn in functions:
        for cls in seen:
            fn.dispatch(cls)


_warm_caches(getitem, batch_getitem, principal, submatrix, entries)
