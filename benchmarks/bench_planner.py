"""The planner's time model: calibrate its rates, then check its predictions and what ``"auto"`` picks.

``--calibrate`` measures the constants of :mod:`structgp.inference.cost_model` (``RATES``) on this machine:
the Cholesky factorisation rate, its backward's, the rate of a product with 33 columns, and the bandwidth
of a pass over a fresh ``n x n`` tensor (min of ``--reps`` runs at each ``--sizes``).

Without it, for a dense RBF kernel on 2-d inputs (lengthscale 0.2) + noise 0.01, at each size and dtype:
the plan's expected seconds of the exact (``cholesky``) and iterative (``cg``) paths, the measured
seconds of one log-likelihood value and gradient with each method forced, and the method ``"auto"``
picks. The kernel matrix is a leaf tensor (``Dense(K) + ScaledIdentity(noise)``, gradients to ``K`` and
the noise), so the timing covers the engine's work, which is what the plan predicts; with
``--kernel`` it is built from the lengthscale inside the timed call (the end-to-end training step: the
kernel's own forward and backward, the same for both methods, are then included).

    python benchmarks/bench_planner.py --calibrate
    python benchmarks/bench_planner.py --sizes 2000 4000 8000

Measured on the 2-core development CPU while other jobs ran (load column: 6-8x slower than calibrated, so
divide measured seconds by it for a rough comparison; the ratio cholesky / cg is from one process):

    dtype    n     auto      cholesky expected / measured   cg expected / measured  iters  ratio measured
    float32  2000  cholesky   0.24 s /   1.31 s              0.07 s / 0.34 s         3      3.9x
    float32  4000  cholesky   1.86 s /   7.09 s              0.25 s / 1.55 s         4      4.6x
    float32  8000  cg        14.6 s  /  84.2 s               0.92 s / 9.22 s         5      9.1x
    float64  2000  cholesky   0.50 s /   2.76 s              0.17 s / 1.24 s         2      2.2x
    float64  4000  cholesky   3.82 s /  23.2 s               0.62 s / 2.67 s         2      8.7x
    float64  8000  cg        29.9 s  / 129 s                 2.36 s / 6.11 s         2      21x
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's structgp
import structgp as sg  # noqa: E402
from structgp.covariance import Dense, ScaledIdentity  # noqa: E402
from structgp.inference.cost_model import rates  # noqa: E402


def best_time(fn: Callable[[], object], reps: int) -> float:
    """Min seconds of ``reps`` calls of ``fn`` after one warm-up call (none when ``reps == 1``: large sizes)."""
    if reps > 1:
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def spd(n: int, dtype: torch.dtype) -> torch.Tensor:
    a = torch.randn(n, n, dtype=dtype) / math.sqrt(n)
    return a @ a.mT + torch.eye(n, dtype=dtype)


def calibrate(sizes: list[int], reps: int) -> None:
    for dtype in (torch.float32, torch.float64):
        for n in sizes:
            calibrate_one(n, dtype, reps)


def calibrate_one(n: int, dtype: torch.dtype, reps: int) -> None:
    """Each rate from the fastest of ``reps`` rounds; the four measurements of a round run one after another
    (interleaved), so that load from other processes shows up as slow rounds, which the minimum skips."""
    columns = 33  # one right-hand side and the default 32 probes
    a = spd(n, dtype)
    leaf = a.clone().requires_grad_()
    y, v = torch.randn(n, 1, dtype=dtype), torch.randn(n, columns, dtype=dtype)

    def value_and_gradient():
        factor = torch.linalg.cholesky(leaf)
        white = torch.linalg.solve_triangular(factor, y, upper=False)
        (white.square().sum() + 2 * factor.diagonal().log().sum()).backward()

    kinds = {
        "factor": lambda: torch.linalg.cholesky(a),
        "gradient": value_and_gradient,
        "product": lambda: a @ v,
        "stream": lambda: a * 2.0,
    }
    best = {k: math.inf for k in kinds}
    for _ in range(reps):
        for k, fn in kinds.items():
            best[k] = min(best[k], best_time(fn, 1))
    print(
        f"{str(dtype):14s} n={n:5d}  factor {n**3 / 3 / best['factor'] / 1e9:6.1f} GF/s  "
        f"factor_backward {2 * n**3 / max(best['gradient'] - best['factor'], 1e-9) / 1e9:6.1f} GF/s  "
        f"product(c={columns}) {2 * n * n * columns / best['product'] / 1e9:6.1f} GF/s  "
        f"stream {2 * n * n * a.element_size() / best['stream'] / 1e9:6.1f} GB/s",
        flush=True,
    )


def rbf_problem(n: int, dtype: torch.dtype, kernel: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, dtype=dtype, generator=gen)
    sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    ls = torch.tensor(0.2, dtype=dtype, requires_grad=True)
    noise = torch.tensor(0.01, dtype=dtype, requires_grad=True)
    y = torch.randn(n, dtype=dtype, generator=gen)
    k_leaf = torch.exp(-0.5 * sq / 0.2**2).requires_grad_()

    def op():
        k = torch.exp(-0.5 * sq / ls**2) if kernel else k_leaf
        return Dense(k) + ScaledIdentity(noise, n)

    return op, y


def log_likelihood_and_gradient(op, y: torch.Tensor, method: str) -> float:
    with sg.settings(method=method):
        inv_quad, logdet = op().inv_quad_logdet(y)
        value = -0.5 * (inv_quad + logdet)
        value.backward()
    return float(value.detach())


def load_factor(dtype: torch.dtype) -> float:
    """Measured over expected seconds of a reference Cholesky (n = 2000) and product (33 columns) now: how
    much other processes slow this one down at the moment (1 on the machine as calibrated)."""
    n = 2000
    a, v = spd(n, dtype), torch.randn(n, 33, dtype=dtype)
    r = rates(torch.device("cpu"), dtype)
    expected = n**3 / 3 / r.factor + 2 * n * n * 33 / r.product
    return best_time(lambda: (torch.linalg.cholesky(a), a @ v), 3) / expected


def measure_methods(op, y: torch.Tensor, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """Fastest seconds and the value of each method over interleaved ``rounds``."""
    measured, values = {"cholesky": math.inf, "cg": math.inf}, {}
    for _ in range(rounds):
        for method in measured:
            t0 = time.perf_counter()
            values[method] = log_likelihood_and_gradient(op, y, method)
            measured[method] = min(measured[method], time.perf_counter() - t0)
    return measured, values


def validate(sizes: list[int], reps: int, kernel: bool, dtypes: list[torch.dtype]) -> None:
    print(
        "dtype          n      auto      | cholesky: expected  measured | cg: expected  measured  iters  "
        "|cg - cholesky| / |cholesky|  load"
    )
    for dtype in dtypes:
        if rates(torch.device("cpu"), dtype) is None:
            continue
        for n in sizes:
            op, y = rbf_problem(n, dtype, kernel)
            auto = sg.plan(op())
            expected = {auto.engine.name: auto.cost.seconds} | {a.engine: a.cost.seconds for a in auto.alternatives}
            load = load_factor(dtype)
            measured, values = measure_methods(op, y, 1 if n >= 6000 else reps)
            with sg.settings(method="cg"):
                op().inv_quad_logdet(y)
                iters = sg.last_report().iterations
            err = abs(values["cg"] - values["cholesky"]) / abs(values["cholesky"])
            print(
                f"{str(dtype):14s} {n:5d}  {auto.engine.name:9s} | {expected['cholesky']:8.2f} s "
                f"{measured['cholesky']:8.2f} s | {expected['cg']:8.2f} s {measured['cg']:8.2f} s  {iters:4d}   "
                f"{err:.1e}  {load:.1f}",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="measure the cost model's rates")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--kernel", action="store_true", help="build the kernel inside the timed call")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.calibrate:
        calibrate(args.sizes or [2000, 4000], args.reps)
    else:
        dtypes = [getattr(torch, name) for name in args.dtypes]
        validate(args.sizes or [2000, 4000, 8000], args.reps, args.kernel, dtypes)


if __name__ == "__main__":
    main()
