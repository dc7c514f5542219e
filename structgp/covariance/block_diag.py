"""BlockDiag: a block-diagonal covariance ``diag(A_1, A_2, ..., A_b)``, uniform or ragged.

The blocks are held in *groups*: blocks of one size and one structure are stacked into a single operator
whose last batch dimension indexes them (``(..., g, m, m)``), so every question about a group is one
batched call (one batched Cholesky for dense blocks, one batched Woodbury for low-rank-plus-noise blocks).
A uniform ``(..., b, m, m)`` tensor or batched operator is a single group and costs no copy: the rows of a
right-hand side are only reshaped. A ragged list is grouped by ``(size, structure)``; when the groups do
not occupy consecutive rows in order, ``perm`` (N,) lists the rows of the groups one after another and
``inverse`` (N,) puts the stacked rows back in place (one gather each way).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from structgp.covariance.dense import Dense
from structgp.covariance.diagonal import Diagonal, ScaledIdentity
from structgp.covariance.map import LinearMap, guard_map_dense
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.validation import (
    as_tensor,
    broadcast_batch,
    check_ndim,
    check_same_kind,
    check_square,
)


class BlockDiag(Operator):
    """``diag(A_1, ..., A_b)`` of shape ``(..., N, N)``, ``N = sum_i m_i``.

    blocks: a ``(..., b, m, m)`` tensor; an operator ``(..., b, m, m)`` whose last batch dimension indexes
        the blocks (``Dense(t)``, ``LowRank(W)`` with ``W`` ``(..., b, m, k)``, ``LowRank(W) + Diagonal(d)``);
        or a list of operators / ``(..., m_i, m_i)`` tensors of any sizes (batch dims broadcast).

    ``BlockDiag + Diagonal`` / ``+ ScaledIdentity`` stays a ``BlockDiag``: the noise is split per block.
    """

    _children = ("groups", "perm", "inverse")
    _static = ("members",)

    def __init__(self, blocks: Tensor | Operator | Sequence[Tensor | Operator]) -> None:
        super().__init__()
        if isinstance(blocks, (list, tuple)):
            groups, members = _group_list(blocks)
        else:
            group = _uniform_group(blocks)
            groups, members = [group], (tuple(range(_count(group))),)
        self.groups = groups
        self.members = None if _in_order(members) else members
        self.perm, self.inverse = _permutation(groups, self.members)

    # -- layout -------------------------------------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        return self._batch() + (self.n, self.n)

    @property
    def n(self) -> int:
        return sum(_count(g) * g.n for g in self.groups)

    @property
    def num_blocks(self) -> int:
        return sum(_count(g) for g in self.groups)

    @property
    def is_diagonal(self) -> bool:
        return all(g.is_diagonal for g in self.groups)

    def _batch(self) -> torch.Size:
        return torch.broadcast_shapes(*(g.batch_shape[:-1] for g in self.groups))

    def group_blocks(self) -> list[tuple[int, ...]]:
        """The indices (in the order given) of the blocks each group holds."""
        if self.members is not None:
            return [tuple(m) for m in self.members]
        out, start = [], 0
        for g in self.groups:
            out.append(tuple(range(start, start + _count(g))))
            start += _count(g)
        return out

    def group_rows(self) -> list[Tensor]:
        """The rows of the full matrix each group owns, ``(g_j, m_j)`` int64 per group."""
        perm = self.perm if self.perm is not None else torch.arange(self.n, device=self.device)
        return [r.view(_count(g), g.n) for r, g in zip(perm.split(self._lengths()), self.groups, strict=True)]

    def _lengths(self) -> list[int]:
        return [_count(g) * g.n for g in self.groups]

    def split_rows(self, x: Tensor) -> list[Tensor]:
        """``x`` ``(..., N, c)`` as one ``(..., g_j, m_j, c)`` per group (views when in order)."""
        if self.perm is not None:
            x = x.index_select(-2, self.perm)
        return _split(x, [(_count(g), g.n) for g in self.groups])

    def merge_rows(self, parts: list[Tensor]) -> Tensor:
        """The inverse of :meth:`split_rows`: ``(..., g_j, m_j, c)`` per group -> ``(..., N, c)``."""
        return self._merge([p.flatten(-3, -2) for p in parts], dim=-2)

    def _merge(self, flat: list[Tensor], dim: int) -> Tensor:
        """Concatenate per-group pieces along ``dim`` (after broadcasting their other dims) and unpermute."""
        out = _cat_broadcast(flat, dim)
        return out if self.inverse is None else out.index_select(dim, self.inverse)

    # -- structured algebra -------------------------------------------------------------------------
    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.merge_rows([g._matmul(x) for g, x in zip(self.groups, self.split_rows(rhs), strict=True)])

    def diagonal(self) -> Tensor:
        return self._merge([g.diagonal().flatten(-2) for g in self.groups], dim=-1)

    def _to_dense(self) -> Tensor:
        blocks = [g._to_dense() for g in self.groups]
        batch = torch.broadcast_shapes(*(b.shape[:-3] for b in blocks))
        out = blocks[0].new_zeros(*batch, self.n, self.n)
        for rows, b in zip(self.group_rows(), blocks, strict=True):
            out[..., rows[:, :, None], rows[:, None, :]] = b
        return out

    def _scale(self, c: Tensor) -> BlockDiag:
        return self._replace(groups=[g._scale(c.unsqueeze(-1)) for g in self.groups])

    def _expand(self, batch_shape: torch.Size) -> BlockDiag:
        return self._replace(groups=[g._expand(batch_shape + (_count(g),)) for g in self.groups])

    def _add_diagonal(self, noise: Operator) -> BlockDiag:
        """``self + noise`` block by block: each group gets the noise of its own rows."""
        from structgp.covariance.sum import add

        if isinstance(noise, ScaledIdentity):
            scale = noise.scale.unsqueeze(-1)  # (..., 1) broadcasts over the blocks of a group
            parts = [noise._replace(scale=scale, size=g.n) for g in self.groups]
        else:
            parts = [Diagonal(d.squeeze(-1)) for d in self.split_rows(noise.diagonal().unsqueeze(-1))]
        return self._replace(groups=[add(g, p) for g, p in zip(self.groups, parts, strict=True)])

    def __repr__(self) -> str:
        kinds = ", ".join(f"{_count(g)} x {type(g).__name__} {g.n}x{g.n}" for g in self.groups)
        dims = "x".join(str(s) for s in self.shape)
        return f"BlockDiag({dims}, {str(self.dtype).replace('torch.', '')}; {kinds})"


class BlockDiagRoot(LinearMap):
    """``diag(R_1, ..., R_b)`` ``(..., N, K)`` from the groups' roots ``(..., g_j, m_j, k_j)``.

    The columns are the groups' columns one group after another; the rows follow the operator's layout.
    """

    _children = ("parts", "perm", "inverse")

    def __init__(self, parts: list[LinearMap], perm: Tensor | None, inverse: Tensor | None) -> None:
        super().__init__()
        self.parts = list(parts)
        self.perm = perm
        self.inverse = inverse

    @property
    def shape(self) -> torch.Size:
        batch = torch.broadcast_shapes(*(p.batch_shape[:-1] for p in self.parts))
        rows = sum(_count(p) * p.shape[-2] for p in self.parts)
        return batch + (rows, sum(_count(p) * p.shape[-1] for p in self.parts))

    def _matmul(self, x: Tensor) -> Tensor:
        pieces = _split(x, [(_count(p), p.shape[-1]) for p in self.parts])
        out = [p._matmul(c).flatten(-3, -2) for p, c in zip(self.parts, pieces, strict=True)]
        out = _cat_broadcast(out, -2)
        return out if self.inverse is None else out.index_select(-2, self.inverse)

    def tmatmul(self, y: Tensor) -> Tensor:
        if self.perm is not None:
            y = y.index_select(-2, self.perm)
        pieces = _split(y, [(_count(p), p.shape[-2]) for p in self.parts])
        out = [p.tmatmul(c).flatten(-3, -2) for p, c in zip(self.parts, pieces, strict=True)]
        return _cat_broadcast(out, -2)

    def to_dense(self) -> Tensor:
        guard_map_dense(self, "to_dense()")
        mats = [p.to_dense() for p in self.parts]
        batch = torch.broadcast_shapes(*(m.shape[:-3] for m in mats))
        n, k = self.shape[-2:]
        out = mats[0].new_zeros(*batch, n, k)
        perm = self.perm if self.perm is not None else torch.arange(n, device=out.device)
        row_start = col_start = 0
        for m in mats:
            g, mj, kj = m.shape[-3:]
            rows = perm[row_start : row_start + g * mj].view(g, mj, 1)
            cols = torch.arange(col_start, col_start + g * kj, device=out.device).view(g, 1, kj)
            out[..., rows, cols] = m
            row_start, col_start = row_start + g * mj, col_start + g * kj
        return out


# -- construction -----------------------------------------------------------------------------------
def _count(x: Operator | LinearMap) -> int:
    """The number of blocks of a group (its last batch dimension)."""
    return x.batch_shape[-1]


def _uniform_group(blocks: Any) -> Operator:
    if not isinstance(blocks, (Tensor, Operator)):
        raise TypeError(
            "blocks: expected a (..., b, m, m) tensor, an operator (..., b, m, m) or a list of "
            f"operators/tensors, got {type(blocks).__name__}"
        )
    op = _dense_blocks(blocks) if isinstance(blocks, Tensor) else blocks
    if len(op.batch_shape) < 1:
        raise ValueError(
            "blocks: expected an operator whose last batch dimension indexes the blocks (..., b, m, m), "
            f"got {op!r}; pass [op] for a single block"
        )
    if _count(op) < 1:
        raise ValueError(f"blocks: expected at least one block, got shape {tuple(op.shape)}")
    return op


def _dense_blocks(t: Tensor) -> Dense:
    """``Dense(t)`` for a ``(..., b, m, m)`` tensor (the operator's own checks, ``blocks`` named)."""
    check_ndim(as_tensor(t, "blocks"), "blocks", 3, "(..., b, m, m)")
    return Dense(t, name="blocks")


def _group_list(blocks: Sequence[Any]) -> tuple[list[Operator], tuple[tuple[int, ...], ...]]:
    """Stack the blocks of one size and structure (in order of first appearance); returns the groups
    ``(..., g_j, m_j, m_j)`` and the indices of the blocks each holds.

    Tensor blocks are stacked first and checked as one ``Dense`` per group (a failing check is then
    repeated block by block to name the block), so long lists of small tensors stay cheap."""
    if len(blocks) == 0:
        raise ValueError("blocks: expected at least one block, got an empty list")
    items = [_as_item(b, f"blocks[{i}]") for i, b in enumerate(blocks)]
    names = tuple(f"blocks[{i}]" for i in range(len(items)))
    check_same_kind({name: _first(x) for name, x in zip(names, items, strict=True)})
    batch = broadcast_batch(*(x.shape[:-2] for x in items), names=names)
    keys: list[tuple] = []
    lookup: dict[tuple, int] = {}
    members: list[list[int]] = []
    flat: list[list[list[Any]]] = []
    for i, x in enumerate(items):
        leaves, spec = _flatten(x, batch, names[i])
        key = (spec, tuple((t.shape, t.dtype) if isinstance(t, Tensor) else t for t in leaves))
        j = _find(keys, lookup, key)
        if j is None:
            j = len(keys)
            keys.append(key)
            members.append([])
            flat.append([])
            with contextlib.suppress(TypeError):  # an unhashable structure is found by scanning
                lookup[key] = j
        members[j].append(i)
        flat[j].append(leaves)
    groups = []
    for rows, key, idx in zip(flat, keys, members, strict=True):
        group = _stack(rows, key[0], len(batch))
        if any(isinstance(items[i], Tensor) for i in idx):
            group = _checked_dense(group, [(i, blocks[i]) for i in idx if isinstance(items[i], Tensor)])
        expected = batch + (len(idx),) + items[idx[0]].shape[-2:]
        if group.shape != expected:
            raise TypeError(
                f"blocks[{idx[0]}]: a {type(items[idx[0]]).__name__} could not be stacked into a block group "
                f"(expected shape {tuple(expected)}, got {tuple(group.shape)})"
            )
        groups.append(group)
    return groups, tuple(tuple(m) for m in members)


def _as_item(block: Any, name: str) -> Tensor | Operator:
    """An operator, or a square floating tensor (checked for its values later, with its group)."""
    if isinstance(block, Tensor):
        t = as_tensor(block, name)
        check_square(t, name)
        return t
    return as_operator(block, name)


def _first(x: Tensor | Operator) -> Tensor:
    return x if isinstance(x, Tensor) else x._first_float()


def _flatten(x: Tensor | Operator, batch: torch.Size, name: str) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves and structure of a block broadcast to ``batch``; a tensor block is a ``Dense``."""
    if isinstance(x, Tensor):
        return [x.expand(*batch, *x.shape[-2:])], _dense_spec()
    if x.batch_shape != batch:
        x = x.expand(batch)
    leaves, spec = pytree.tree_flatten(x)
    _check_stackable(leaves, batch, name, x)
    return leaves, spec


@functools.cache
def _dense_spec() -> pytree.TreeSpec:
    return pytree.tree_structure(Dense(torch.ones(1, 1)))


def _checked_dense(group: Dense, tensors: list[tuple[int, Tensor]]) -> Dense:
    """``Dense``'s checks on a stacked group; on failure the first failing tensor block is named."""
    try:
        return Dense(group.matrix, name="blocks")
    except ValueError:
        for i, t in tensors:
            Dense(t, name=f"blocks[{i}]")
        raise


def _find(keys: list[tuple], lookup: dict[tuple, int], key: tuple) -> int | None:
    """The index of ``key`` in ``keys`` (equal structure and leaf shapes), or None."""
    try:
        return lookup.get(key)
    except TypeError:
        pass
    for j, k in enumerate(keys):
        if k == key:
            return j
    return None


def _check_stackable(leaves: list[Any], batch: torch.Size, name: str, op: Operator) -> None:
    for t in leaves:
        if not isinstance(t, Tensor):
            continue
        if t.layout != torch.strided or not t.is_floating_point() or t.shape[: len(batch)] != batch:
            raise TypeError(
                f"{name}: {op!r} cannot be stacked into a block group: each of its tensors must be a dense "
                f"floating tensor carrying its batch shape {tuple(batch)} as leading dims"
            )


def _stack(items: list[list[Any]], spec: pytree.TreeSpec, dim: int) -> Operator:
    """One operator whose batch dim ``dim`` indexes ``items`` (flattened operators of one structure)."""
    columns = zip(*items, strict=True)
    leaves = [torch.stack(col, dim=dim) if isinstance(col[0], Tensor) else col[0] for col in columns]
    return pytree.tree_unflatten(leaves, spec)


def _in_order(members: tuple[tuple[int, ...], ...]) -> bool:
    """Whether the groups hold consecutive blocks, group after group (no permutation needed)."""
    flat = [i for m in members for i in m]
    return flat == list(range(len(flat)))


def _permutation(groups: list[Operator], members: tuple | None) -> tuple[Tensor | None, Tensor | None]:
    """``perm`` (the rows of the groups, group after group) and its inverse; None when in order."""
    if members is None:
        return None, None
    sizes = {i: g.n for g, m in zip(groups, members, strict=True) for i in m}
    offsets = [0] * (len(sizes) + 1)
    for i in range(len(sizes)):
        offsets[i + 1] = offsets[i] + sizes[i]
    perm = [r for m in members for i in m for r in range(offsets[i], offsets[i + 1])]
    device = groups[0].device
    perm_t = torch.tensor(perm, dtype=torch.int64, device=device)
    return perm_t, torch.argsort(perm_t)


def _split(x: Tensor, layout: list[tuple[int, int]]) -> list[Tensor]:
    """``x`` ``(..., sum g_j m_j, c)`` as views ``(..., g_j, m_j, c)`` for ``layout = [(g_j, m_j), ...]``."""
    chunks = x.split([g * m for g, m in layout], dim=-2)
    return [c.unflatten(-2, gm) for c, gm in zip(chunks, layout, strict=True)]


def _cat_broadcast(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` along the negative ``dim`` after broadcasting the dims before it."""
    if len(parts) == 1:
        return parts[0]
    lead = torch.broadcast_shapes(*(p.shape[: p.dim() + dim] for p in parts))
    return torch.cat([p.expand(*lead, *p.shape[p.dim() + dim :]) for p in parts], dim=dim)
