"""TrainingCache: a value computed from a module (the training solve), kept while the module is unchanged.

The key is every parameter's identity and *value* (a detached copy, compared exactly: gpytorch's setters
write through ``.data``, which bumps no version counter) and every buffer's identity and version counter
(the training data, the grid, fixed noise). The cache holds references to the tensors it keyed on, so a
replaced tensor can never be mistaken for the old one. Assigning a hyperparameter, an optimiser step,
``load_state_dict``, replacing the training data or ``.to(...)`` all invalidate it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


class TrainingCache(Generic[T]):
    """One value computed from a module, returned again while the module's parameters (by value) and buffers
    (by identity and version) are unchanged; see the module docstring."""

    def __init__(self) -> None:
        self._params: list[tuple[Tensor, Tensor]] = []  # (parameter, its value when computed)
        self._buffers: list[tuple[Tensor, int]] = []  # (buffer, its version when computed)
        self._value: T | None = None
        self._valid = False

    def get(self, module: nn.Module, compute: Callable[[], T]) -> T:
        """The remembered value if ``module`` is unchanged since it was computed, else ``compute()``."""
        params, buffers = list(module.parameters()), list(module.buffers())
        if self._valid and self._unchanged(params, buffers):
            return self._value
        value = compute()
        self._params = [(p, p.detach().clone()) for p in params]
        self._buffers = [(b, _version(b)) for b in buffers]
        self._value, self._valid = value, True
        return value

    def _unchanged(self, params: list[Tensor], buffers: list[Tensor]) -> bool:
        if len(params) != len(self._params) or len(buffers) != len(self._buffers):
            return False
        if any(b is not old or _version(b) != v for b, (old, v) in zip(buffers, self._buffers)):
            return False
        return all(p is old and _same(p, v) for p, (old, v) in zip(params, self._params))

    def clear(self) -> None:
        self.__init__()

    def __getstate__(self) -> dict:  # copies and pickles start empty
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _same(p: Tensor, v: Tensor) -> bool:
    return p.shape == v.shape and p.dtype == v.dtype and p.device == v.device and torch.equal(p.detach(), v)


def _version(t: Tensor) -> int:
    return t._version if t.layout == torch.strided else 0
