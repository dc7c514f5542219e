"""Per-operator caching of factorisations, invalidated when any of the operator's tensors changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from structgp.covariance.operator import Operator
from structgp.covariance.validation import value_checks_enabled

T = TypeVar("T")


def cached(op: Operator, key: str, compute: Callable[[], T], *, detached: bool = False) -> T:
    """``compute()``, remembered on ``op`` under ``key`` while its tensors are unchanged.

    A result that carries an autograd graph is not cached (a second backward would find the graph
    freed) unless ``detached`` says the result has none. Nothing is cached under vmap or compile, nor for
    inference tensors (made under ``torch.inference_mode``), which keep no version counter.
    """
    tensors = op._tensors()
    if not detached and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return compute()  # asked first: the common case of a training step, and the cheaper question
    if not all(value_checks_enabled(t) and not t.is_inference() for t in tensors):
        return compute()
    stamp = _stamp(tensors)
    hit = op._cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = compute()
    op._cache[key] = (stamp, value)
    return value


def lookup(op: Operator, key: str) -> Any | None:
    """The value :func:`cached` holds on ``op`` under ``key`` while its tensors are unchanged, else None.

    Computes nothing (for planning, which must do no numerical work).
    """
    hit = op._cache.get(key)
    if hit is None:
        return None
    tensors = op._tensors()
    if not all(value_checks_enabled(t) for t in tensors):
        return None
    return hit[1] if hit[0] == _stamp(tensors) else None


def _stamp(tensors: list[Tensor]) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version of each tensor: a changed stamp means the cached value is stale."""
    return tuple((id(t), t._version) for t in tensors)
