"""Fully Bayesian hyperparameters: Pyro NUTS over a structgp gp, turned into a BoTorch ensemble.

Every learned hyperparameter ``v`` of the gp (a parameter that requires grad, read through its constraint) is
a Pyro sample site named after it (``"kernel.base_kernel.outputscale"``), sampled on an unbounded scale:

    z = log(v - l)               a lower bound l only (GreaterThan, Positive: z = log v)
    z = log(u - v)               an upper bound u only (LessThan)
    z = logit((v - a) / (b - a)) both bounds (Interval(a, b), GreaterThan/LessThan given both)
    z = v                        an unconstrained parameter (e.g. a constant mean)

(bounds per element where the constraint's are), with a prior over ``z``: given in ``priors``, else the prior
the model registers on ``v`` (a gpytorch prior such as ``lengthscale_prior``, a structgp ``noise_prior``)
carried over to ``z`` with the Jacobian of ``v = T(z)`` (:class:`.site_prior.TransformedValuePrior`; a prior
with mass outside the bounds is thereby restricted to them), else ``Normal(z_now, 1)`` (around the current,
e.g. fitted, value). The maps ``T`` are ``torch.distributions`` transforms (:meth:`Site.transform`). The
likelihood is the gp's exact marginal ``N(y; m, K + N)``, a structgp ``MultivariateNormal`` whose ``log_prob``
is one structured ``inv_quad_logdet``:

    p(z | y)  propto  p(y | z) prod_sites p(z_site)

NUTS draws ``s`` samples; :func:`~structgp.integrations.botorch.ensemble.batch_hyperparameters` puts them on a
batch dim of a copy of the gp, and :class:`~structgp.integrations.botorch.ensemble.EnsembleModel` presents it to
BoTorch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import init_to_value
from torch import Tensor, nn
from torch.distributions import constraints, transforms

from structgp.integrations.botorch.ensemble import EnsembleModel, batch_hyperparameters
from structgp.integrations.botorch.model import BoTorchModel
from structgp.integrations.botorch.site_prior import TransformedValuePrior
from structgp.models import ExactGP

Bound = float | Tensor | None  # a float where all elements share it, else a tensor; None: unbounded


@dataclasses.dataclass(frozen=True, eq=False)
class Site:
    """A hyperparameter sampled by NUTS: ``name`` (the value's), ``raw_name`` (the parameter's), its shape,
    its constraint (or None), the constraint's finite ``lower`` and ``upper`` bounds on the value (None: none)
    and the prior the model registers on ``v`` (or None)."""

    name: str
    raw_name: str
    shape: torch.Size
    constraint: object | None
    lower: Bound
    model_prior: torch.distributions.Distribution | None = None
    upper: Bound = None

    def transform(self, like: Tensor) -> transforms.Transform:
        """``T``: the sampled ``z`` -> the value ``v`` (elementwise; bounds cast as ``like``)."""
        lower, upper = self._bounds_as(like)
        compose, affine = transforms.ComposeTransform, transforms.AffineTransform
        if lower is not None and upper is not None:  # v = a + (b - a) sigmoid(z)
            return compose([transforms.SigmoidTransform(), affine(lower, upper - lower)])
        if lower is not None:  # v = l + exp(z)
            return compose([transforms.ExpTransform(), affine(lower, 1.0)])
        if upper is not None:  # v = u - exp(z)
            return compose([transforms.ExpTransform(), affine(upper, -1.0)])
        return transforms.identity_transform

    def values(self, like: Tensor) -> constraints.Constraint:
        """The range of :meth:`transform`, as a ``torch.distributions`` constraint."""
        lower, upper = self._bounds_as(like)
        if lower is not None and upper is not None:
            return constraints.interval(lower, upper)
        if lower is not None:
            return constraints.greater_than(lower)
        return constraints.real if upper is None else constraints.less_than(upper)

    def _bounds_as(self, like: Tensor) -> tuple[Bound, Bound]:
        return tuple(b if b is None or isinstance(b, float) else b.to(like) for b in (self.lower, self.upper))

    def to_raw(self, z: Tensor, like: Tensor) -> Tensor:
        """The raw parameter for the sampled ``z`` (cast as ``like``)."""
        value = self.transform(like)(z.to(like))
        return value if self.constraint is None else self.constraint.inverse_transform(value)

    def from_raw(self, raw: Tensor) -> Tensor:
        """The ``z`` of the raw parameter ``raw``."""
        value = raw if self.constraint is None else self.constraint.transform(raw)
        return self.transform(raw).inv(value)


def _model_prior(owner: torch.nn.Module, leaf: str) -> torch.distributions.Distribution | None:
    """The prior the owner registers on parameter ``leaf``: ``{value}_prior`` (``lengthscale_prior``), or the
    one prior of a module with one parameter (gpytorch's ``ConstantMean`` names it ``mean_prior``)."""
    prior = getattr(owner, f"{leaf.removeprefix('raw_')}_prior", None)
    if prior is None:
        own = [n for n, _ in owner.named_parameters(recurse=False)]
        registered = getattr(owner, "_priors", {})
        if own == [leaf] and len(registered) == 1:
            prior = next(iter(registered.values()))[0]
    return prior if isinstance(prior, torch.distributions.Distribution) else None


def hyperparameter_sites(gp: ExactGP, exclude: Iterable[str] = ()) -> list[Site]:
    """The gp's learned hyperparameters as sample sites (parameters that require grad, less ``exclude``:
    value or raw names), bounded as their gpytorch constraints (``lower_bound``/``upper_bound``)."""
    exclude = set(exclude)
    sites = []
    for raw_name, p in gp.named_parameters():
        owner_name, _, leaf = raw_name.rpartition(".")
        name = f"{owner_name}.{leaf.removeprefix('raw_')}" if owner_name else leaf.removeprefix("raw_")
        if not p.requires_grad or raw_name in exclude or name in exclude:
            continue
        owner = gp.get_submodule(owner_name)
        constraint = _constraint(owner, leaf)
        prior = _model_prior(owner, leaf)
        lower, upper = _bounds(constraint, name, p.shape)
        sites.append(Site(name, raw_name, p.shape, constraint, lower, model_prior=prior, upper=upper))
    if not sites:
        raise ValueError("gp: no hyperparameter to sample (no parameter requires grad, or all are excluded)")
    return sites


def nuts_model(
    gp: ExactGP, priors: Mapping[str, dist.Distribution] | None = None, exclude: Iterable[str] = ()
) -> tuple[Callable[[], None], list[Site]]:
    """The Pyro model ``p(z) p(y | z)`` of the gp's hyperparameters, and its sites.

    priors: site name -> a Pyro distribution over ``z`` (scalar ones are expanded to the site's shape);
    other sites get the model's prior on their value (as a prior over ``z``), else ``Normal(z_now, 1)``.
    """
    sites = hyperparameter_sites(gp, exclude)
    params = dict(gp.named_parameters())
    unknown = set(priors or {}) - {s.name for s in sites}
    if unknown:
        raise ValueError(f"priors: unknown site(s) {sorted(unknown)}; sites: {[s.name for s in sites]}")
    site_priors = {s.name: _prior(s, (priors or {}).get(s.name), params[s.raw_name]) for s in sites}
    marginal = _Marginal(gp)
    y = gp.train_y.flatten(-2) if gp.num_tasks > 1 else gp.train_y

    def model() -> None:
        values = {}
        for s in sites:
            z = pyro.sample(s.name, site_priors[s.name])
            values[f"gp.{s.raw_name}"] = s.to_raw(z, params[s.raw_name])
        likelihood, correction = torch.func.functional_call(marginal, values, ())
        pyro.sample("y", likelihood.to_event(len(likelihood.batch_shape)), obs=y)
        if correction is not None:  # a variational bound's term (VFE): the density fit() maximises
            pyro.factor("bound_correction", correction.sum())

    return model, sites


def nuts_ensemble(
    model: BoTorchModel | ExactGP,
    *,
    priors: Mapping[str, dist.Distribution] | None = None,
    exclude: Iterable[str] = (),
    num_samples: int = 32,
    warmup_steps: int = 64,
    thinning: int = 1,
    max_tree_depth: int = 6,
    seed: int = 0,
    progress: bool = False,
) -> EnsembleModel:
    """Run NUTS over the hyperparameters of ``model``'s gp and return the ensemble of ``num_samples`` draws.

    The chain starts at the current hyperparameters (fit them first); ``num_samples * thinning`` draws follow
    ``warmup_steps`` of step-size and mass adaptation, every ``thinning``-th is kept. The global RNG state is
    left untouched (the run uses ``seed``). The ensemble keeps ``model``'s transforms; its
    ``mcmc_samples`` are the kept ``z`` draws per site.
    """
    wrapper = model if isinstance(model, BoTorchModel) else None
    gp = wrapper.gp if wrapper is not None else model
    if not isinstance(gp, ExactGP):
        raise TypeError(f"model: expected a BoTorchModel or a structgp ExactGP, got {type(model).__name__}")
    if wrapper is not None and (wrapper._steps or wrapper._outputs is not None):
        raise ValueError("model: expected a model as fitted, not a conditioned or subset_output view")
    for name, value in (("num_samples", num_samples), ("thinning", thinning), ("max_tree_depth", max_tree_depth)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    fn, sites = nuts_model(gp, priors, exclude)
    params = dict(gp.named_parameters())
    start = {s.name: s.from_raw(params[s.raw_name]).detach() for s in sites}
    kernel = NUTS(fn, max_tree_depth=max_tree_depth, init_strategy=init_to_value(values=start))
    mcmc = MCMC(kernel, num_samples=num_samples * thinning, warmup_steps=warmup_steps, disable_progbar=not progress)
    device = gp.train_y.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        mcmc.run()
    draws = {name: z[::thinning].detach() for name, z in mcmc.get_samples().items()}
    raw = {s.raw_name: s.to_raw(draws[s.name], params[s.raw_name]).detach() for s in sites}
    ensemble_gp = batch_hyperparameters(gp, raw)
    ensemble = EnsembleModel(
        ensemble_gp,
        batched_outputs=wrapper._batched_outputs if wrapper is not None else False,
        input_transform=getattr(wrapper, "input_transform", None),
        outcome_transform=getattr(wrapper, "outcome_transform", None),
    )
    ensemble.mcmc_samples = draws
    return ensemble


class _Marginal(nn.Module):
    """``(gp.marginal(), gp.bound_correction())`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, gp: ExactGP) -> None:
        super().__init__()
        self.gp = gp

    def forward(self):
        return self.gp.marginal(), self.gp.bound_correction()


def _constraint(owner: nn.Module, leaf: str):
    for attr in (f"{leaf}_constraint", f"{leaf.removeprefix('raw_')}_constraint"):
        c = getattr(owner, attr, None)
        if c is not None and callable(getattr(c, "transform", None)):
            return c
    return None


def _bounds(constraint, name: str, shape: torch.Size) -> tuple[Bound, Bound]:
    """The constraint's finite ``(lower, upper)`` bounds (None where infinite)."""
    if constraint is None:
        return None, None
    return tuple(_bound(getattr(constraint, f"{side}_bound"), name, side, shape) for side in ("lower", "upper"))


def _bound(bound, name: str, side: str, shape: torch.Size) -> Bound:
    b = torch.as_tensor(bound).detach()
    finite = torch.isfinite(b)
    if not bool(finite.any()):
        return None
    if not bool(finite.all()):
        raise ValueError(f"{name}: its constraint's {side} bound is finite for some elements only ({b.tolist()})")
    try:
        fits = torch.broadcast_shapes(b.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name}: its constraint's {side} bound {tuple(b.shape)} does not broadcast to {tuple(shape)}")
    return float(b.flatten()[0]) if bool((b == b.flatten()[0]).all()) else b.clone()


def _prior(site: Site, prior: dist.Distribution | None, param: Tensor) -> dist.Distribution:
    if prior is None and site.model_prior is not None:
        return TransformedValuePrior(site.model_prior, site.transform(param), site.values(param), site.shape)
    if prior is None:
        loc = site.from_raw(param).detach()
        prior = dist.Normal(loc, torch.ones_like(loc))
    elif prior.event_shape == () and prior.batch_shape != site.shape:
        prior = prior.expand(site.shape)
    return prior.to_event(len(site.shape)) if prior.event_shape == () and len(site.shape) else prior
