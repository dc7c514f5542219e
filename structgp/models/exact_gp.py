"""ExactGP: a Gaussian process with Gaussian noise that stays structured from fitting to prediction.

    y = f(x) + e,   f ~ GP(m, k),   e ~ N(0, N)
    log p(y) = -1/2 ((y - m)^T (K + N)^{-1} (y - m) + log det (K + N) + n log 2 pi)

The kernel maps the training inputs to a structured operator ``K`` (Dense, Kronecker, LowRank,
SparseLifted, BlockDiag, ...) and the likelihood adds its noise operator, so ``K + N`` keeps its
structure and every question (the marginal likelihood while fitting, the training solve and the
predictive variances) is answered by the engine :func:`structgp.plan` picks for it. Scalable models are
this same class with a structured kernel.

Posterior covariance (``posterior(x)``): a lazy :class:`PosteriorCovariance` ``K_** - left right^T``,
holding ``n_* x r`` tensors (``r = N`` for general kernels, the number of inducing points for low-rank
ones). Its variance is cheap; the ``n_* x n_*`` matrix is formed only for joint questions (``log_prob``,
joint samples, ``covariance_matrix``), by the dense Cholesky engine: fine for small test sets, and
``predict`` (chunked marginals) is the path for large ones.

Caching: the training solve (``K + N``, ``alpha = (K + N)^{-1} (y - m)`` and, for low-rank kernels,
``F^T (K + N)^{-1} F``) is computed without gradients and kept until a parameter or buffer changes (see
:class:`TrainingCache`); predictions are then differentiable with respect to the test inputs and, through
the cross-covariances, the kernel hyperparameters, but treat the training solve as a constant. Pass
``cache=False`` for gradients through everything.
"""

from __future__ import annotations

import gpytorch
import torch
from torch import Tensor, nn

from structgp.covariance import Operator
from structgp.distributions import GaussianLikelihood, MultivariateNormal
from structgp.kernels import Kernel, as_kernel
from structgp.models.fit import minimise
from structgp.models.noise import fixed_noise_at_test, noise_operator
from structgp.models.posterior_covariance import PosteriorCovariance
from structgp.models.prediction import TrainingSolve, chunk_size, dense_terms, factor_terms, solve_training
from structgp.models.training_cache import TrainingCache


