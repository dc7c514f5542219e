"""Per-operator caching of factorisations, invalidated when any of the operator's tensors changes."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

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
    stamp = tuple((id(t), t._version) for t in tensors)
    hit = op._cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = compute()
    op._cache[key] = (stamp, value)
    return value
