"""structgp: Gaussian processes and probabilistic modelling on structured covariances in PyTorch.

Importing structgp never imports botorch and never changes gpytorch/linear_operator settings.
"""

from structgp import covariance, distributed, distributions, inference, kernels, models
from structgp.inference import Plan, Report, eigsh, last_report, plan, settings

__version__ = "0.1.0"

__all__ = [
    "Plan",
    "Report",
    "__version__",
    "covariance",
    "distributed",
    "distributions",
    "eigsh",
    "inference",
    "kernels",
    "last_report",
    "models",
    "plan",
    "settings",
]
