"""structgp models vs gpytorch models on the same data: fit time (fixed Adam iterations), test RMSE / NLL.

Three scalable GPs, each fitted by both libraries with the same optimiser, learning rate and number of
iterations from the same initial hyperparameters (float32):

    grid:      N points on a full 3-D grid with heteroskedastic (known, per-point) noise
               structgp: GridKernel + FixedNoiseGaussianLikelihood -> Kronecker + Diagonal
               gpytorch: ScaleKernel(GridKernel(RBF)) + FixedNoiseGaussianLikelihood
    ski:       N scattered points interpolated onto a latent m^3 grid (KISS-GP, cubic)
               structgp: InterpolationKernel -> SparseLifted(W, Kronecker) + noise
               gpytorch: ScaleKernel(GridInterpolationKernel(RBF))
    inducing:  N scattered points, m inducing points
               structgp: InducingPointKernel (DTC) -> LowRank + noise (Woodbury)
               gpytorch: InducingPointKernel (SGPR: the same covariance plus Titsias' trace term)

Reported: fit seconds (and per iteration), prediction seconds, RMSE of the predictive mean against the
noise-free function, and the mean negative log predictive density of noisy test targets. gpytorch
predicts with its defaults plus ``fast_pred_var`` (LOVE); structgp's predictive variances are exact for
its structure (computed with the engine ``structgp.plan`` picks; printed).

    python benchmarks/bench_models.py --size small            # this CPU, a minute or two
    python benchmarks/bench_models.py --device cuda --size full --json out.json
    python benchmarks/bench_models.py --only grid --method cg    # force structgp's iterative engine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable

import gpytorch
import torch
from gpytorch.kernels import RBFKernel, ScaleKernel

import structgp as sg
from structgp.distributions import FixedNoiseGaussianLikelihood
from structgp.kernels import GridKernel, InducingPointKernel, InterpolationKernel
from structgp.models import ExactGP

SIZES = {
    "small": dict(grid_m=12, ski_n=10_000, ski_m=10, ind_n=20_000, ind_m=64, iters=10, n_test=500),
    "full": dict(grid_m=47, ski_n=200_000, ski_m=32, ind_n=1_000_000, ind_m=512, iters=30, n_test=2000),
}
LR = 0.05
METHOD = ["auto"]  # structgp.settings(method=...) for the structgp runs (--method)


@dataclasses.dataclass
class Row:
    case: str
    impl: str
    fit_s: float | None = None
    per_iter_s: float | None = None
    predict_s: float | None = None
    rmse: float | None = None
    nll: float | None = None
    final_loss: float | None = None
    note: str = ""


# -- data -------------------------------------------------------------------------------------------
def truth(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(2 * math.pi * x[:, 0]) * torch.cos(2 * math.pi * x[:, 1]) + 0.5 * x[:, 2] ** 2


def hetero_noise(x: torch.Tensor) -> torch.Tensor:
    return 0.01 + 0.1 * x[:, 0]


def scattered(n: int, noise: float, dev: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=dev).manual_seed(seed)
    x = torch.rand(n, 3, device=dev, generator=gen)
    return x, truth(x) + noise**0.5 * torch.randn(n, device=dev, generator=gen)


# -- timing and metrics -----------------------------------------------------------------------------
def timed(fn: Callable, dev: torch.device):
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def metrics(mean, var, xt, yt, test_noise) -> tuple[float, float]:
    rmse = float((mean - truth(xt)).square().mean().sqrt())
    total = var + test_noise
    nll = 0.5 * ((yt - mean).square() / total + total.log() + math.log(2 * math.pi))
    return rmse, float(nll.mean())


def init_rbf(k: gpytorch.kernels.Kernel, lengthscale: float) -> None:
    k.lengthscale = torch.full_like(k.lengthscale, lengthscale)


# -- structgp and gpytorch runners ------------------------------------------------------------------
def run_structgp(case, model: ExactGP, xt, yt, test_noise, iters, dev) -> Row:
    with sg.settings(method=METHOD[0]):
        history, fit_s = timed(lambda: model.fit("adam", iterations=iters, lr=LR, progress=False), dev)
        plan = sg.plan(model.train_covariance())
        with torch.no_grad():
            (mean, var), pred_s = timed(lambda: model.predict(xt), dev)
    rmse, nll = metrics(mean, var, xt, yt, test_noise)
    return Row(case, "structgp", fit_s, fit_s / iters, pred_s, rmse, nll, history[-2], f"plan: {plan.method}")


class GpyGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def run_gpytorch(case, model: GpyGP, x, y, xt, yt, test_noise, iters, dev) -> Row:
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=LR)

    def fit() -> float:
        model.train()
        loss = None
        for _ in range(iters):
            opt.zero_grad()
            loss = -mll(model(x), y).sum()
            loss.backward()
            opt.step()
        return float(loss)

    final, fit_s = timed(fit, dev)

    def predict():
        model.eval()
        with torch.no_grad(), gpytorch.settings.fast_pred_var():
            f = model(xt)
            return f.mean, f.variance

    (mean, var), pred_s = timed(predict, dev)
    rmse, nll = metrics(mean, var, xt, yt, test_noise)
    return Row(case, "gpytorch", fit_s, fit_s / iters, pred_s, rmse, nll, final)


# -- cases ------------------------------------------------------------------------------------------
def case_grid(m: int, iters: int, n_test: int, dev: torch.device) -> list[Row]:
    name = f"grid {m}^3 (N={m**3}) hetero noise"
    axes = [torch.linspace(0, 1, m, device=dev) for _ in range(3)]
    x = torch.cartesian_prod(*axes)  # row-major: the last dimension fastest
    gen = torch.Generator(device=dev).manual_seed(0)
    noise = hetero_noise(x)
    y = truth(x) + noise.sqrt() * torch.randn(x.shape[0], device=dev, generator=gen)
    xt = torch.rand(n_test, 3, device=dev, generator=gen)
    yt = truth(xt) + hetero_noise(xt).sqrt() * torch.randn(n_test, device=dev, generator=gen)
    rows = []

    ks = [ScaleKernel(RBFKernel()), RBFKernel(), RBFKernel()]
    for k in (ks[0].base_kernel, ks[1], ks[2]):
        init_rbf(k, 0.3)
    model = ExactGP(x, y, GridKernel(ks, axes), likelihood=FixedNoiseGaussianLikelihood(noise)).to(dev)
    rows.append(safe(lambda: run_structgp(name, model, xt, yt, hetero_noise(xt), iters, dev), name, "structgp"))

    # gpytorch orders the full grid with the first dimension fastest
    gk = gpytorch.kernels.GridKernel(RBFKernel(ard_num_dims=3), grid=[a.cpu() for a in axes])
    init_rbf(gk.base_kernel, 0.3)
    kernel = ScaleKernel(gk).to(dev)
    xg = gk.full_grid.to(dev)
    idx = (xg * (m - 1)).round().long()
    perm = (idx[:, 0] * m + idx[:, 1]) * m + idx[:, 2]  # row-major index of each gpytorch row
    lik = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise[perm]).to(dev)
    yg = y[perm]
    gmodel = GpyGP(xg, yg, lik, kernel).to(dev)
    test_noise = hetero_noise(xt)
    rows.append(safe(lambda: run_gpytorch(name, gmodel, xg, yg, xt, yt, test_noise, iters, dev), name, "gpytorch"))
    return rows


def case_ski(n: int, m: int, iters: int, n_test: int, dev: torch.device) -> list[Row]:
    name = f"SKI N={n:.0e} onto {m}^3"
    x, y = scattered(n, 0.01, dev, seed=1)
    xt, yt = scattered(n_test, 0.01, dev, seed=2)
    h = 1.0 / (m - 3)  # cubic interpolation needs one grid point beyond the data on each side
    axes = [torch.linspace(-h, 1 + h, m, device=dev) for _ in range(3)]
    rows = []
    ks = [ScaleKernel(RBFKernel()), RBFKernel(), RBFKernel()]
    for k in (ks[0].base_kernel, ks[1], ks[2]):
        init_rbf(k, 0.3)
    model = ExactGP(x, y, InterpolationKernel(ks, axes)).to(dev)
    rows.append(safe(lambda: run_structgp(name, model, xt, yt, 0.01, iters, dev), name, "structgp"))
    base = RBFKernel(ard_num_dims=3)
    init_rbf(base, 0.3)
    kernel = ScaleKernel(gpytorch.kernels.GridInterpolationKernel(base, grid_size=m, num_dims=3))
    lik = gpytorch.likelihoods.GaussianLikelihood()
    gmodel = GpyGP(x, y, lik, kernel).to(dev)

    def gpy() -> Row:
        # gpytorch's default rank-15 pivoted Cholesky preconditioner reads rows of the interpolated
        # operator one index at a time: on a 2-core CPU one step at N = 5000 took 100 s and 18 GB; it is off
        with gpytorch.settings.max_preconditioner_size(0):
            row = run_gpytorch(name, gmodel, x, y, xt, yt, 0.01, iters, dev)
        row.note = (row.note + " no preconditioner").strip()
        return row

    rows.append(safe(gpy, name, "gpytorch"))
    return rows


def case_inducing(n: int, m: int, iters: int, n_test: int, dev: torch.device) -> list[Row]:
    name = f"inducing N={n:.0e} m={m}"
    x, y = scattered(n, 0.01, dev, seed=3)
    xt, yt = scattered(n_test, 0.01, dev, seed=4)
    z = x[:m].clone()
    rows = []
    k = ScaleKernel(RBFKernel(ard_num_dims=3))
    init_rbf(k.base_kernel, 0.3)
    model = ExactGP(x, y, InducingPointKernel(k, z, method="dtc")).to(dev)
    rows.append(safe(lambda: run_structgp(name, model, xt, yt, 0.01, iters, dev), name, "structgp"))
    base = ScaleKernel(RBFKernel(ard_num_dims=3))
    init_rbf(base.base_kernel, 0.3)
    lik = gpytorch.likelihoods.GaussianLikelihood()
    kernel = gpytorch.kernels.InducingPointKernel(base, inducing_points=z.clone(), likelihood=lik)
    gmodel = GpyGP(x, y, lik, kernel).to(dev)
    rows.append(safe(lambda: run_gpytorch(name, gmodel, x, y, xt, yt, 0.01, iters, dev), name, "gpytorch"))
    return rows


def safe(fn: Callable[[], Row], case: str, impl: str) -> Row:
    """A failing implementation is a result (its error), not a crash of the suite."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        return Row(case, impl, note=f"{type(e).__name__}: {str(e)[:140]}")