class ExactGP(nn.Module):
    """An exact GP regression model on a structured kernel.

    train_x: training inputs ``(..., n, d)`` (``(n,)`` is ``(n, 1)``; whatever the kernel takes, e.g. weight
        matrices for an aggregation kernel); train_y: targets ``(..., n)``, or ``(..., n, t)`` for a kernel
        with ``t = kernel.num_tasks > 1`` outputs; kernel: a structgp kernel or a gpytorch kernel (wrapped in
        ``DenseKernel``); likelihood: a Gaussian likelihood (default: learned homoskedastic noise, a structgp
        ``GaussianLikelihood``; per-task noise, a gpytorch ``MultitaskGaussianLikelihood(rank=0)``, for
        several tasks); mean: a gpytorch mean (default ``ConstantMean``, per task for several tasks).

    Batch dims of ``train_y`` (and of the kernel's hyperparameters) give a batch of independent GPs. The
    model's parameters and buffers are cast to the dtype of ``train_y`` (float32 or float64).
    """

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        kernel: Kernel | gpytorch.kernels.Kernel,
        likelihood: nn.Module | None = None,
        mean: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.kernel = as_kernel(kernel, "kernel")
        train_x = self.kernel.check_inputs(train_x, "train_x")
        n, t = self.kernel.num_points(train_x), self.kernel.num_tasks
        train_y = _check_targets(train_y, n, t)
        batch = train_y.shape[: train_y.dim() - (2 if t > 1 else 1)]
        self.likelihood = likelihood if likelihood is not None else _default_likelihood(t, batch)
        self.mean = mean if mean is not None else _default_mean(t, batch)
        if not isinstance(self.mean, nn.Module):
            raise TypeError(f"mean: expected a gpytorch mean (a torch.nn.Module), got {type(self.mean).__name__}")
        _check_batches(train_x, batch)
        self.register_buffer("train_x", train_x)
        self.register_buffer("train_y", train_y)
        self.to(train_y.dtype)
        self._solved = TrainingCache()
        with torch.no_grad():
            self.noise_covariance(n)  # a likelihood that does not fit the data fails here, clearly

    # -- sizes ----------------------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.kernel.num_tasks

    @property
    def num_data(self) -> int:
        """``N = n t``, the number of training values."""
        return self.kernel.num_points(self.train_x) * self.num_tasks

    # -- the marginal likelihood ----------------------------------------------------------------------
    def prior_mean(self, x: Tensor) -> Tensor:
        """``m(x)`` flattened ``(..., n t)``."""
        n, t = self.kernel.num_points(x), self.num_tasks
        m = self.mean(x)
        if t == 1:
            return m
        if m.dim() >= 2 and m.shape[-2:] == (n, t):
            return m.flatten(-2)
        return m.unsqueeze(-1).expand(*m.shape, t).flatten(-2)

    def noise_covariance(self, n: int, *, test_noise: Tensor | None = None, dtype=None, device=None) -> Operator:
        """The likelihood's noise operator for ``n`` points (test points: ``test_noise`` for fixed noise)."""
        dtype = self.train_y.dtype if dtype is None else dtype
        device = self.train_y.device if device is None else device
        return noise_operator(self.likelihood, n, self.num_tasks, dtype=dtype, device=device, test_noise=test_noise)

    def train_covariance(self) -> Operator:
        """``K + N`` at the training inputs, structured."""
        k = self.kernel(self.train_x)
        return k + self.noise_covariance(self.kernel.num_points(self.train_x), dtype=k.dtype, device=k.device)

    def marginal(self, validate_args: bool | None = None) -> MultivariateNormal:
        """The marginal distribution of the training targets ``N(m(X), K + N)`` (flattened for several tasks)."""
        return MultivariateNormal(self.prior_mean(self.train_x), self.train_covariance(), validate_args=validate_args)

    def marginal_log_likelihood(self) -> Tensor:
        """``log p(y)`` ``(*batch)``, by one structured ``inv_quad_logdet``.

        The distribution's argument validation is skipped: it reads the covariance's diagonal, which is not
        cheap for every structure (a ``SparseLifted`` visits all within-row pairs of its lift) and would be
        paid at every step of a fit.
        """
        return self.marginal(validate_args=False).log_prob(self._flat_targets())

    def log_prior(self) -> Tensor:
        """The summed log densities of the hyperparameter priors (gpytorch priors and likelihood priors)."""
        total = torch.zeros((), dtype=self.train_y.dtype, device=self.train_y.device)
        for module in _prior_holders(self):
            if isinstance(module, gpytorch.Module):
                for _, owner, prior, closure, _ in module.named_priors():
                    total = total + prior.log_prob(closure(owner)).sum()
            else:
                total = total + module.log_prior()
        return total

    def loss(self) -> Tensor:
        """The fitting objective ``-(sum_batch log p(y) + log prior) / N``."""
        return -(self.marginal_log_likelihood().sum() + self.log_prior()) / self.num_data

    def fit(
        self,
        optimizer: str = "lbfgs",
        iterations: int | None = None,
        lr: float | None = None,
        progress: bool = True,
        tolerance: float = 1e-9,
    ) -> list[float]:
        """Fit the hyperparameters by maximising the exact marginal likelihood; returns the loss history.

        optimizer: ``"lbfgs"`` (``torch.optim.LBFGS``, strong-Wolfe line search; default 50 iterations, stops
        early when an iteration changes the loss by less than ``tolerance``) or ``"adam"`` (default 100
        iterations, lr 0.1); progress: a tqdm progress bar. The history starts with the initial loss.
        """
        self.train()
        return minimise(
            self.loss, self.parameters(), optimizer=optimizer, iterations=iterations, lr=lr, progress=progress,
            tolerance=tolerance, desc=f"fit {type(self.kernel).__name__}",
        )

    # -- prediction -----------------------------------------------------------------------------------
    def training_solve(self, cache: bool = True) -> TrainingSolve:
        """The solved training system; cached (computed without gradients) unless ``cache=False``."""
        if not cache:
            return self._solve_training()
        return self._solved.get(self, self._solve_training_detached)

    def _solve_training_detached(self) -> TrainingSolve:
        with torch.no_grad():
            return self._solve_training()

    def _solve_training(self) -> TrainingSolve:
        covariance = self.train_covariance()
        residual = self._flat_targets() - self.prior_mean(self.train_x)
        return solve_training(covariance, residual, self.kernel.cross_factor(self.train_x))

    def predict(
        self,
        x: Tensor,
        *,
        observation_noise: bool = False,
        noise: Tensor | None = None,
        variance: bool = True,
        cache: bool = True,
        chunk: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Posterior mean and variance at ``x``: ``(..., n_*)`` each (``(..., n_*, t)`` for several tasks).

        observation_noise: add the likelihood's noise to the variance (``noise``: the per-point test
        variances a fixed-noise likelihood needs); variance: False skips it (mean only); chunk: test points
        per chunk (default: a cross-covariance chunk of at most ``2^24`` entries).
        """
        x = self._check_test_inputs(x)
        fixed_noise_at_test(self.likelihood, observation_noise, noise)
        solved = self.training_solve(cache)
        n_test, t = self.kernel.num_points(x), self.num_tasks
        factored = solved.middle is not None
        step = chunk or chunk_size(self.num_data, solved.middle.shape[-1] if factored else None, t)
        means, variances = [], []
        for start in range(0, n_test, step):
            xc = self.kernel.take(x, start, min(start + step, n_test))
            if factored:
                mean, reduction = factor_terms(self.kernel.cross_factor(xc), solved)
            else:
                mean, reduction = dense_terms(self.kernel.cross(xc, self.train_x), solved, variance)
            means.append(self.prior_mean(xc) + mean)
            if variance:
                variances.append((self.kernel.prior_diagonal(xc) - reduction).clamp_min(0))
        mean = _cat(means)
        var = _cat(variances) if variance else None
        if variance and observation_noise:
            var = var + self.noise_covariance(n_test, test_noise=noise, dtype=var.dtype, device=var.device).diagonal()
        return self._unflatten(mean), (None if var is None else self._unflatten(var))

    def posterior(
        self, x: Tensor, *, observation_noise: bool = False, noise: Tensor | None = None, cache: bool = True
    ) -> MultivariateNormal:
        """The joint posterior ``N(mean, K_** - K_*x (K + N)^{-1} K_x*)`` at ``x`` (values flattened
        point-major for several tasks); its covariance is a lazy :class:`PosteriorCovariance`."""
        x = self._check_test_inputs(x)
        fixed_noise_at_test(self.likelihood, observation_noise, noise)
        solved = self.training_solve(cache)
        if solved.middle is not None:
            left = self.kernel.cross_factor(x)
            right = left @ solved.middle
            mean = (left @ solved.projected.unsqueeze(-1)).squeeze(-1)
        else:
            left = self.kernel.cross(x, self.train_x)
            right = solved.covariance.solve(left.mT).mT
            mean = (left @ solved.alpha.unsqueeze(-1)).squeeze(-1)
        covariance: Operator = PosteriorCovariance(self.kernel.prior(x), left, right)
        if observation_noise:
            n_test = self.kernel.num_points(x)
            covariance = covariance + self.noise_covariance(n_test, test_noise=noise)
        # PSD by construction; validation would compute the variances once more
        return MultivariateNormal(self.prior_mean(x) + mean, covariance, validate_args=False)

    def forward(self, x: Tensor) -> MultivariateNormal:
        return self.posterior(x)

    def sample(
        self, x: Tensor, sample_shape: torch.Size | tuple = (), *, observation_noise: bool = False,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Joint posterior draws ``(*sample_shape, ..., n_*)`` (``(..., n_*, t)`` for several tasks)."""
        draws = self.posterior(x, observation_noise=observation_noise, noise=noise).rsample(torch.Size(sample_shape))
        return self._unflatten(draws)

    # -- helpers --------------------------------------------------------------------------------------
    def _check_test_inputs(self, x: Tensor) -> Tensor:
        x = self.kernel.check_test_inputs(x, "x")
        if x.shape[-1] != self.train_x.shape[-1]:
            raise ValueError(
                f"x: expected {self.train_x.shape[-1]} input dimensions (the training inputs' last dim), got shape "
                f"{tuple(x.shape)}"
            )
        if x.dtype != self.train_x.dtype:
            raise TypeError(f"x: expected dtype {self.train_x.dtype} (the training inputs'), got {x.dtype}")
        if x.device != self.train_x.device:
            raise ValueError(f"x: expected device {self.train_x.device} (the training inputs'), got {x.device}")
        return x

    def _flat_targets(self) -> Tensor:
        return self.train_y.flatten(-2) if self.num_tasks > 1 else self.train_y

    def _unflatten(self, values: Tensor) -> Tensor:
        t = self.num_tasks
        return values.unflatten(-1, (-1, t)) if t > 1 else values


