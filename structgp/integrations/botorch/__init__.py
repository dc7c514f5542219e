"""BoTorch adapter: structgp models as BoTorch models (imports botorch; ``import structgp`` never does).

    from structgp.integrations.botorch import StructuredSingleTaskGP
    model = StructuredSingleTaskGP(train_X, train_Y, covar_module=kernel)   # SingleTaskGP, structured
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))

    from structgp.integrations.botorch import BoTorchModel, StructuredMarginalLogLikelihood
    model = BoTorchModel(gp)                       # gp: a fitted structgp.models.ExactGP
    acqf = qLogExpectedImprovement(model, best_f)  # any BoTorch acquisition function

    ensemble = nuts_ensemble(model)                # Pyro NUTS over the hyperparameters -> an ensemble model

Posteriors, fantasies and conditioning are computed by structgp from the gp's cached structured training
solve; BoTorch gets dense ``q x q`` Cholesky-root posteriors (see the submodules).
"""

from structgp.integrations.botorch.ensemble import EnsembleModel, batch_hyperparameters
from structgp.integrations.botorch.fit import StructuredMarginalLogLikelihood
from structgp.integrations.botorch.model import BoTorchModel
from structgp.integrations.botorch.nuts import hyperparameter_sites, nuts_ensemble, nuts_model
from structgp.integrations.botorch.single_task_gp import StructuredSingleTaskGP

__all__ = [
    "BoTorchModel",
    "EnsembleModel",
    "StructuredMarginalLogLikelihood",
    "StructuredSingleTaskGP",
    "batch_hyperparameters",
    "hyperparameter_sites",
    "nuts_ensemble",
    "nuts_model",
]