# -- output -----------------------------------------------------------------------------------------
def print_table(rows: list[Row]) -> None:
    head = f"{'case':34} {'impl':9} {'fit s':>8} {'s/iter':>8} {'pred s':>8} {'RMSE':>8} {'NLL':>8} {'loss':>8}  note"
    print(head)
    print("-" * len(head))

    def f(v, fmt):
        return format(v, fmt) if v is not None else "-".rjust(8)

    for r in rows:
        print(
            f"{r.case[:34]:34} {r.impl:9} {f(r.fit_s, '8.2f')} {f(r.per_iter_s, '8.3f')} {f(r.predict_s, '8.2f')} "
            f"{f(r.rmse, '8.4f')} {f(r.nll, '8.3f')} {f(r.final_loss, '8.3f')}  {r.note}"
        )


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--only", default="", help="comma-separated subset of: grid,ski,inducing")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    parser.add_argument("--method", default="auto", help="structgp.settings(method=...) for structgp (e.g. cg)")
    args = parser.parse_args(argv)
    METHOD[0] = args.method
    dev = torch.device(args.device)
    s = SIZES[args.size]
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", category=UserWarning, module="linear_operator")
    cases = {
        "grid": lambda: case_grid(s["grid_m"], s["iters"], s["n_test"], dev),
        "ski": lambda: case_ski(s["ski_n"], s["ski_m"], s["iters"], s["n_test"], dev),
        "inducing": lambda: case_inducing(s["ind_n"], s["ind_m"], s["iters"], s["n_test"], dev),
    }
    rows: list[Row] = []
    for key in [c for c in args.only.split(",") if c] or list(cases):
        new = cases[key]()
        for r in new:
            print(f"  {r.case}: {r.impl} done ({r.note or 'ok'})", file=sys.stderr, flush=True)
        rows += new
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(
        f"{s['iters']} Adam iterations (lr {LR}), float32, {s['n_test']} test points, on {name} "
        f"(torch {torch.__version__}, gpytorch {gpytorch.__version__})"
    )
    print_table(rows)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "size": args.size, "rows": [dataclasses.asdict(r) for r in rows]}, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
