"""Fitting a :class:`BoTorchModel` with ``botorch.fit.fit_gpytorch_mll``.

``fit_gpytorch_mll(mll)`` runs BoTorch's fitting machinery (scipy L-BFGS-B with parameter bounds from gpytorch
constraints, retries from prior samples on failure) on the closure ``get_loss_closure(mll)`` builds. That
closure is ``mll.compute_custom_loss`` (or ``mll.model.compute_custom_loss``) when defined, else gpytorch's
``mll(model(*train_inputs), train_targets)``, which a structgp model cannot serve. So:

    mll = StructuredMarginalLogLikelihood(model)     # any likelihood
    mll = ExactMarginalLogLikelihood(model.likelihood, model)   # a gpytorch Gaussian likelihood, as usual
    fit_gpytorch_mll(mll)

both minimise the gp's structured loss ``-(log p(y) + log prior) / n`` (``ExactGP.loss``): one
``inv_quad_logdet`` by the engine that fits the covariance's structure.
"""

from __future__ import annotations

from typing import Any

from gpytorch.mlls import MarginalLogLikelihood
from torch import Tensor

from structgp.integrations.botorch.model import BoTorchModel


class StructuredMarginalLogLikelihood(MarginalLogLikelihood):
    """The marginal log likelihood of a :class:`BoTorchModel`'s gp, for ``fit_gpytorch_mll``.

    ``mll()`` is the gp's ``(log p(y) + log prior) / n`` (summed over a batch of gps); the arguments gpytorch
    passes (the model's output and targets) are ignored: the gp holds its training data.
    """

    def __init__(self, model: BoTorchModel) -> None:
        if not isinstance(model, BoTorchModel):
            raise TypeError(f"model: expected a structgp BoTorchModel, got {type(model).__name__}")
        super().__init__(model.likelihood, model)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return -self.model.gp.loss()

    def compute_custom_loss(self, **kwargs: Any) -> Tensor:
        """The loss minimised by ``fit_gpytorch_mll`` (the negated objective)."""
        return self.model.gp.loss()
