"""Registration of structgp's operator classes as pytrees.

A subclass names its children (tensors, operators or lists of them) in ``_children`` and its static
values (ints, tuples) in ``_static``; it is rebuilt from them by ``_from_children`` without validation,
so ``torch.func`` transforms and ``torch.utils._pytree`` can take it apart and put it back together.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.utils._pytree as pytree
from torch import Tensor


class PyTreeNode:
    _children: ClassVar[tuple[str, ...]] = ()
    _static: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._cache: dict = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        pytree.register_pytree_node(
            cls,
            _flatten,
            lambda children, context, cls=cls: cls._from_children(list(children), context),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    @classmethod
    def _from_children(cls, children: list, context: tuple) -> Any:
        obj = cls.__new__(cls)
        for name, value in zip(cls._children, children):
            setattr(obj, name, value)
        for name, value in zip(cls._static, context):
            setattr(obj, name, value)
        obj._cache = {}
        return obj

    def _replace(self, **changes: Any) -> Any:
        """A copy with some children or static values replaced (no validation)."""
        children = [changes.get(name, getattr(self, name)) for name in self._children]
        context = tuple(changes.get(name, getattr(self, name)) for name in self._static)
        return type(self)._from_children(children, context)

    def _tensors(self) -> list[Tensor]:
        return [leaf for leaf in pytree.tree_leaves(self) if isinstance(leaf, Tensor)]

    def _first_float(self) -> Tensor:
        return next(t for t in self._tensors() if t.is_floating_point())

    @property
    def dtype(self) -> torch.dtype:
        return self._first_float().dtype

    @property
    def device(self) -> torch.device:
        return self._tensors()[0].device


def _flatten(node: PyTreeNode) -> tuple[list, tuple]:
    return [getattr(node, n) for n in node._children], tuple(getattr(node, n) for n in node._static)
