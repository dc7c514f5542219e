"""``python -m structgp demo``: structured GPs on an embedded synthetic spatial field, against gpytorch.

Two problems on one smooth field over the unit square (no downloads; the data are generated from a fixed
seed):

1. A gridded field with noisy observations on every cell: the kernel gives ``Kronecker``, the noise
   ``ScaledIdentity``, and structgp fits it exactly by per-factor eigendecomposition. The anchor is a
   gpytorch ``ExactGP`` (dense Cholesky) on the same data with the same hyperparameters.
2. Aggregated observations: each observation is the average of the field over a random patch of cells, with
   its own known noise variance (heteroskedastic). The covariance is ``A K A^T + D``, a ``SparseLifted``
   plus ``Diagonal``, fitted exactly by the latent-space Woodbury identity. The anchor is linear_operator's
   ``InterpolatedLinearOperator`` (its route for ``L K L^T``), answered by CG/Lanczos.
3. Seed 002 as its author wrote it: ``L K L^T + sigma I`` with an identity sparse lift ``L`` and a 3-D RBF
   grid kernel on 50^3 = 125 000 cells (float32). structgp recognises the identity lift and answers the
   Kronecker + ScaledIdentity covariance by per-factor eigendecomposition; a few Adam steps fit it at full
   size (the seed's gpytorch script asks for an N x N capacitance: 58 GiB).

For each: the method ``structgp.plan`` chose and why, the fitted hyperparameters, the accuracy against the
true field, the time of one log-likelihood evaluation (forward + backward) against the anchor, and a PNG
plot of the predictions.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gpytorch
import torch
from torch import Tensor

import structgp as sg
from structgp.distributions import FixedNoiseGaussianLikelihood
from structgp.kernels import AggregationKernel, GridKernel
from structgp.models import ExactGP

SIZES = {
    "small": dict(grid=48, latent=24, n_agg=6000, seed002=24),
    "default": dict(grid=64, latent=32, n_agg=20000, seed002=50),
}


def true_field(x: Tensor) -> Tensor:
    """The embedded smooth field on ``[0, 1]^2``: ``(n, 2) -> (n,)``."""
    a, b = x[..., 0], x[..., 1]
    return torch.sin(6 * a) * torch.cos(4 * b) + 0.5 * torch.exp(-((a - 0.3) ** 2 + (b - 0.7) ** 2) / 0.02)


def grid_points(m: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The axis ``(m,)`` and the row-major grid points ``(m^2, 2)``."""
    axis = torch.linspace(0, 1, m, dtype=dtype, device=device)
    pts = torch.cartesian_prod(axis, axis)
    return axis, pts


def matern_factors(lengthscale: float = 0.2, outputscale: float = 1.0) -> list[gpytorch.kernels.Kernel]:
    """One Matern-5/2 kernel a dimension (the first scaled): a product kernel over the grid."""
    first = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5))
    first.base_kernel.lengthscale = lengthscale
    first.outputscale = outputscale
    second = gpytorch.kernels.MaternKernel(nu=2.5)
    second.lengthscale = lengthscale
    return [first, second]


@dataclass
class Timing:
    structgp_ms: float
    anchor_ms: float
    anchor_rel_err: float | None