def _check_targets(y: Tensor, n: int, t: int) -> Tensor:
    if not isinstance(y, Tensor):
        raise TypeError(f"train_y: expected a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"train_y: expected dtype float32 or float64, got {y.dtype}")
    layout = f"(..., {n})" if t == 1 else f"(..., {n}, {t})"
    shape_ok = y.dim() >= 1 and y.shape[-1] == n if t == 1 else y.dim() >= 2 and y.shape[-2:] == (n, t)
    if not shape_ok:
        raise ValueError(
            f"train_y: expected shape {layout} to match the {n} training inputs"
            f"{f' and {t} tasks' if t > 1 else ''}, got {tuple(y.shape)}"
        )
    bad = ~torch.isfinite(y)
    if bool(bad.any()):
        raise ValueError(
            f"train_y: expected finite targets, found {int(bad.sum())} NaN/Inf value(s) "
            f"(first at index {tuple(bad.nonzero()[0].tolist())}); drop those points or impute them"
        )
    return y


def _check_batches(x: Tensor, batch: torch.Size) -> None:
    if x.layout != torch.strided or x.dim() <= 2:
        return
    try:
        torch.broadcast_shapes(x.shape[:-2], batch)
    except RuntimeError:
        raise ValueError(
            f"train_x: batch dims {tuple(x.shape[:-2])} do not broadcast with those of train_y {tuple(batch)}"
        ) from None


def _default_likelihood(t: int, batch: torch.Size) -> nn.Module:
    if t == 1:
        return GaussianLikelihood(batch_shape=tuple(batch))
    return gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=t, rank=0, batch_shape=batch)


def _default_mean(t: int, batch: torch.Size) -> nn.Module:
    if t == 1:
        return gpytorch.means.ConstantMean(batch_shape=batch)
    return gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(batch_shape=batch), num_tasks=t)


def _prior_holders(module: nn.Module):
    """The outermost gpytorch modules and modules with ``log_prior()`` below ``module`` (each prior once)."""
    for child in module.children():
        if isinstance(child, gpytorch.Module) or callable(getattr(child, "log_prior", None)):
            yield child
        else:
            yield from _prior_holders(child)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

