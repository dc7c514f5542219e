"""A kernel's bound correction (VFE's trace term) as a gpytorch added loss term.

gpytorch's ``ExactMarginalLogLikelihood`` adds ``model.added_loss_terms()`` to ``log p(y)`` (so does structgp's);
a model registers the correction its kernel computed in its last training-mode ``forward`` there, so the
gpytorch training loop ``-mll(model(train_x), train_y)`` optimises the same bound as ``fit()``.
"""

from __future__ import annotations

from gpytorch.mlls import AddedLossTerm
from torch import Tensor

NAME = "bound_correction"


class BoundCorrection(AddedLossTerm):
    """A term already computed (``(*batch)``), added to the log marginal likelihood as it is."""

    def __init__(self, value: Tensor) -> None:
        self.value = value

    def loss(self, *params) -> Tensor:
        return self.value


def record(module, value: Tensor | None) -> None:
    """Register ``value`` (or clear it, for None) as ``module``'s bound-correction added loss term."""
    if value is None:
        module._added_loss_terms.pop(NAME, None)  # (gpytorch's update refuses None)
        return
    if NAME not in module._added_loss_terms:
        module.register_added_loss_term(NAME)
    module.update_added_loss_term(NAME, BoundCorrection(value))
