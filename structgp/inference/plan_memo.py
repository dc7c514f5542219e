"""Memoised planning: ``planned(op)`` is ``plan(op)`` remembered per structure signature and settings.

``plan(op)`` asks every candidate engine whether it applies and what it costs; for a small operator that
costs as much as the factorisation. The answer depends on the structure only — the nested operator types,
their static metadata, the shapes, dtypes, devices and ``requires_grad`` of their tensors, and grad mode
(the expected times include the backward of a call that will be differentiated) — and on the settings
in force, so calls with operators of one signature (thousands of them in an acquisition-function
optimisation) share one plan. The key holds metadata only (types, ``torch.Size``, dtypes, devices, static
values): no operator or tensor is kept alive by the memo.

Not memoised (``plan(op)`` runs each time, as without the memo):
- plans that say ``memoisable=False`` (their choice read numerical facts cached on that operator);
- plans of ``plan.py`` versions without that attribute, for structures whose planning reads factor values
  (a non-diagonal Kronecker: the rank of its spectral root);
- inside ``torch.func`` transforms (what an engine may read differs there) and while ``torch.compile``
  traces (Dynamo traces ``plan`` itself and guards on what it reads).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

import torch
from torch import Tensor

from structgp import _config
from structgp.covariance.kronecker import Kronecker
from structgp.covariance.operator import Operator
from structgp.covariance.pytree_node import PyTreeNode
from structgp.inference.plan import Plan, plan

MAX_ENTRIES = 512

_memo: OrderedDict[Hashable, Plan] = OrderedDict()
_lock = threading.Lock()
_stats = {"hits": 0, "misses": 0}


def planned(op: Operator) -> Plan:
    """``plan(op)``, remembered per structure signature of ``op`` and the current settings."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return plan(op)
    sig = signature(op)
    if sig is None:
        return plan(op)
    key = (sig, _config.current(), torch.is_grad_enabled())
    try:
        with _lock:
            found = _memo.get(key)
            if found is not None:
                _memo.move_to_end(key)
                _stats["hits"] += 1
                return found
    except TypeError:  # a static value that is not hashable: plan every time
        return plan(op)
    p = plan(op)
    if _memoisable(p, op):
        with _lock:
            _stats["misses"] += 1
            _memo[key] = p
            if len(_memo) > MAX_ENTRIES:
                _memo.popitem(last=False)  # the least recently used
    return p


def signature(op: Operator) -> tuple | None:
    """A hashable description of ``op``'s structure without its values: for each node in depth-first
    order its type and static values, for each tensor its shape, dtype, device and requires_grad, for each
    list its length. None when a child is neither a tensor, a node, a list nor a plain value."""
    parts: list = []
    return tuple(parts) if _describe(op, parts) else None


def _describe(x: object, parts: list) -> bool:
    """Append ``x``'s signature to ``parts``; False where ``x`` cannot be described by metadata."""
    if isinstance(x, Tensor):
        parts.append((x.shape, x.dtype, x.device, x.requires_grad))
        return True
    if isinstance(x, PyTreeNode):
        cls = type(x)
        parts.append(cls)
        for name in cls._static:  # ints, tuples, Python numbers; a tensor would be held by the key
            value = getattr(x, name)
            if isinstance(value, Tensor):
                parts.append((value.shape, value.dtype, value.device))
            else:
                parts.append(value)
        for name in cls._children:  # loops, not all(...): this runs on every engine call
            if not _describe(getattr(x, name), parts):
                return False
        return True
    if isinstance(x, (list, tuple)):
        parts.append((type(x), len(x)))
        for item in x:
            if not _describe(item, parts):
                return False
        return True
    if x is None or isinstance(x, (bool, int, float, str)):
        parts.append(x)
        return True
    return False  # an unknown child: its meaning for planning is unknown, so no memo


def _memoisable(p: Plan, op: Operator) -> bool:
    """What the plan says (``memoisable``), else whether its planning could only have read metadata."""
    said = getattr(p, "memoisable", None)
    if said is not None:
        return bool(said)
    return not _has_kronecker(op)


def _has_kronecker(x: object) -> bool:
    """Whether a non-diagonal Kronecker occurs in ``x`` (whose planning reads the factors' values)."""
    if isinstance(x, Kronecker) and not x.is_diagonal:
        return True
    if isinstance(x, PyTreeNode):
        return any(_has_kronecker(getattr(x, name)) for name in type(x)._children)
    if isinstance(x, (list, tuple)):
        return any(_has_kronecker(item) for item in x)
    return False


def clear() -> None:
    """Forget every memoised plan (e.g. after registering an engine)."""
    with _lock:
        _memo.clear()
        _stats.update(hits=0, misses=0)


def info() -> dict[str, int]:
    """Hits, misses (plans computed and memoised) and the number of memoised plans."""
    with _lock:
        return {**_stats, "size": len(_memo)}