def time_call(fn: Callable[[], Tensor], reps: int = 3) -> tuple[float, float]:
    """(median ms, value) of ``fn``, after a warm-up call."""
    fn()
    times, value = [], math.nan
    for _ in range(reps):
        t0 = time.perf_counter()
        value = float(fn())
        times.append(1e3 * (time.perf_counter() - t0))
    return sorted(times)[len(times) // 2], value


def _ll_with_gradient(model: ExactGP) -> Tensor:
    """structgp's exact log marginal likelihood and its gradient (one evaluation of the fitting loop)."""
    model.zero_grad()
    value = model.marginal_log_likelihood().sum()
    value.backward()
    return value.detach()


# -- problem 1: a full grid --------------------------------------------------------------------------------
def grid_problem(m: int, dev: torch.device, progress: bool | None) -> dict:
    dtype = torch.float64
    gen = torch.Generator(device="cpu").manual_seed(1)
    axis, x = grid_points(m, dtype, dev)
    f = true_field(x)
    y = f + 0.1 * torch.randn(f.shape, generator=gen, dtype=dtype).to(dev)
    model = ExactGP(x, y, GridKernel(matern_factors(), [axis, axis])).to(dev)
    print(f"\n[1] {m} x {m} grid, {m * m} noisy observations (homoskedastic noise, learned)")
    print(_indent(str(sg.plan(model.train_covariance()))))
    model.fit(progress=progress, iterations=30)
    mean, var = model.predict(x)
    rmse = float((mean.detach() - f).square().mean().sqrt())
    params = _grid_params(model.kernel.grid.kernels, model.likelihood.noise)
    timing = _grid_timing(model, x, y, dev)
    return dict(name="grid", n=m * m, plan=sg.plan(model.train_covariance()), params=params, rmse=rmse,
                timing=timing, mean=mean.reshape(m, m), std=var.sqrt().reshape(m, m), truth=f.reshape(m, m))


def _grid_timing(model: ExactGP, x: Tensor, y: Tensor, dev: torch.device) -> Timing:
    """One log-likelihood evaluation (forward + backward): structgp vs a gpytorch dense ExactGP."""

    sg_ms, sg_value = time_call(lambda: _ll_with_gradient(model))
    gp = _gpytorch_twin(model, x, y).to(dev)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    gp.train()

    def gpytorch_ll() -> Tensor:
        gp.zero_grad()
        with gpytorch.settings.max_cholesky_size(10**9):  # exact (dense Cholesky), locally scoped
            value = mll(gp(x), y) * y.shape[-1]
        value.backward()
        return value.detach()

    gp_ms, gp_value = time_call(gpytorch_ll, reps=1)
    return Timing(sg_ms, gp_ms, abs(gp_value - sg_value) / abs(sg_value))


def _gpytorch_twin(model: ExactGP, x: Tensor, y: Tensor):
    """A gpytorch ExactGP with the product kernel and hyperparameters of ``model``."""
    first, second = model.kernel.grid.kernels
    k1 = gpytorch.kernels.ScaleKernel(gpytorch.kernels.MaternKernel(nu=2.5, active_dims=[0]))
    k1.outputscale = first.outputscale.detach()
    k1.base_kernel.lengthscale = first.base_kernel.lengthscale.detach()
    k2 = gpytorch.kernels.MaternKernel(nu=2.5, active_dims=[1])
    k2.lengthscale = second.lengthscale.detach()
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    likelihood.noise = model.likelihood.noise.detach()

    class Twin(gpytorch.models.ExactGP):
        def __init__(self) -> None:
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.mean_module.constant.data.fill_(float(model.mean.constant))
            self.covar_module = gpytorch.kernels.ProductKernel(k1, k2)

        def forward(self, z: Tensor):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))

    return Twin().to(x.dtype)


def _grid_params(kernels, noise: Tensor) -> dict:
    first, second = kernels
    return {
        "outputscale": first.outputscale.item(),
        "lengthscale_1": first.base_kernel.lengthscale.item(),
        "lengthscale_2": second.lengthscale.item(),
        "noise": noise.reshape(-1)[0].item(),
    }


