"""structgp's error types: numerical failures, and refusals to densify.

:class:`NumericalError` is a ``ValueError`` (bad input is still a ``ValueError`` naming the argument) raised
for what arithmetic at the edges of the floating-point range produces rather than what a caller wrote: NaN
or Inf entries, a positive quantity that underflowed to zero, a matrix that is not positive definite to
working precision. Samplers treat it as a failed proposal: importing :mod:`structgp.distributions`
registers it with Pyro's HMC/NUTS integrator, which then records a divergence instead of stopping (as it
does for torch's own singular-matrix errors). Wrong signs, shapes and types stay plain ``ValueError`` /
``TypeError``, so a mistake in a model is never mistaken for a divergence.
"""

from __future__ import annotations


class NumericalError(ValueError):
    """NaN/Inf entries, an underflow to zero, or a matrix not positive definite to working precision."""


class DensifyError(RuntimeError):
    """Raised instead of allocating a huge dense matrix from a structured operator or map."""
