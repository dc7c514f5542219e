"""MultivariateNormal over a structured covariance operator.

For ``x ~ N(mu, A)`` with ``A`` ``(..., n, n)`` held by a structgp operator:

    log p(x) = -1/2 ((x - mu)^T A^{-1} (x - mu) + log det A + n log 2 pi)    one ``inv_quad_logdet``
    x = mu + R eps,  R R^T = A,  eps ~ N(0, I_k)                              ``R = A.root()`` ``(..., n, k)``
    H = 1/2 (n (1 + log 2 pi) + log det A)

so every question is answered by the engine that fits the structure (``structgp.plan``); the covariance is
materialised only when ``covariance_matrix``, ``scale_tril`` or ``precision_matrix`` is asked for.

As in ``torch.distributions.MultivariateNormal`` the covariance is kept unbroadcast: a distribution
expanded to a batch (``pyro.plate``, ``expand``) shares one operator, so one factorisation serves the
whole batch and every sample (``inv_quad_logdet`` folds extra leading dimensions into columns).
"""

from __future__ import annotations

import math

import torch
from pyro.distributions.torch_distribution import TorchDistribution
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.utils import lazy_property

from structgp import _config
from structgp.covariance.errors import NumericalError
from structgp.covariance.operator import Operator, as_operator
from structgp.covariance.validation import broadcast_batch, host_readable, positive_finite, value_checks_enabled
from structgp.inference.cholesky import inverse_from_cholesky, psd_cholesky

_LOG_2PI = math.log(2 * math.pi)
_NO_SAMPLE = torch.Size()


