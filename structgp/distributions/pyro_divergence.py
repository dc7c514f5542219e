"""structgp's numerical errors are divergences to Pyro's HMC/NUTS.

HMC and NUTS propose extreme parameter values on purpose: the step-size search doubles the step until the
energy error is too large, so a log-normal scale ``a = exp(z)`` reaches ``1e300``, ``inf`` or ``0``. Where
the log density is still finite structgp returns it; where it is not (an Inf or NaN parameter, a scale that
underflowed to 0, a covariance not positive definite to working precision) structgp raises a
:class:`~structgp.covariance.errors.NumericalError`. Pyro's integrator evaluates the potential energy
inside ``try`` and treats an exception as a divergent proposal only when a registered handler accepts it
(``pyro.ops.integrator.register_exception_handler``; by default torch's singular-matrix errors). This
module registers one that accepts exactly structgp's numerical errors (``NotPositiveDefiniteError``
included) and nothing else: a wrong shape, dtype or sign still stops the sampler with its message.
"""

from __future__ import annotations

from pyro.ops.integrator import register_exception_handler

from structgp.covariance.errors import NumericalError

HANDLER_NAME = "structgp_numerical_error"


def is_numerical_error(exception: BaseException) -> bool:
    """Whether Pyro should record ``exception`` (raised while evaluating the potential) as a divergence: a
    :class:`NumericalError`, or an error raised from one (Pyro re-raises a ``ValueError`` from ``log_prob``
    as ``ValueError("Error while computing log_prob_sum at site ...") from err``)."""
    seen = 0
    while exception is not None and seen < 8:  # the explicit cause chain, a few links deep
        if isinstance(exception, NumericalError):
            return True
        exception, seen = exception.__cause__, seen + 1
    return False


register_exception_handler(HANDLER_NAME, is_numerical_error, warn_on_overwrite=False)
