"""Diagonal and ScaledIdentity: the noise terms of structured sums."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from structgp.covariance.operator import Operator
from structgp.covariance.validation import (
    as_tensor,
    check_ndim,
    check_nonempty,
    check_positive,
    value_checks_enabled,
)


class Diagonal(Operator):
    """``diag(d)`` for a positive tensor ``diag`` of shape ``(..., n)``."""

    _children = ("diag",)

    def __init__(self, diag: Tensor) -> None:
        super().__init__()
        diag = as_tensor(diag, "diag")
        check_ndim(diag, "diag", 1, "(..., n)")
        check_nonempty(diag, "diag", "(..., n)")
        check_positive(diag, "diag")
        self.diag = diag

    @property
    def shape(self) -> torch.Size:
        return self.diag.shape + self.diag.shape[-1:]

    @property
    def is_diagonal(self) -> bool:
        return True

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.diag.unsqueeze(-1) * rhs

    def diagonal(self) -> Tensor:
        return self.diag

    def _to_dense(self) -> Tensor:
        return torch.diag_embed(self.diag)

    def _scale(self, c: Tensor) -> Diagonal:
        return self._replace(diag=c[..., None] * self.diag)

    def _expand(self, batch_shape: torch.Size) -> Diagonal:
        return self._replace(diag=self.diag.expand(*batch_shape, self.n))


class ScaledIdentity(Operator):
    """``s I_n`` for a positive ``scale`` of shape ``()`` or ``(...)``.

    A Python-number scale is weakly typed: added to an operator it is rebuilt from the number in that
    operator's dtype and on its device (no float32 rounding of a float64 model's noise).
    """

    _children = ("scale",)
    _static = ("size", "weak")

    def __init__(self, scale: Tensor | float, n: int) -> None:
        super().__init__()
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n: expected a positive int, got {n!r}")
        self.weak = None if isinstance(scale, Tensor) else float(scale)  # the Python number, if any
        # a number the default dtype cannot hold (1e-300 in float32 rounds to 0) is checked in float64
        wide = self.weak is not None and _outside(self.weak, torch.get_default_dtype())
        scale = as_tensor(scale, "scale", dtype=torch.float64 if wide else None)
        check_positive(scale, "scale")
        self.scale = scale
        self.size = n

    @property
    def shape(self) -> torch.Size:
        return self.scale.shape + (self.size, self.size)

    @property
    def is_diagonal(self) -> bool:
        return True

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.scale[..., None, None] * rhs

    def diagonal(self) -> Tensor:
        return self.scale.unsqueeze(-1).expand(*self.scale.shape, self.size)

    def _to_dense(self) -> Tensor:
        eye = torch.eye(self.size, dtype=self.scale.dtype, device=self.scale.device)
        return self.scale[..., None, None] * eye

    def _scale(self, c: Tensor) -> ScaledIdentity:
        weak = None
        if self.weak is not None and c.dim() == 0 and not c.requires_grad and value_checks_enabled(c):
            weak = self.weak * float(c)  # a number times a weak scale stays weakly typed
        return self._replace(scale=c * self.scale, weak=weak)

    def _expand(self, batch_shape: torch.Size) -> ScaledIdentity:
        return self._replace(scale=self.scale.expand(batch_shape))


def _outside(value: float, dtype: torch.dtype) -> bool:
    """Whether a finite non-zero ``value`` underflows or overflows ``dtype``."""
    info = torch.finfo(dtype)
    return value != 0 and math.isfinite(value) and not info.tiny <= abs(value) <= info.max