class MultivariateNormal(TorchDistribution):
    """``N(loc, covariance)`` with a structured covariance.

    loc: ``(..., n)`` tensor; covariance: a structgp operator ``(..., n, n)`` or an SPD tensor (wrapped in
    ``Dense``). The batch shape is the broadcast of ``loc.shape[:-1]`` and ``covariance.batch_shape``; the
    event shape is ``(n,)``. ``loc`` and ``covariance`` share one dtype (float32 or float64) and device.
    """

    arg_constraints = {"loc": constraints.real_vector}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, covariance: Operator | Tensor, validate_args: bool | None = None) -> None:
        covariance = as_operator(covariance, "covariance")
        _check_loc(loc, covariance)
        n = covariance.n
        batch_shape = broadcast_batch(loc.shape[:-1], covariance.batch_shape, names=("loc", "covariance"))
        shape = batch_shape + (n,)
        self.loc = loc if loc.shape == shape else loc.expand(shape)
        self._unbroadcasted_covariance = covariance
        if torch.compiler.is_compiling():  # values cannot be checked while tracing (Dynamo also refuses to
            validate_args = False  # trace torch.distributions' constraint checks in some import orders)
        # torch's check of ``arg_constraints`` (loc: real_vector, i.e. no NaN) costs four tensor operations;
        # the same check is made below with one reduction
        super().__init__(batch_shape, torch.Size((n,)), validate_args=False)
        if validate_args is None:
            del self._validate_args  # as in torch: follow Distribution.set_default_validate_args
        else:
            self._validate_args = validate_args
        if self._validate_args:
            _check_no_nan(self.loc, "loc")
            _check_covariance_values(covariance)

    # -- parameters ----------------------------------------------------------------------------------
    @property
    def covariance(self) -> Operator:
        """The covariance operator ``(*batch_shape, n, n)`` (a broadcast view; nothing is copied)."""
        op = self._unbroadcasted_covariance
        return op if op.batch_shape == self.batch_shape else op.expand(self.batch_shape)

    @property
    def mean(self) -> Tensor:
        return self.loc

    @property
    def mode(self) -> Tensor:
        return self.loc

    @property
    def variance(self) -> Tensor:
        """``diag(A)`` ``(*batch_shape, n)``, from the operator's ``diagonal()``."""
        return self._unbroadcasted_covariance.diagonal().expand(self.batch_shape + self.event_shape)

    @property
    def stddev(self) -> Tensor:
        return self.variance.sqrt()

    def confidence_region(self) -> tuple[Tensor, Tensor]:
        """``(mean - 2 std, mean + 2 std)``, as gpytorch's ``confidence_region`` (about 95% marginally)."""
        half_width = 2 * self.stddev
        return self.mean - half_width, self.mean + half_width

    @lazy_property
    def covariance_matrix(self) -> Tensor:
        """Dense ``A`` ``(*batch_shape, n, n)``; refuses sizes over ``settings(dense_limit=...)``."""
        dense = self._unbroadcasted_covariance.to_dense()
        return dense.expand(self.batch_shape + self.event_shape + self.event_shape)

    @lazy_property
    def scale_tril(self) -> Tensor:
        """Dense lower Cholesky factor of ``A`` ``(*batch_shape, n, n)`` (materialises ``A``)."""
        return self._unbroadcasted_scale_tril.expand(self.batch_shape + self.event_shape + self.event_shape)

    @lazy_property
    def precision_matrix(self) -> Tensor:
        """Dense ``A^{-1}`` ``(*batch_shape, n, n)`` (materialises ``A``)."""
        precision = inverse_from_cholesky(self._unbroadcasted_scale_tril)
        return precision.expand(self.batch_shape + self.event_shape + self.event_shape)

    @lazy_property
    def _unbroadcasted_scale_tril(self) -> Tensor:
        op = self._unbroadcasted_covariance
        return psd_cholesky(op.to_dense(), f"the covariance {op!r}")

    # -- torch.distributions API ----------------------------------------------------------------------
    def expand(self, batch_shape, _instance=None) -> MultivariateNormal:
        """The distribution broadcast to ``batch_shape``; the covariance operator is shared, not copied."""
        batch_shape = torch.Size(batch_shape)
        try:
            ok = torch.broadcast_shapes(batch_shape, self.batch_shape) == batch_shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"batch_shape: cannot expand {tuple(self.batch_shape)} to {tuple(batch_shape)}")
        new = self._get_checked_instance(MultivariateNormal, _instance)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new._unbroadcasted_covariance = self._unbroadcasted_covariance
        super(MultivariateNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _validate_sample(self, value: Tensor) -> None:
        """``value`` ``(..., n)`` broadcasts with ``(*batch_shape, n)`` and lies in the support (no NaN):
        the checks of ``torch.distributions``, the support's by one reduction."""
        if not isinstance(value, Tensor):
            raise ValueError(f"value: expected a torch.Tensor, got {type(value).__name__}")
        expected = self.batch_shape + self.event_shape
        if value.dim() < 1 or value.shape[-1] != self.event_shape[0]:
            raise ValueError(f"value: expected shape (..., {self.event_shape[0]}), got {tuple(value.shape)}")
        for got, want in zip(reversed(value.shape), reversed(expected)):
            if got != want and got != 1 and want != 1:
                raise ValueError(
                    f"value: shape {tuple(value.shape)} does not broadcast with batch_shape + event_shape "
                    f"{tuple(expected)}"
                )
        _check_no_nan(value, "value")

    def log_prob(self, value: Tensor) -> Tensor:
        """``log N(value; loc, A)`` ``(*sample, *batch)`` for ``value`` ``(*sample, *batch, n)``."""
        if self._validate_args:
            self._validate_sample(value)
        op = self._unbroadcasted_covariance
        if not isinstance(value, Tensor) or value.dtype != op.dtype:
            what = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"value: expected a tensor of dtype {op.dtype} (the covariance's), got {what}")
        diff = _difference(value, self.loc, self.batch_shape)
        inv_quad, logdet = _inv_quad_logdet(op, diff)
        return -0.5 * (inv_quad + logdet + self.event_shape[0] * _LOG_2PI)

    def rsample(self, sample_shape=_NO_SAMPLE) -> Tensor:
        """Reparameterised draws ``loc + R eps`` ``(*sample_shape, *batch_shape, n)`` with ``R = A.root()``.

        ``R`` is ``(..., n, k)`` and structured (e.g. a Kronecker product of factor roots, or a
        concatenation with an independent draw per term of a sum); all draws are one product with ``R``.
        """
        shape = self._extended_shape(torch.Size(sample_shape))
        root = self._unbroadcasted_covariance.root()
        k = root.shape[-1]
        # batch dims the root carries stay batch dims; the remaining leading dims become columns
        lead = shape[:-1]
        split = len(lead) - len(root.batch_shape)
        extra, inner = lead[:split], lead[split:]
        eps = torch.randn(*inner, k, extra.numel(), dtype=self.loc.dtype, device=self.loc.device)
        draws = root @ eps
        draws = draws.expand(*inner, *draws.shape[-2:]).movedim(-1, 0).reshape(shape)
        return self.loc + draws

    def entropy(self) -> Tensor:
        """``1/2 (n (1 + log 2 pi) + log det A)`` ``(*batch_shape)``."""
        n = self.event_shape[0]
        logdet = self._unbroadcasted_covariance.logdet()
        return (0.5 * (n * (1 + _LOG_2PI) + logdet)).expand(self.batch_shape)

    @classmethod
    def infer_shapes(cls, loc, covariance=None) -> tuple[torch.Size, torch.Size]:
        """``(batch_shape, event_shape)`` of ``MultivariateNormal(loc, covariance)`` from the arguments' shapes
        (Pyro's ``infer_shapes`` convention): ``loc`` ``(*b1, n)`` and ``covariance`` ``(*b2, n, n)`` give
        ``(broadcast(b1, b2), (n,))``."""
        loc = torch.Size(loc)
        batch_shape = loc[:-1]
        if covariance is not None:
            batch_shape = torch.broadcast_shapes(batch_shape, torch.Size(covariance)[:-2])
        return batch_shape, loc[-1:]

    # -- interop -------------------------------------------------------------------------------------
    def to_gpytorch(self):
        """This distribution as a ``gpytorch.distributions.MultivariateNormal``.

        Its covariance is :func:`structgp.integrations.gpytorch.as_linear_operator` of this covariance, so
        gpytorch's ``log_prob`` (also after ``import botorch`` flips gpytorch's fast-computation flags) and
        sampling run through structgp's exact structured paths.
        """
        from structgp.integrations.gpytorch import as_linear_operator, structured_multivariate_normal

        covariance = as_linear_operator(self._unbroadcasted_covariance, batch_shape=self.batch_shape)
        return structured_multivariate_normal(self.loc, covariance)

    def __repr__(self) -> str:
        op = self._unbroadcasted_covariance
        return f"{type(self).__name__}(loc: {tuple(self.loc.shape)}, covariance: {op!r})"


