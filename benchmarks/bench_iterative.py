"""structgp's iterative engine vs linear_operator (gpytorch.settings defaults), side by side in one process.

Each case times forward + backward of the Gaussian log-likelihood
``-1/2 (y^T A^{-1} y + log det A + n log 2 pi)`` and reports peak memory and the relative error of the
value against a float64 dense Cholesky written here by hand (independent of both libraries; skipped
above ``--ref-limit``):

- dense RBF kernel on 2-d inputs (lengthscale 0.2) + noise 0.01, N = ``--n``;
- Kronecker ``m^3`` RBF grid (lengthscales 0.25, 0.3, 0.225) + heteroskedastic noise in [0.05, 0.15].

structgp runs with ``settings(method="cg")`` and its default tolerances. A convergence plot (relative residual
of the ``A^{-1} y`` solve vs iteration, with and without each preconditioner) is saved as PNG when matplotlib
is importable.

    python benchmarks/bench_iterative.py                                  # CPU sizes (a few minutes)
    python benchmarks/bench_iterative.py --device cuda --n 20000 --kron-m 32 --ref-limit 40000
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    Result,
    backward,
    environment,
    gauss_ll,
    lo_ll,
    print_table,
    rbf_1d,
    run_case,
    sg_ll,
    write_json,
)

import structgp as sg  # noqa: E402
from structgp._config import current  # noqa: E402
from structgp.covariance import Dense, Diagonal, Kronecker, ScaledIdentity  # noqa: E402
from structgp.covariance.kron import kron_matmul  # noqa: E402
from structgp.inference.cg import CGConvergenceWarning, pcg  # noqa: E402
from structgp.inference.preconditioners import build  # noqa: E402

KRON_LENGTHSCALES = (0.25, 0.3, 0.225)


def dense_reference(a64: torch.Tensor, y64: torch.Tensor) -> float:
    chol = torch.linalg.cholesky(a64)
    inv_quad = torch.cholesky_solve(y64[:, None], chol)[:, 0].dot(y64)
    return float(gauss_ll(inv_quad, 2 * chol.diagonal().log().sum(), y64.shape[0]))


def case_dense(n: int, dev, dtype, ref_limit: int):
    from linear_operator.operators import ConstantDiagLinearOperator, DenseLinearOperator

    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.rand(n, 2, device=dev, dtype=dtype, generator=gen)
    # cdist's default matrix-product formula loses symmetry in float32 (up to 4e-4, varying between processes
    # with MKL's blocking: an indefinite "kernel" with eigenvalues down to -0.004); the direct formula does not
    sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square()
    ls = torch.tensor(0.2, device=dev, dtype=dtype, requires_grad=True)
    noise = torch.tensor(0.01, device=dev, dtype=dtype, requires_grad=True)
    with torch.no_grad():  # data from lengthscale 0.15, so that the likelihood is not at its optimum
        noise64 = 0.01 * torch.eye(n, device=dev, dtype=torch.float64)
        k_data = torch.exp(-0.5 * sq.double() / 0.15**2) + noise64
        y64 = torch.linalg.cholesky(k_data) @ torch.randn(n, device=dev, dtype=torch.float64, generator=gen)
        del k_data
        exact = None
        if n <= ref_limit:
            a64 = torch.exp(-0.5 * sq.double() / 0.2**2) + noise64
            exact = dense_reference(a64, y64)
            del a64
    y = y64.to(dtype)

    def op():
        return Dense(torch.exp(-0.5 * sq / ls**2)) + ScaledIdentity(noise, n)

    def structgp_cg():
        with sg.settings(method="cg"):
            return backward(sg_ll(op(), y))

    def structgp_exact():
        with sg.settings(method="cholesky"):
            return backward(sg_ll(op(), y))

    def anchor():
        noise_op = ConstantDiagLinearOperator(noise.reshape(1), n)
        cov = DenseLinearOperator(torch.exp(-0.5 * sq / ls**2)) + noise_op
        return backward(lo_ll(cov, y))

    impls = {"structgp cg": structgp_cg, "linear_operator": anchor, "structgp cholesky": structgp_exact}
    return f"Dense RBF N={n}", exact, impls, lambda: op(), y


def case_kronecker(m: int, dev, dtype, ref_limit: int):
    from linear_operator.operators import DiagLinearOperator, KroneckerProductLinearOperator

    n = m**3
    gen = torch.Generator(device=dev).manual_seed(1)
    g = torch.linspace(0, 1, m, device=dev, dtype=dtype)
    ls = [torch.tensor(v, device=dev, dtype=dtype, requires_grad=True) for v in KRON_LENGTHSCALES]
    d = 0.05 + 0.1 * torch.rand(n, device=dev, dtype=torch.float64, generator=gen)
    d = d.to(dtype).requires_grad_()
    with torch.no_grad():
        eye = 1e-10 * torch.eye(m, device=dev, dtype=torch.float64)
        chols = [torch.linalg.cholesky(rbf_1d(g.double(), v) + eye) for v in KRON_LENGTHSCALES]
        eps = torch.randn(2, n, device=dev, dtype=torch.float64, generator=gen)
        y64 = kron_matmul(chols, eps[0][:, None])[:, 0] + d.double().sqrt() * eps[1]
        exact = None
        if n <= ref_limit:
            a64 = Kronecker(*[rbf_1d(g.double(), v) for v in KRON_LENGTHSCALES]).to_dense()
            exact = dense_reference(a64 + torch.diag(d.double()), y64)
            del a64
    y = y64.to(dtype)

    def op():
        return Kronecker(*[rbf_1d(g, v) for v in ls]) + Diagonal(d)

    def structgp_cg():
        with sg.settings(method="cg"):
            return backward(sg_ll(op(), y))

    def anchor():
        cov = KroneckerProductLinearOperator(*[rbf_1d(g, v) for v in ls]) + DiagLinearOperator(d)
        return backward(lo_ll(cov, y))

    impls = {"structgp cg": structgp_cg, "linear_operator": anchor}
    return f"Kronecker {m}^3 + Diagonal", exact, impls, op, y


def convergence(name: str, make_op, y: torch.Tensor, preconditioners: list[str], max_iter: int) -> dict:
    """Relative residual of the ``A^{-1} y`` column per iteration, for each preconditioner (runs that stop at
    ``max_iter`` are expected here: their warnings are silenced)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", CGConvergenceWarning)
        a = pytree.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, make_op())
        curves = {}
        for pre in preconditioners:
            with sg.settings(preconditioner=pre):
                p = build(a, current())
            hist: list[torch.Tensor] = []
            pcg(a._matmul, y[:, None], p.solve, tol=1e-10, max_iter=max_iter, history=hist, what=name)
            label = pre if pre != "auto" else f"auto: {p.describe()}"
            curves[label] = [float(h.max()) for h in hist]
    return curves


