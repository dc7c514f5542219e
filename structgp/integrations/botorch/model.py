"""BoTorchModel: a structgp ExactGP as a BoTorch ``Model`` (with ``FantasizeMixin``).

BoTorch's acquisition functions see an ordinary model; every number comes from structgp. ``posterior(X)`` for
``X`` ``(*b, q, d)`` is the gp's joint posterior over each ``q``-point set, from its cached structured training
solve (one solve for all ``b`` sets, a dense ``q x q`` covariance each, see :mod:`.joint`), handed over as a
Cholesky-root operator (:mod:`.posterior`). Nothing goes through gpytorch's prediction strategy or
linear_operator's settings, which ``import botorch`` changes.

``condition_on_observations`` (and so ``fantasize``) returns a view of the same gp conditioned on the new data
by a Schur-complement update (:mod:`.conditioning`): the training factorisation is reused whatever its
structure, and the fantasy dims of ``Y`` become batch dims of the new model. A ``subset_output`` view is
conditioned on observations of its outputs only (:mod:`.output_subset`): independent outputs as BoTorch's
``ModelListGP`` of those outputs, correlated tasks by exact conditioning on the observed tasks' values.

Outputs (see :mod:`.layout`): one output; a multitask kernel's ``t`` correlated outputs; or independent outputs
as the gp's last batch dim (``batched_outputs=True``). Transforms follow BoTorch: the gp holds the
*transformed* training data (``from_data`` applies them), ``posterior`` applies ``input_transform`` to ``X`` and
untransforms the posterior with ``outcome_transform``; ``model(X)`` (``forward``) transforms ``X`` only in
training mode (in eval mode ``X`` is already transformed, as BoTorch's own models expect).

SingleTaskGP's conventions: ``BoTorchModel(train_X, train_Y, train_Yvar, likelihood, covar_module, mean_module,
outcome_transform, input_transform)`` builds the gp with SingleTaskGP's defaults (kernel, likelihood and priors,
``Standardize``); ``from_data`` has the same default kernel and ``Standardize``. ``model.likelihood`` is a
gpytorch likelihood (a structgp one is seen through :class:`.likelihood.GPyTorchLikelihoodView`), so gpytorch's
``ExactMarginalLogLikelihood`` and BoTorch's ``SumMarginalLogLikelihood`` accept the model; the training data
are not in the state dict, and ``load_state_dict`` treats the outcome transform as BoTorch's models do
(``keep_transforms``), so warm starts across data sizes work.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import gpytorch
import torch
from botorch.models.model import FantasizeMixin, Model
from botorch.models.utils.gpytorch_modules import get_gaussian_likelihood_with_lognormal_prior
from botorch.posteriors import GPyTorchPosterior
from botorch.utils.types import DEFAULT
from gpytorch.models import GP
from torch import Tensor, nn

from structgp.distributions import FixedNoiseGaussianLikelihood
from structgp.integrations.botorch.conditioning import Observations
from structgp.integrations.botorch.from_data import gp_from_data, output_batch
from structgp.integrations.botorch.joint import gp_joint
from structgp.integrations.botorch.layout import Layout
from structgp.integrations.botorch.likelihood import GPyTorchLikelihoodView
from structgp.integrations.botorch.output_subset import OutputObservations, joint_given
from structgp.integrations.botorch.posterior import botorch_posterior
from structgp.models import ExactGP


class BoTorchModel(Model, FantasizeMixin, GP):
    """A fitted structgp :class:`~structgp.models.ExactGP` as a BoTorch model.

    gp: the model (its training data already input- and outcome-transformed, see :meth:`from_data`);
    batched_outputs: the gp's last batch dim holds independent outputs (``train_y`` ``(..., m, n)``);
    input_transform / outcome_transform: BoTorch transforms, already fitted to the training data.

    Or, as ``SingleTaskGP``: ``BoTorchModel(train_X, train_Y, train_Yvar=None, likelihood=None,
    covar_module=None, mean_module=None, outcome_transform=Standardize, input_transform=None)`` (its defaults;
    ``covar_module`` any structgp or gpytorch kernel), see :meth:`from_data`.

    It is also a gpytorch ``GP`` so that ``gpytorch.mlls`` accept it: ``fit_gpytorch_mll`` then minimises the
    gp's own structured loss (``compute_custom_loss``), see :mod:`.fit`.
    """

    _supports_cache_root = False  # BoTorch's root caching needs gpytorch's prediction strategy
    _ensemble = False  # EnsembleModel: the gp's leading batch dim holds hyperparameter samples

    def __init__(
        self,
        gp: ExactGP | Tensor,
        train_Y: Tensor | None = None,
        train_Yvar: Tensor | None = None,
        likelihood: nn.Module | None = None,
        covar_module: nn.Module | None = None,
        mean_module: nn.Module | None = None,
        outcome_transform: Any = DEFAULT,
        input_transform: nn.Module | None = None,
        *,
        batched_outputs: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(gp, Tensor):  # SingleTaskGP's arguments: build the gp with its defaults
            if likelihood is None and train_Yvar is None:
                likelihood = get_gaussian_likelihood_with_lognormal_prior(batch_shape=output_batch(gp, train_Y))
            gp, batched_outputs, input_transform, outcome_transform = gp_from_data(
                gp, train_Y, covar_module, train_Yvar, likelihood, mean_module, input_transform, outcome_transform
            )
        elif not isinstance(gp, ExactGP):
            raise TypeError(
                f"gp: expected a structgp.models.ExactGP (or SingleTaskGP's train_X), got {type(gp).__name__}"
            )
        elif any(a is not None for a in (train_Y, train_Yvar, likelihood, covar_module, mean_module)):
            raise TypeError("train_Y, ...: SingleTaskGP's data arguments go with train_X, not with a gp")
        outcome_transform = None if outcome_transform is DEFAULT else outcome_transform
        self.gp = gp
        self._layout = self._make_layout(gp, batched_outputs)
        self._batched_outputs = batched_outputs
        self._steps: tuple[Observations, ...] = ()
        self._outputs: list[int] | None = None
        if input_transform is not None:
            self.input_transform = input_transform
        if outcome_transform is not None:
            self.outcome_transform = outcome_transform.eval()

    @classmethod
    def _make_layout(cls, gp: ExactGP, batched_outputs: bool) -> Layout:
        if gp.num_tasks > 1:
            if batched_outputs:
                raise ValueError("batched_outputs: a multitask gp holds its outputs as tasks; pass False")
            return Layout("tasks", gp.num_tasks, cls._ensemble)
        if batched_outputs:
            if gp.train_y.dim() < 2:
                raise ValueError(
                    "batched_outputs: expected the gp's train_y to be (..., m, n) with one batch member per "
                    f"output, got shape {tuple(gp.train_y.shape)}"
                )
            return Layout("batch", gp.train_y.shape[-2], cls._ensemble)
        return Layout("single", 1, cls._ensemble)

    @classmethod
    def from_data(
        cls,
        train_X: Tensor,
        train_Y: Tensor,
        kernel=None,
        *,
        train_Yvar: Tensor | None = None,
        likelihood: nn.Module | None = None,
        mean: nn.Module | None = None,
        input_transform: nn.Module | None = None,
        outcome_transform: Any = DEFAULT,
    ) -> BoTorchModel:
        """Build the gp from BoTorch-style data, fitting the transforms first (as BoTorch's models do).

        train_X ``(*b, n, d)``, train_Y ``(*b, n, m)``, train_Yvar (observed noise, same shape as train_Y: a
        structgp ``FixedNoiseGaussianLikelihood``); kernel: a structgp or gpytorch kernel (default
        SingleTaskGP's: an ARD RBF kernel with its dimension-scaled priors); outcome_transform: default
        ``Standardize`` (as SingleTaskGP; None for none); likelihood: default a structgp
        ``GaussianLikelihood``. ``m > 1`` outputs are the tasks of a multitask kernel (``kernel.num_tasks ==
        m``), else independent outputs as a batch (give the kernel ``batch_shape=(m,)`` for separate
        hyperparameters). The gp is returned unfitted inside the model (``model.gp.fit()`` or
        ``fit_gpytorch_mll``).
        """
        gp, batched, input_transform, outcome_transform = gp_from_data(
            train_X, train_Y, kernel, train_Yvar, likelihood, mean, input_transform, outcome_transform
        )
        return cls(gp, batched_outputs=batched, input_transform=input_transform, outcome_transform=outcome_transform)

    # -- what BoTorch asks ----------------------------------------------------------------------------
    @property
    def num_outputs(self) -> int:
        return self._layout.outputs if self._outputs is None else len(self._outputs)

    @property
    def batch_shape(self) -> torch.Size:
        """The gp's batch (without an output dim; an ensemble's sample dim included), broadcast with the batch
        dims of the observations conditioned on (fantasies)."""
        layout = self._layout
        shapes = [layout.model_batch(self.gp.training_solve().alpha.shape[:-1])]
        for obs in self._steps:  # values of a "batch" layout carry (some of) the outputs as a last batch dim
            shapes += [layout.model_batch(obs.x.shape[:-2]), layout.model_batch(obs.y.shape[:-1])]
        return torch.broadcast_shapes(*shapes)

    @property
    def likelihood(self) -> gpytorch.likelihoods.Likelihood:
        """The gp's likelihood as a gpytorch likelihood (a structgp one through a
        :class:`.likelihood.GPyTorchLikelihoodView` of it, the same parameters)."""
        lik = self.gp.likelihood
        if isinstance(lik, gpytorch.likelihoods.Likelihood):
            return lik
        view = self.__dict__.get("_likelihood_view")  # not a registered module: its parameters are the gp's
        if view is None or view.structgp_likelihood is not lik:
            view = GPyTorchLikelihoodView(lik)
            self.__dict__["_likelihood_view"] = view
        return view

    def posterior(
        self,
        X: Tensor,
        output_indices: list[int] | None = None,
        observation_noise: bool | Tensor = False,
        posterior_transform=None,
        **kwargs: Any,
    ) -> GPyTorchPosterior:
        """The joint posterior at ``X`` ``(*b, q, d)`` (outputs ``(*b', q, m)``, ``b'`` broadcasting ``b`` with
        :attr:`batch_shape`).

        observation_noise: True adds the likelihood's noise (a fixed-noise likelihood: the mean of its
        training noise, per output, as BoTorch does); a tensor ``(*b, q, m)`` (outcome-transformed) is added
        as is. The result is differentiable with respect to ``X``.
        """
        self.eval()
        if not isinstance(X, Tensor) or X.dim() < 2:
            raise ValueError(f"X: expected a tensor (..., q, d), got {getattr(X, 'shape', type(X).__name__)}")
        X_tf = self.transform_inputs(X)
        q = X_tf.shape[-2]
        mean, cov = self._joint(self._layout.model_inputs(X_tf))
        if observation_noise is not False:
            cov = cov + torch.diag_embed(self._test_noise(observation_noise, q))
        outputs = self._absolute(output_indices)
        posterior = botorch_posterior(mean, cov, self._layout, q, outputs, mixture=self._layout.ensemble)
        if hasattr(self, "outcome_transform"):
            tf = (
                self.outcome_transform
                if output_indices is None
                else self.outcome_transform.subset_output(output_indices)
            )
            posterior = tf.untransform_posterior(posterior, X=X_tf)
        if posterior_transform is not None:
            posterior = posterior_transform(posterior)
        return posterior

    def forward(self, X: Tensor) -> gpytorch.distributions.MultivariateNormal:
        """The posterior distribution at ``X`` in the model's (outcome-transformed) space. ``X`` is transformed
        only in training mode: in eval mode it is already (BoTorch's ``posterior`` transforms, then calls the
        model, e.g. in ``get_pvar_expected``)."""
        X_tf = self.transform_inputs(X) if self.training else X
        mean, cov = self._joint(self._layout.model_inputs(X_tf))
        return botorch_posterior(mean, cov, self._layout, X_tf.shape[-2], self._outputs).distribution

    def condition_on_observations(self, X: Tensor, Y: Tensor, noise: Tensor | None = None, **kwargs: Any):
        """This model conditioned on ``Y`` ``(*b', n', m)`` observed at ``X`` ``(*b, n', d)`` (leading dims of
        ``Y``, e.g. fantasies, become batch dims); ``noise``: their observed noise variances (same shape as
        ``Y``, outcome-transformed), default the likelihood's. The new model shares this one's gp, its
        hyperparameters and cached training solve.

        On a ``subset_output`` view, ``m`` is the view's outputs and only they are observed: the result is the
        gp conditioned on those outputs' new data (see :mod:`.output_subset`), still viewing those outputs."""
        self.eval()
        X_tf = self.transform_inputs(X)
        if hasattr(self, "outcome_transform"):
            Y, _ = self.outcome_transform(Y, X=X_tf)
        return self._conditioned_on(X_tf, Y, noise)

    def _conditioned_on(self, X_tf: Tensor, Y: Tensor, noise: Tensor | None) -> BoTorchModel:
        """:meth:`condition_on_observations` with transformed inputs and outcomes."""
        if Y.shape[-2] != X_tf.shape[-2]:
            raise ValueError(f"Y: expected {X_tf.shape[-2]} observations (as X), got shape {tuple(Y.shape)}")
        layout = self._view_layout()
        parts = (
            self._layout.model_inputs(X_tf),
            layout.to_values(Y, "Y"),
            None if noise is None else layout.to_values(noise.expand_as(Y), "noise"),
        )
        if self._outputs is None:
            obs = Observations(*parts)
        else:
            if self._layout.kind == "batch" and len(set(self._outputs)) < len(self._outputs):
                raise ValueError(
                    f"condition_on_observations: this view repeats independent outputs {self._outputs}; observations "
                    "of one output must come in one column (subset_output without repeated indices)"
                )
            obs = OutputObservations(*parts, outputs=tuple(self._outputs))
        return self._view(steps=self._steps + (obs,))

    def subset_output(self, idcs: list[int]) -> BoTorchModel:
        """A view of the outputs ``idcs`` (posteriors over those outputs only); all outputs in order: ``self``."""
        idcs = list(idcs)
        if not idcs or any(not 0 <= i < self.num_outputs for i in idcs):
            raise ValueError(f"idcs: expected indices in [0, {self.num_outputs}), got {idcs}")
        if idcs == list(range(self.num_outputs)):
            return self
        tf = getattr(self, "outcome_transform", None)
        return self._view(
            outputs=self._absolute(idcs), outcome_transform=None if tf is None else tf.subset_output(idcs)
        )

    def get_fantasy_model(self, inputs: Tensor, targets: Tensor, noise: Tensor | None = None, **kwargs: Any):
        """gpytorch's fantasy hook (``ModelListGP.condition_on_observations`` calls it): this model conditioned on
        already outcome-transformed ``targets`` ``(*b', n')`` (one output) at ``inputs`` ``(*b, n', d)``."""
        if self.num_outputs != 1:
            raise NotImplementedError("get_fantasy_model: one-output models only; use condition_on_observations")
        self.eval()
        return self._conditioned_on(inputs, targets.unsqueeze(-1), None if noise is None else noise.unsqueeze(-1))

    # -- warm starts -----------------------------------------------------------------------------------
    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, keep_transforms: bool = True, assign: bool = False
    ):
        """Load hyperparameters (and transforms' state) from a model on any data (the training data are not in
        the state dict). With ``keep_transforms`` and an outcome transform, the training targets (and observed
        noise) are re-transformed with the loaded transform, as BoTorch's models do."""
        tf = getattr(self, "outcome_transform", None)
        if not keep_transforms or tf is None or self._steps or self._outputs is not None:
            return nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
        with torch.no_grad():
            y, yvar = tf.untransform(*self._training_outcomes())
        result = nn.Module.load_state_dict(self, state_dict, strict=strict, assign=assign)
        tf.eval()
        with torch.no_grad():
            self._set_training_outcomes(*tf(y, yvar))
        return result

    def _training_outcomes(self) -> tuple[Tensor, Tensor | None]:
        """The gp's (transformed) targets and observed noise as outcomes ``(*b, n, m)``."""
        gp, layout = self.gp, self._layout
        yvar = _fixed_variances(gp.likelihood)
        return layout.from_targets(gp.train_y), (None if yvar is None else layout.from_values(yvar))

    def _set_training_outcomes(self, y: Tensor, yvar: Tensor | None) -> None:
        gp, layout = self.gp, self._layout
        gp.set_train_data(targets=layout.to_targets(y))
        if yvar is not None:
            _set_fixed_variances(gp.likelihood, layout.to_values(yvar, "train_Yvar"))

    # -- fitting (botorch.fit.fit_gpytorch_mll) --------------------------------------------------------
    def compute_custom_loss(self, mll=None, **kwargs: Any) -> Tensor:
        """The loss ``fit_gpytorch_mll`` minimises: the gp's structured ``-(log p(y) + log prior) / n``."""
        return self.gp.loss()

    # -- BoTorch hooks that would rewrite training inputs: the gp already holds transformed ones --------
    def _set_transformed_inputs(self) -> None:
        pass

    def _revert_to_original_inputs(self) -> None:
        pass

    # -- helpers --------------------------------------------------------------------------------------
    def _joint(self, x: Tensor) -> tuple[Tensor, Tensor]:
        base = functools.partial(gp_joint, self.gp)
        return joint_given(base, self._steps, self._layout, self._noise_values, x)

    def _view_layout(self) -> Layout:
        """The layout of this model's outcomes (the gp's, narrowed to a view's outputs)."""
        if self._outputs is None:
            return self._layout
        return Layout(self._layout.kind, len(self._outputs), self._layout.ensemble)

    def _noise_values(self, n: int) -> Tensor:
        """The likelihood's noise variances at ``n`` new points, as values (a fixed-noise likelihood: the mean
        of its training noise per output)."""
        gp = self.gp
        if not _is_fixed_noise(gp.likelihood):
            return gp.noise_covariance(n).diagonal()
        train = gp.noise_covariance(gp.kernel.num_points(gp.train_x)).diagonal()
        if self._layout.kind == "tasks":
            t = self._layout.outputs
            return train.unflatten(-1, (-1, t)).mean(-2, keepdim=True).expand(*train.shape[:-1], n, t).flatten(-2)
        return train.mean(-1, keepdim=True).expand(*train.shape[:-1], n)

    def _test_noise(self, observation_noise: bool | Tensor, q: int) -> Tensor:
        if not isinstance(observation_noise, Tensor):
            return self._noise_values(q)
        if observation_noise.dim() >= 2:  # (..., 1, m) (BoTorch's fantasize) holds one variance per output
            observation_noise = observation_noise.expand(*observation_noise.shape[:-2], q, observation_noise.shape[-1])
        if self._outputs is not None:  # a view's columns; outputs outside the view (dropped later) get zeros
            k = len(self._outputs)
            if observation_noise.dim() < 2 or observation_noise.shape[-1] != k:
                raise ValueError(
                    f"observation_noise: expected shape (..., q, {k}) (one column per output of this view), "
                    f"got {tuple(observation_noise.shape)}"
                )
            full = observation_noise.new_zeros(*observation_noise.shape[:-1], self._layout.outputs)
            idx = torch.as_tensor(self._outputs, device=full.device)
            observation_noise = full.index_copy(-1, idx, observation_noise)
        return self._layout.to_values(observation_noise, "observation_noise")

    def _absolute(self, idcs: list[int] | None) -> list[int] | None:
        """Output indices of this model as indices of the gp's outputs."""
        if idcs is None:
            return self._outputs
        return list(idcs) if self._outputs is None else [self._outputs[i] for i in idcs]

    def _view(self, *, steps=None, outputs=None, outcome_transform=None) -> BoTorchModel:
        new = type(self)(
            self.gp,
            batched_outputs=self._batched_outputs,
            input_transform=getattr(self, "input_transform", None),
            outcome_transform=getattr(self, "outcome_transform", None)
            if outcome_transform is None
            else outcome_transform,
        )
        new._steps = self._steps if steps is None else steps
        new._outputs = self._outputs if outputs is None else outputs
        return new


def _is_fixed_noise(likelihood) -> bool:
    return isinstance(likelihood, (FixedNoiseGaussianLikelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood))


def _fixed_variances(likelihood) -> Tensor | None:
    """A fixed-noise likelihood's per-value variances (values layout), else None."""
    if isinstance(likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
        return likelihood.noise_covar.noise
    return likelihood.noise if isinstance(likelihood, FixedNoiseGaussianLikelihood) else None


def _set_fixed_variances(likelihood, values: Tensor) -> None:
    if isinstance(likelihood, gpytorch.likelihoods.FixedNoiseGaussianLikelihood):
        likelihood.noise_covar.noise = values
    else:
        likelihood.noise = values