# -- problem 2: aggregated observations -------------------------------------------------------------------
def aggregation_weights(m: int, n: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """``(n, m^2)`` sparse CSR: observation ``i`` averages a random ``w x h`` patch of cells (``1 <= w, h <= 4``)."""
    rows, cols, vals = [], [], []
    corner = torch.randint(0, m - 3, (n, 2), generator=gen)
    size = torch.randint(1, 5, (n, 2), generator=gen)
    for dx in range(4):
        for dy in range(4):
            inside = (dx < size[:, 0]) & (dy < size[:, 1])
            idx = inside.nonzero().squeeze(-1)
            rows.append(idx)
            cols.append((corner[idx, 0] + dx) * m + corner[idx, 1] + dy)
            vals.append(1.0 / (size[idx, 0] * size[idx, 1]).to(dtype))
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    coo = torch.sparse_coo_tensor(index, torch.cat(vals), (n, m * m), check_invariants=False)
    return coo.coalesce().to_sparse_csr()


def aggregation_problem(m: int, n: int, dev: torch.device, progress: bool | None) -> dict:
    dtype = torch.float64
    gen = torch.Generator(device="cpu").manual_seed(2)
    axis, cells = grid_points(m, dtype, dev)
    weights = aggregation_weights(m, n, gen, dtype).to(dev)
    f = true_field(cells)
    noise = (0.01 + 0.2 * torch.rand(n, generator=gen, dtype=dtype)).to(dev)
    y = (weights @ f.unsqueeze(-1)).squeeze(-1) + noise.sqrt() * torch.randn(n, generator=gen, dtype=dtype).to(dev)
    model = ExactGP(weights, y, AggregationKernel(matern_factors(), [axis, axis]),
                    likelihood=FixedNoiseGaussianLikelihood(noise)).to(dev)
    print(f"\n[2] {n} aggregated observations (patch averages, heteroskedastic known noise) of a {m} x {m} field")
    print(_indent(str(sg.plan(model.train_covariance()))))
    model.fit(progress=progress, iterations=30)
    identity = torch.eye(m * m, dtype=dtype, device=dev).to_sparse_csr()
    mean, var = model.predict(identity)
    rmse = float((mean.detach() - f).square().mean().sqrt())
    params = _grid_params(model.kernel.grid.kernels, torch.tensor(float("nan")))
    params.pop("noise")
    timing = _lifted_timing(model, weights, y, noise, m)
    return dict(name="aggregated", n=n, plan=sg.plan(model.train_covariance()), params=params, rmse=rmse,
                timing=timing, mean=mean.reshape(m, m), std=var.sqrt().reshape(m, m), truth=f.reshape(m, m))


def _lifted_timing(model: ExactGP, weights: Tensor, y: Tensor, noise: Tensor, m: int) -> Timing:
    """One log-likelihood evaluation: structgp's exact path vs linear_operator's InterpolatedLinearOperator."""
    from linear_operator.operators import DiagLinearOperator, InterpolatedLinearOperator, KroneckerProductLinearOperator

    sg_ms, sg_value = time_call(lambda: _ll_with_gradient(model))
    idx, vals = _padded_rows(weights)
    first, second = model.kernel.grid.kernels
    axis = model.kernel.grid.axes[0]
    mean = float(model.mean.constant)

    def anchor_ll() -> Tensor:
        k1 = first(axis).to_dense()
        k2 = second(axis).to_dense()
        k1.requires_grad_(True)
        cov = InterpolatedLinearOperator(KroneckerProductLinearOperator(k1, k2), idx, vals, idx, vals)
        cov = cov + DiagLinearOperator(noise)
        r = (y - mean).unsqueeze(-1)
        inv_quad, logdet = cov.inv_quad_logdet(inv_quad_rhs=r, logdet=True)
        value = -0.5 * (inv_quad + logdet + y.shape[-1] * math.log(2 * math.pi))
        value.backward()
        return value.detach()

    lo_ms, lo_value = time_call(anchor_ll, reps=1)
    return Timing(sg_ms, lo_ms, abs(lo_value - sg_value) / abs(sg_value))


def _padded_rows(weights: Tensor) -> tuple[Tensor, Tensor]:
    """CSR weights as the (n, k) index/value pairs linear_operator's interpolation takes (zero-padded)."""
    crow, col, val = weights.crow_indices(), weights.col_indices(), weights.values()
    counts = crow[1:] - crow[:-1]
    k = int(counts.max())
    row = torch.repeat_interleave(torch.arange(weights.shape[0], device=col.device), counts)
    slot = torch.arange(col.shape[0], device=col.device) - crow[:-1].repeat_interleave(counts)
    idx = torch.zeros(weights.shape[0], k, dtype=torch.long, device=col.device)
    vals = torch.zeros(weights.shape[0], k, dtype=val.dtype, device=col.device)
    idx[row, slot], vals[row, slot] = col, val
    return idx, vals


# -- problem 3: seed 002 at full size ------------------------------------------------------------------------
def seed002_problem(m: int, dev: torch.device, steps: int = 15) -> None:
    """An identity lift of an ``m^3`` RBF grid plus learned noise and mean, fitted by Adam (float32)."""
    dtype = torch.float32
    gen = torch.Generator(device="cpu").manual_seed(3)
    axis = torch.linspace(-5, 5, m, dtype=dtype, device=dev)
    x = torch.cartesian_prod(axis, axis, axis)
    f = torch.sin(x[:, 0]) * torch.cos(0.7 * x[:, 1]) + 0.3 * x[:, 2].div(5).square()
    n = m**3
    y = f + 0.3 * torch.randn(n, generator=gen, dtype=dtype).to(dev)
    idx = torch.arange(n, device=dev)
    lift = torch.sparse_coo_tensor(torch.stack([idx, idx]), torch.ones(n, dtype=dtype, device=dev), (n, n))
    rbf = gpytorch.kernels.RBFKernel().to(device=dev, dtype=dtype)  # one lengthscale for the three axes
    raw_noise = torch.tensor(0.0, dtype=dtype, device=dev, requires_grad=True)
    mean = torch.tensor(0.0, dtype=dtype, device=dev, requires_grad=True)

    def covariance():
        k = rbf(axis.unsqueeze(-1)).to_dense()
        grid = sg.covariance.Kronecker(k, k, k)
        return sg.covariance.SparseLifted(lift, grid) + sg.covariance.ScaledIdentity(
            torch.nn.functional.softplus(raw_noise), n)

    print(f"\n[3] seed 002: identity lift of a {m}^3 RBF grid, N = {n} observations (float32)")
    with torch.no_grad():
        print(_indent(str(sg.plan(covariance()))))
    opt = torch.optim.Adam([*rbf.parameters(), raw_noise, mean], lr=0.1)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = -sg.distributions.MultivariateNormal(mean.expand(n), covariance()).log_prob(y) / n
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    with torch.no_grad():
        cov = covariance()
        alpha = cov.solve(y - mean)
        post = mean + cov.base.base @ alpha  # K (K + s I)^{-1} (y - mu): Kronecker products only
    rmse = float((post - f).square().mean().sqrt())
    print(f"    fitted: lengthscale={float(rbf.lengthscale):.3g}, "
          f"noise={float(torch.nn.functional.softplus(raw_noise)):.3g}, mean={float(mean):.3g}")
    print(f"    RMSE of the posterior mean against the true field: {rmse:.4f}")
    print(f"    {steps} Adam steps (log-likelihood + gradient + step): median {1e3 * sorted(times)[steps // 2]:.0f} ms "
          f"a step; last report: {sg.last_report()}")


# -- report -----------------------------------------------------------------------------------------------
def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def report(result: dict, anchor: str) -> None:
    t: Timing = result["timing"]
    params = ", ".join(f"{k}={v:.3g}" for k, v in result["params"].items())
    print(f"    fitted: {params}")
    print(f"    RMSE of the posterior mean against the true field: {result['rmse']:.4f}")
    err = ""
    if t.anchor_rel_err is not None:
        err = f"; its value differs from structgp's exact one by {t.anchor_rel_err:.1e} (relative)"
    print(f"    log-likelihood + gradient: structgp {t.structgp_ms:.1f} ms, {anchor} {t.anchor_ms:.1f} ms "
          f"({t.anchor_ms / t.structgp_ms:.1f}x){err}")


def plot(results: list[dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("    (matplotlib is not installed: no plot written)")
        return None
    fig, axes = plt.subplots(len(results), 3, figsize=(11, 3.6 * len(results)), squeeze=False)
    for row, res in zip(axes, results):
        for ax, key, title in zip(row, ("truth", "mean", "std"), ("true field", "posterior mean", "posterior std")):
            im = ax.imshow(res[key].detach().cpu().numpy(), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
            ax.set_title(f"{res['name']}: {title}")
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m structgp demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--size", choices=sorted(SIZES), default="default")
    parser.add_argument("--out", default="demo_out", help="folder for the plot")
    bars = parser.add_mutually_exclusive_group()  # default: progress bars only on a terminal
    bars.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress bars")
    bars.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    parser.set_defaults(progress=None)
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    size = SIZES[args.size]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"structgp {sg.__version__} demo on {dev} (float64)")
    grid = grid_problem(size["grid"], dev, args.progress)
    report(grid, "gpytorch ExactGP (dense Cholesky)")
    agg = aggregation_problem(size["latent"], size["n_agg"], dev, args.progress)
    report(agg, "linear_operator InterpolatedLinearOperator (CG)")
    seed002_problem(size["seed002"], dev)
    path = plot([grid, agg], out / "demo_predictions.png")
    if path is not None:
        print(f"\nplot: {path}")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0

