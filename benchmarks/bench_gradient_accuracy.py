"""Value and gradient accuracy of stochastic log-likelihoods: structgp's "cg" engine with the plain
Hutchinson gradient of ``log det`` and with the preconditioner's control variate (its default), against
gpytorch / linear_operator at their default settings, in one process.

Dense RBF kernel on 2-d inputs (lengthscale 0.2, data drawn at 0.15) + noise 0.01, the cases of issue 14:
N = 2500 in float64 and N = 8000 in float32. The reference is a float64 dense Cholesky written here by hand:
value ``-1/2 (y^T a + log det A + n log 2 pi)`` and gradient ``1/2 (a^T dA a - tr(A^{-1} dA))`` with
``a = A^{-1} y``, for the lengthscale and the noise. Each stochastic method runs with ``--seeds`` seeds
(structgp ``settings(seed=...)``, gpytorch ``torch.manual_seed``); the table gives the mean and largest
relative errors over them, and the median time of forward + backward.

    python benchmarks/bench_gradient_accuracy.py                 # both cases (several minutes on a CPU)
    python benchmarks/bench_gradient_accuracy.py --cases 2500:float64 --seeds 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import environment, gauss_ll, lo_ll  # noqa: E402

import structgp as sg  # noqa: E402
from structgp.covariance import Dense, ScaledIdentity  # noqa: E402

ELL, NOISE = 0.2, 0.01


def problem(n: int, dev: torch.device):
    """Squared distances (float64), data ``y`` (float64) and the reference value and gradient."""
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(n, 2, device=dev, dtype=torch.float64, generator=gen)
    sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    eye = torch.eye(n, device=dev, dtype=torch.float64)
    chol = torch.linalg.cholesky(torch.exp(-0.5 * sq / 0.15**2) + NOISE * eye)
    y = chol @ torch.randn(n, device=dev, dtype=torch.float64, generator=gen)
    k = torch.exp(-0.5 * sq / ELL**2)
    chol = torch.linalg.cholesky(k + NOISE * eye)
    alpha = torch.cholesky_solve(y[:, None], chol).squeeze(-1)
    value = -0.5 * (y.dot(alpha) + 2 * chol.diagonal().log().sum() + n * math.log(2 * math.pi))
    a_inv = torch.cholesky_inverse(chol)
    del chol
    d_ell = k * sq / ELL**3
    del k
    grad = 0.5 * torch.stack([alpha.dot(d_ell @ alpha) - (a_inv * d_ell).sum(), alpha.dot(alpha) - a_inv.trace()])
    return sq, y, float(value), grad


def structgp_ll(control_variate: bool):
    def run(sq, y, ell, noise, seed):
        with sg.settings(method="cg", seed=seed, logdet_control_variate=control_variate):
            inv_quad, logdet = (
                Dense(torch.exp(-0.5 * sq / ell**2)) + ScaledIdentity(noise, y.shape[0])
            ).inv_quad_logdet(y)
        return gauss_ll(inv_quad, logdet, y.shape[0])

    return run


def gpytorch_ll(sq, y, ell, noise, seed):
    from linear_operator.operators import ConstantDiagLinearOperator, DenseLinearOperator

    torch.manual_seed(seed)
    cov = DenseLinearOperator(torch.exp(-0.5 * sq / ell**2)) + ConstantDiagLinearOperator(noise.reshape(1), y.shape[0])
    return lo_ll(cov, y)


IMPLS = {
    "structgp cg, plain Hutchinson": structgp_ll(False),
    "structgp cg, control variate": structgp_ll(True),
    "gpytorch defaults": gpytorch_ll,
}


def measure(fn, sq, y, ref_value, ref_grad, dtype, seed):
    ell = torch.tensor(ELL, device=y.device, dtype=dtype, requires_grad=True)
    noise = torch.tensor(NOISE, device=y.device, dtype=dtype, requires_grad=True)
    start = time.perf_counter()
    value = fn(sq, y, ell, noise, seed)
    grad = torch.stack(torch.autograd.grad(value, [ell, noise])).double()
    elapsed = time.perf_counter() - start
    rel_value = abs(float(value.detach()) - ref_value) / abs(ref_value)
    rel_grad = ((grad - ref_grad).abs() / ref_grad.abs()).tolist()
    return rel_value, rel_grad, elapsed


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="2500:float64,8000:float32", help="comma-separated N:dtype")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    rows = []
    for case in args.cases.split(","):
        n_text, dtype_name = case.split(":")
        n, dtype = int(n_text), getattr(torch, dtype_name)
        sq64, y64, ref_value, ref_grad = problem(n, dev)
        sq, y = sq64.to(dtype), y64.to(dtype)
        del sq64
        for name, fn in IMPLS.items():
            runs = [measure(fn, sq, y, ref_value, ref_grad, dtype, seed) for seed in range(args.seeds)]
            values = [r[0] for r in runs]
            ell_err, noise_err = [r[1][0] for r in runs], [r[1][1] for r in runs]
            rows.append(
                {
                    "case": f"dense RBF N={n} {dtype_name}",
                    "impl": name,
                    "value": (statistics.mean(values), max(values)),
                    "lengthscale": (statistics.mean(ell_err), max(ell_err)),
                    "noise": (statistics.mean(noise_err), max(noise_err)),
                    "time": statistics.median(r[2] for r in runs),
                }
            )
            print(f"  {rows[-1]['case']}: {name} done", file=sys.stderr, flush=True)
    meta = environment(dev)
    print(f"relative errors vs float64 dense Cholesky, mean / max over {args.seeds} seeds; {meta['device']}")
    header = f"{'case':<26} {'method':<32} {'value':>17} {'d lengthscale':>17} {'d noise':>17} {'time':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [f"{r[key][0]:.1e} / {r[key][1]:.1e}" for key in ("value", "lengthscale", "noise")]
        print(f"{r['case']:<26} {r['impl']:<32} {cells[0]:>17} {cells[1]:>17} {cells[2]:>17} {r['time']:>7.2f}s")
    return rows


if __name__ == "__main__":
    main()
