"""StructuredSingleTaskGP: BoTorch's ``SingleTaskGP`` whose covariance algebra is structgp's.

    model = StructuredSingleTaskGP(train_X, train_Y)                        # SingleTaskGP's defaults
    model = StructuredSingleTaskGP(train_X, train_Y, covar_module=GridKernel(...))   # any structgp kernel
    fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model))

Design: a subclass of BoTorch's ``SingleTaskGP`` that replaces only the two places where gpytorch does linear
algebra; everything else is BoTorch's own code, so the constructor (signature, argument order, default kernel,
likelihood, priors and ``Standardize``), transforms, output batching, ``subset_output``, ``load_state_dict``
warm starts (the training data are not in the state dict), ``ModelListGP``, ``fantasize`` and the
acquisition functions behave exactly as for ``SingleTaskGP``. The alternatives were more code and less exact:
wrapping a structgp ``ExactGP`` (:class:`.BoTorchModel`) must re-implement each of those conventions, and
letting gpytorch's prediction strategy run on a structured operator would evaluate the kernel on
training-and-test inputs together (impossible for a grid kernel) and densify the training covariance.

1. Training mode, ``forward(x)``: the prior ``N(m(x), K(x, x))`` with ``K`` the structgp operator of the kernel
   (a gpytorch kernel is a ``Dense`` operator), handed to gpytorch as a structured ``LinearOperator``
   (``MultivariateNormal.to_gpytorch``): gpytorch's ``ExactMarginalLogLikelihood`` adds the likelihood's noise
   (the structure is kept) and its ``log_prob`` is one structured ``inv_quad_logdet`` (the engine
   ``structgp.plan`` picks), so ``fit_gpytorch_mll`` optimises the exact marginal likelihood with
   gpytorch's priors. A VFE kernel's trace term is an added loss term (:mod:`structgp.models.added_loss`).
2. Eval mode, ``model(X)`` (which BoTorch's ``posterior`` calls with transformed inputs): the posterior from a
   structgp ``ExactGP`` over the same kernel, mean, likelihood and (transformed) training data, whose training
   solve is cached until a hyperparameter or the data change; a dense ``q x q`` covariance per point set
   with its Cholesky root (:mod:`.joint`, :mod:`.posterior`). ``get_fantasy_model`` (behind
   ``condition_on_observations``, ``fantasize`` and ``ModelListGP``'s) returns a view that shares this
   model's modules and training solve and conditions on the new data by a Schur complement
   (:mod:`.conditioning`), whatever the training covariance's structure.

Posteriors equal ``SingleTaskGP``'s with the same hyperparameters up to rounding (both are exact).
``_supports_cache_root`` is False: BoTorch's root caching reads gpytorch's prediction strategy.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import gpytorch
import torch
from botorch.models import SingleTaskGP
from botorch.utils.types import DEFAULT
from torch import Tensor

from structgp.distributions import MultivariateNormal
from structgp.integrations.botorch.conditioning import Observations, conditioned_joint
from structgp.integrations.botorch.joint import gp_joint
from structgp.integrations.botorch.layout import Layout
from structgp.integrations.botorch.posterior import botorch_posterior
from structgp.kernels import Kernel, as_kernel
from structgp.models import ExactGP, added_loss, noise_operator
from structgp.models.noise import is_fixed_noise
from structgp.models.training_data import appended

_SINGLE = Layout("single", 1)  # gpytorch's view: outputs are batch dims of one-output values


class StructuredSingleTaskGP(SingleTaskGP):
    """``SingleTaskGP(train_X, train_Y, train_Yvar, likelihood, covar_module, mean_module, outcome_transform,
    input_transform)`` (same arguments and defaults) with structgp's exact structured covariance algebra;
    ``covar_module`` may be any structgp kernel (grid, interpolation, inducing points, groups, ...) or gpytorch
    kernel. See the module docstring."""

    _supports_cache_root = False

    def __init__(
        self,
        train_X: Tensor,
        train_Y: Tensor,
        train_Yvar: Tensor | None = None,
        likelihood: gpytorch.likelihoods.Likelihood | None = None,
        covar_module: torch.nn.Module | None = None,
        mean_module: gpytorch.means.Mean | None = None,
        outcome_transform: Any = DEFAULT,
        input_transform: Any = None,
    ) -> None:
        super().__init__(
            train_X, train_Y, train_Yvar, likelihood, covar_module, mean_module, outcome_transform, input_transform
        )
        self._structured = _Structured()
        self._conditioned: tuple[ExactGP, tuple[Observations, ...]] | None = None

    # -- 1. training mode: the structured prior ------------------------------------------------------
    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        if self.training:
            x = self.transform_inputs(x)
        kernel = as_kernel(self.covar_module, "covar_module")
        xk = kernel.check_inputs(_shared_inputs(x), "x")
        prior = MultivariateNormal(self.mean_module(x), kernel(xk), validate_args=False)
        if self.training:
            added_loss.record(self, self._bound_correction(kernel, xk))
        return prior.to_gpytorch()

    def _bound_correction(self, kernel: Kernel, x: Tensor) -> Tensor | None:
        if type(kernel).bound_correction is Kernel.bound_correction:
            return None
        noise = noise_operator(self.likelihood, kernel.num_points(x), 1, dtype=x.dtype, device=x.device)
        return kernel.bound_correction(x, noise.diagonal())

    # -- 2. eval mode: the posterior from a structgp ExactGP -----------------------------------------
    def __call__(self, *args: Tensor, **kwargs: Any):
        if self.training or gpytorch.settings.prior_mode.on() or self.train_inputs is None:
            return super().__call__(*args, **kwargs)
        x = args[0].unsqueeze(-1) if args[0].dim() == 1 else args[0]
        gp, steps = self._conditioned or (self.structured_gp(), ())
        noise_at = functools.partial(_noise_at, gp)
        mean, cov = conditioned_joint(functools.partial(gp_joint, gp), steps, _SINGLE, noise_at, x)
        return botorch_posterior(mean, cov, _SINGLE, x.shape[-2], None).distribution

    def structured_gp(self) -> ExactGP:
        """The structgp ``ExactGP`` over this model's modules and current training data (the transformed
        inputs in eval mode), rebuilt when the data or a module is replaced; a conditioned view's base gp."""
        if self._conditioned is not None:
            return self._conditioned[0]
        return self._structured.get(self)

    def get_fantasy_model(self, inputs: Tensor, targets: Tensor, noise: Tensor | None = None, **kwargs: Any):
        """This model conditioned on ``targets`` ``(*b', n')`` at (transformed) ``inputs`` ``(*b, n', d)``, as
        gpytorch's ``ExactGP.get_fantasy_model``: the result's training data are the union (batch dims
        broadcast); its posteriors are this model's conditioned exactly on the new data, sharing its modules
        and training solve. noise: the new observations' noise variances (a fixed-noise likelihood)."""
        x = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
        x = x.unsqueeze(-1) if x.dim() == 1 else x
        base, steps = self._conditioned or (self.structured_gp(), ())
        new = _view(self)
        new._conditioned = (base, steps + (Observations(x, targets, noise),))
        full_x, full_y = appended(self.train_inputs[0], x, 1), appended(self.train_targets, targets, 0)
        if targets.dim() == x.dim():  # one more batch dim on the targets: fantasies at the same points
            full_x = full_x.expand(*full_y.shape[:-1], *full_x.shape[-2:])
        new.train_inputs, new.train_targets = (full_x,), full_y
        if isinstance(self.likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
            new.likelihood = self.likelihood.get_fantasy_likelihood(noise=_fantasy_noise(base, targets, noise))
        return new

    def set_train_data(self, inputs=None, targets=None, strict: bool = True) -> None:
        """gpytorch's, and a conditioned view becomes the plain model of its (new) training data."""
        super().set_train_data(inputs, targets, strict)
        self._conditioned = None


class _Structured:
    """The structgp ExactGP of a model, kept while the model's training data and modules are the same objects
    (the gp's own cache then keeps its training solve while the hyperparameters are unchanged). Copies and
    pickles start empty."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._gp: ExactGP | None = None

    def get(self, model: StructuredSingleTaskGP) -> ExactGP:
        key = (model.train_inputs[0], model.train_targets, model.covar_module, model.mean_module, model.likelihood)
        if self._key is None or any(a is not b for a, b in zip(self._key, key)):
            x, y, kernel, mean, likelihood = key
            self._gp = ExactGP(_shared_inputs(x), y, kernel, likelihood=likelihood, mean=mean)
            self._key = key
        return self._gp

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def _shared_inputs(x: Tensor) -> Tensor:
    """``x`` ``(*b, n, d)`` without its batch dims when all batch members are the same points (a multi-output
    model's inputs repeated per output): grid kernels take only unbatched inputs, and one kernel evaluation
    then serves all outputs (the kernel's own batch dims still broadcast)."""
    if x.dim() <= 2:
        return x
    first = x[(0,) * (x.dim() - 2)]
    return first if bool(torch.equal(first.expand_as(x), x)) else x


def _noise_at(gp: ExactGP, n: int) -> Tensor:
    """The likelihood's noise variances at ``n`` new points ``(*batch, n)``; a fixed-noise likelihood: the mean of
    its training noise (as BoTorch's ``fantasize``)."""
    if not is_fixed_noise(gp.likelihood):
        return gp.noise_covariance(n).diagonal()
    train = gp.noise_covariance(gp.kernel.num_points(gp.train_x)).diagonal()
    return train.mean(-1, keepdim=True).expand(*train.shape[:-1], n)


def _fantasy_noise(gp: ExactGP, targets: Tensor, noise: Tensor | None) -> Tensor:
    return noise if noise is not None else _noise_at(gp, targets.shape[-1]).expand_as(targets)


def _view(model: StructuredSingleTaskGP) -> StructuredSingleTaskGP:
    """A shallow copy of ``model`` sharing its modules, parameters and buffers (own registries, so assigning a
    module or attribute on the copy leaves ``model`` unchanged)."""
    new = copy.copy(model)
    for name in ("_modules", "_parameters", "_buffers", "_added_loss_terms"):
        new.__dict__[name] = dict(model.__dict__[name])
    new.prediction_strategy = None
    return new