def plot(curves: dict[str, dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for ax, (case, lines) in zip(axes[0], curves.items()):
        for label, res in lines.items():
            ax.semilogy(range(1, len(res) + 1), res, label=label)
        ax.set_title(case)
        ax.set_xlabel("iteration")
        ax.set_ylabel("relative residual ||r|| / ||y||")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return True


def main(argv: list[str] | None = None) -> list[Result]:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--n", type=int, default=3000, help="dense RBF size (20000 on an H100)")
    parser.add_argument("--kron-m", type=int, default=16, help="Kronecker grid side (32 on an H100)")
    parser.add_argument("--ref-limit", type=int, default=12000, help="largest N with a float64 reference")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated subset of: dense,kron")
    parser.add_argument("--plot", default="bench_out/iterative_convergence.png")
    parser.add_argument("--plot-iters", type=int, default=300)
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    builders = {
        "dense": lambda: case_dense(args.n, dev, dtype, args.ref_limit),
        "kron": lambda: case_kronecker(args.kron_m, dev, dtype, args.ref_limit),
    }
    precs = {
        "dense": ["none", "jacobi", "pivoted_cholesky"],
        "kron": ["none", "jacobi", "pivoted_cholesky", "kronecker_eigen", "kronecker_deflated"],
    }
    chosen = [c for c in args.only.split(",") if c] or list(builders)
    results, curves = [], {}
    for key in chosen:
        name, exact, impls, make_op, y = builders[key]()
        for impl, fn in impls.items():
            results.append(run_case(name, impl, fn, exact, dev, args.reps))
            print(f"  {name}: {impl} done", file=sys.stderr, flush=True)
            if impl == "structgp cg":
                print(f"    {sg.last_report()}", file=sys.stderr, flush=True)
        curves[name] = convergence(name, make_op, y, precs[key], args.plot_iters)
    meta = environment(dev)
    where = f"{meta['device']} (torch {meta['torch']})"
    print(f"{args.dtype} forward+backward of the Gaussian log-likelihood on {where}")
    print_table(results, anchor="linear_operator")
    for case, lines in curves.items():
        summary = ", ".join(f"{label}: {len(res)} it -> {res[-1]:.1e}" for label, res in lines.items())
        print(f"convergence {case}: {summary}")
    if plot(curves, args.plot):
        print(f"convergence plot: {args.plot}")
    if args.json:
        write_json(args.json, results, {**meta, "convergence": curves})
    return results


if __name__ == "__main__":
    main()
