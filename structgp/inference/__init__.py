"""Numerical engines and the choice among them.

Which mechanism is for what (``docs/architecture.md`` has the details and a worked example):

- an algorithm for ``solve``/``logdet``/``inv_quad_logdet``: an :class:`~structgp.inference.plan.Engine`
  registered for the structure it answers, ``@register(Kronecker, ScaledIdentity)`` (the one dispatch rule;
  :func:`plan` picks among the matching engines from metadata only);
- a structural rule of one operation (``root``, ``eigsh``/``eigvalsh``, matrix functions, pivoted-Cholesky
  columns): one ``functools.singledispatch`` table per operation, every rule in the table's own file;
- ``torch.*`` functions on operators: ``structgp.covariance.torch_function.HANDLERS``;
- exact algebra of one structure (``@``, ``diagonal``, ``+ noise``): methods of the operator class.

Importing this package registers every engine with :mod:`structgp.inference.plan`.
"""

from structgp.inference import (  # noqa: F401  (registration)
    blockwise,
    cholesky,
    elementwise,
    iterative,
    kronecker_eigen,
    lift_reduction,
    lifted_woodbury,
    masked_grid,
    permuted,
    spectral_woodbury,
    woodbury,
)
from structgp.inference.cg import CGConvergenceWarning
from structgp.inference.cholesky import JitterWarning, NotPositiveDefiniteError, psd_cholesky
from structgp.inference.dispatch import inv_quad_logdet, logdet, solve
from structgp.inference.eigsh import Eigenpairs, eigsh, eigvalsh
from structgp.inference.matrix_functions import SqrtRoot, inv_sqrt_matmul, sqrt_matmul
from structgp.inference.plan import Plan, plan
from structgp.inference.report import Report, last_report
from structgp.inference.roots import root
from structgp.inference.settings import Settings, settings

__all__ = [
    "CGConvergenceWarning",
    "Eigenpairs",
    "JitterWarning",
    "NotPositiveDefiniteError",
    "Plan",
    "Report",
    "Settings",
    "SqrtRoot",
    "eigsh",
    "eigvalsh",
    "inv_quad_logdet",
    "inv_sqrt_matmul",
    "last_report",
    "logdet",
    "plan",
    "psd_cholesky",
    "root",
    "settings",
    "solve",
    "sqrt_matmul",
]
