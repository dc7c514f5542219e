"""How BoTorch's shapes map to a structgp ExactGP's inputs and values.

BoTorch speaks of inputs ``(*b, q, d)`` and outcomes ``(*b, q, m)``. A structgp ExactGP holds ``m`` outputs in
one of three ways, and its values (means, covariance rows) are laid out accordingly:

    "single"   one output                    values (*B, q)         covariance (*B, q, q)
    "tasks"    a multitask kernel, t = m     values (*B, q t)       covariance (*B, q t, q t)  (point-major)
    "batch"    independent outputs as the    values (*B, m, q)      covariance (*B, m, q, q)
               gp's last batch dim

An ensemble (hyperparameter samples as the gp's leading batch dim ``s``) puts ``s`` just before the output
batch dim, so that outcomes are ``(*b, s, q, m)`` as BoTorch's ``MCMC_DIM = -3`` expects. "Model coordinates"
are inputs with a size-one dim inserted for each of these gp batch dims (``(*b, 1, q, d)``), so that they
broadcast against the gp's hyperparameters.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

KINDS = ("single", "tasks", "batch")


@dataclasses.dataclass(frozen=True)
class Layout:
    """kind: one of ``KINDS``; outputs: ``m``; ensemble: whether the gp has a leading hyperparameter-sample dim."""

    kind: str
    outputs: int
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.kind == "single" and self.outputs != 1:
            raise ValueError(f"outputs: a single-output layout has 1 output, got {self.outputs}")

    @property
    def per_point(self) -> int:
        """Values a point has along the values axis (``t`` for tasks, else 1)."""
        return self.outputs if self.kind == "tasks" else 1

    @property
    def inserted_dims(self) -> int:
        """Size-one dims inserted into inputs before ``(q, d)`` (one per gp batch dim BoTorch does not see)."""
        return int(self.ensemble) + int(self.kind == "batch")

    # -- inputs ---------------------------------------------------------------------------------------
    def model_inputs(self, x: Tensor) -> Tensor:
        """``(*b, q, d)`` -> model coordinates ``(*b, 1.., q, d)``."""
        for _ in range(self.inserted_dims):
            x = x.unsqueeze(-3)
        return x

    # -- values ---------------------------------------------------------------------------------------
    def to_values(self, y: Tensor, name: str = "Y") -> Tensor:
        """Outcomes ``(*b, q, m)`` -> values (``(*b, q)``, ``(*b, q m)`` or ``(*b, m, q)``). Their batch dims
        align from the right with the gp's batch dims (an ensemble's ``s`` included), as BoTorch's do."""
        if y.dim() < 2 or y.shape[-1] != self.outputs:
            raise ValueError(
                f"{name}: expected shape (..., n, {self.outputs}) (one column per output), got {tuple(y.shape)}"
            )
        if self.kind == "single":
            return y.squeeze(-1)
        if self.kind == "tasks":
            return y.flatten(-2)
        return y.movedim(-1, -2)

    def to_targets(self, y: Tensor) -> Tensor:
        """Outcomes ``(*b, n, m)`` -> a gp's ``train_y`` (``(*b, n)``, ``(*b, n, t)`` or ``(*b, m, n)``)."""
        return y if self.kind == "tasks" else self.to_values(y, "train_Y")

    def from_targets(self, train_y: Tensor) -> Tensor:
        """A gp's ``train_y`` -> outcomes ``(*b, n, m)`` (the inverse of :meth:`to_targets`)."""
        if self.kind == "single":
            return train_y.unsqueeze(-1)
        return train_y if self.kind == "tasks" else train_y.movedim(-2, -1)

    def from_values(self, values: Tensor) -> Tensor:
        """Values -> outcomes ``(*b, n, m)`` (the inverse of :meth:`to_values`)."""
        if self.kind == "tasks":
            return values.unflatten(-1, (-1, self.outputs))
        return self.from_targets(values)

    def model_batch(self, values_batch: torch.Size) -> torch.Size:
        """BoTorch's batch shape from the batch of the values (drops the output dim of a "batch" layout)."""
        return values_batch[:-1] if self.kind == "batch" else values_batch