def _check_loc(loc: Tensor, covariance: Operator) -> None:
    if not isinstance(loc, Tensor):
        raise TypeError(f"loc: expected a torch.Tensor of shape (..., n), got {type(loc).__name__}")
    if loc.dim() < 1 or loc.shape[-1] != covariance.n:
        raise ValueError(
            f"loc: expected shape (..., {covariance.n}) to match the covariance {tuple(covariance.shape)}, "
            f"got {tuple(loc.shape)}"
        )
    if loc.dtype != covariance.dtype:
        raise TypeError(f"loc: expected dtype {covariance.dtype} (the covariance's), got {loc.dtype}")
    if loc.device != covariance.device:
        raise ValueError(f"loc: expected device {covariance.device} (the covariance's), got {loc.device}")


def _check_no_nan(t: Tensor, name: str) -> None:
    """``t`` is in ``constraints.real_vector`` (no NaN; infinities are real here, as in torch): a sum without
    NaN shows it in one pass; only a NaN sum (a NaN, or +inf and -inf) is looked at entry by entry."""
    if t.numel() == 0 or not host_readable(t):
        return
    t = t.detach()
    if not math.isnan(t.sum().item()) or not bool(torch.isnan(t).any()):
        return
    raise ValueError(f"{name}: expected real values (constraint real_vector), found NaN in {tuple(t.shape)} values")


def _difference(value: Tensor, loc: Tensor, batch_shape: torch.Size) -> Tensor:
    """``value - loc``, or a ValueError naming ``value`` when its shape does not fit ``(..., n)``."""
    n = loc.shape[-1]
    if value.dim() < 1 or value.shape[-1] != n:
        raise ValueError(f"value: expected shape (..., {n}) (the event shape), got {tuple(value.shape)}")
    try:
        return value - loc
    except RuntimeError as err:  # batch dims that do not broadcast
        raise ValueError(
            f"value: expected shape (..., {n}) broadcastable with the batch shape {tuple(batch_shape)}, "
            f"got {tuple(value.shape)}"
        ) from err


def _inv_quad_logdet(op: Operator, diff: Tensor) -> tuple[Tensor, Tensor]:
    """``op.inv_quad_logdet(diff)``; its non-finite ``rhs`` is the caller's ``value`` (``diff = value - loc``)."""
    try:
        return op.inv_quad_logdet(diff)
    except NumericalError as err:
        if str(err).startswith("rhs:"):
            raise NumericalError("value: expected finite entries (found NaN or Inf in value - loc)") from err
        raise


def _check_covariance_values(covariance: Operator) -> None:
    """A cheap necessary condition of positive definiteness: a finite, positive diagonal (``n`` values)."""
    if not _config.current().check_values or torch.jit.is_tracing():
        return
    diag = covariance.diagonal()
    if not value_checks_enabled(diag) or positive_finite(diag):
        return
    error = ValueError if bool((diag < 0).any()) else NumericalError  # NaN, Inf, 0: over/underflow
    raise error(
        f"covariance: expected a positive definite operator, but {covariance!r} has non-positive or "
        "non-finite diagonal entries"
    )
