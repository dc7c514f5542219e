"""structgp vs linear_operator on the four covariance structures, side by side in one process.

Each case times forward + backward of the Gaussian log-likelihood ``-1/2 (y^T A^{-1} y + log det A + n log 2 pi)``
(float32), reports peak memory and the relative error against an exact float64 reference written here by hand
(independent of both libraries).

    python benchmarks/bench_covariance.py --size small            # CPU-sized (a minute or two)
    python benchmarks/bench_covariance.py --device cuda --size full --json out.json   # the H100 sizes
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

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
from structgp.covariance import Diagonal, Kronecker, LowRank, ScaledIdentity  # noqa: E402

SIZES = {
    "small": dict(lr_n=200_000, lr_k=64, kron_m=32, lift_n=50_000, lift_m=12, block_b=2_000, block_m=64,
                  ski_n=20_000, ski_m=60, hetero_m=16),
    "full": dict(lr_n=1_000_000, lr_k=64, kron_m=64, lift_n=200_000, lift_m=16, block_b=10_000, block_m=64,
                 ski_n=200_000, ski_m=100, hetero_m=24),
}


def case_low_rank(n: int, k: int, dev: torch.device):
    from linear_operator.operators import DiagLinearOperator, LowRankRootLinearOperator

    w = (torch.randn(n, k, device=dev) / math.sqrt(k)).requires_grad_()
    d = (torch.rand(n, device=dev) + 0.5).requires_grad_()
    y = torch.randn(n, device=dev)
    with torch.no_grad():  # exact float64 Woodbury, by hand
        wd, dd, yd = w.double(), d.double(), y.double()
        cap = torch.linalg.cholesky(torch.eye(k, dtype=wd.dtype, device=dev) + (wd / dd[:, None]).T @ wd)
        u = wd.T @ (yd / dd)
        inv_quad = (yd * yd / dd).sum() - u @ torch.cholesky_solve(u[:, None], cap)[:, 0]
        exact = float(gauss_ll(inv_quad, 2 * cap.diagonal().log().sum() + dd.log().sum(), n))
    name = f"LowRank+Diag N={n:.0e} k={k}"
    return name, exact, {
        "structgp": lambda: backward(sg_ll(LowRank(w) + Diagonal(d), y)),
        "linear_operator": lambda: backward(lo_ll(LowRankRootLinearOperator(w) + DiagLinearOperator(d), y)),
    }


def case_kronecker(m: int, dev: torch.device):
    from linear_operator.operators import ConstantDiagLinearOperator, KroneckerProductLinearOperator

    n = m**3
    g = torch.linspace(0, 1, m, device=dev)
    ls = torch.tensor(0.2, device=dev, requires_grad=True)
    noise = torch.tensor(0.1, device=dev, requires_grad=True)
    y = torch.randn(n, device=dev)
    with torch.no_grad():  # exact float64 eigen formula, by hand
        lam, q = torch.linalg.eigh(rbf_1d(g.double(), ls.double()))
        lam3 = (lam[:, None, None] * lam[None, :, None] * lam[None, None, :]).reshape(-1) + noise.double()
        z = torch.einsum("ia,jb,kc,ijk->abc", q, q, q, y.double().reshape(m, m, m)).reshape(-1)
        exact = float(gauss_ll((z**2 / lam3).sum(), lam3.log().sum(), n))

    def structgp_fn():
        k1 = rbf_1d(g, ls)
        return backward(sg_ll(Kronecker(k1, k1, k1) + ScaledIdentity(noise, n), y))

    def anchor_fn():
        k1 = rbf_1d(g, ls)
        cov = KroneckerProductLinearOperator(k1, k1, k1) + ConstantDiagLinearOperator(noise.reshape(1), n)
        return backward(lo_ll(cov, y))

    return f"Kronecker {m}^3 + ScaledIdentity", exact, {"structgp": structgp_fn, "linear_operator": anchor_fn}


def case_kronecker_hetero(m: int, dev: torch.device):
    """A smooth 3-D grid kernel (RBF lengthscale 0.5) + heteroskedastic noise: no per-factor shortcut exists;
    the exact reference is a float64 dense Cholesky."""
    from linear_operator.operators import DiagLinearOperator, KroneckerProductLinearOperator

    n = m**3
    g = torch.linspace(0, 1, m, device=dev)
    ls = torch.tensor(0.5, device=dev, requires_grad=True)
    noise = (0.05 + 0.1 * torch.rand(n, device=dev)).requires_grad_()
    y = torch.randn(n, device=dev)
    with torch.no_grad():
        k64 = rbf_1d(g.double(), ls.double())
        a = torch.kron(torch.kron(k64, k64), k64) + torch.diag(noise.double())
        chol = torch.linalg.cholesky(a)
        z = torch.linalg.solve_triangular(chol, y.double()[:, None], upper=False)
        exact = float(gauss_ll(z.square().sum(), 2 * chol.diagonal().log().sum(), n))
        del a, chol

    def structgp_fn():
        k1 = rbf_1d(g, ls)
        return backward(sg_ll(Kronecker(k1, k1, k1) + Diagonal(noise), y))

    def anchor_fn():
        k1 = rbf_1d(g, ls)
        return backward(lo_ll(KroneckerProductLinearOperator(k1, k1, k1) + DiagLinearOperator(noise), y))

    return f"Kronecker {m}^3 smooth + heteroskedastic", exact, {"structgp": structgp_fn, "linear_operator": anchor_fn}


def case_lifted(n_out: int, m: int, dev: torch.device, nnz: int = 8):
    from linear_operator.operators import (
        ConstantDiagLinearOperator,
        InterpolatedLinearOperator,
        KroneckerProductLinearOperator,
    )

    from structgp.covariance import SparseLifted

    n_in = m**3
    g = torch.linspace(0, 1, m, device=dev)
    ls = torch.tensor(0.2, device=dev, requires_grad=True)
    sig = torch.tensor(0.1, device=dev, requires_grad=True)
    idx = torch.randint(0, n_in, (n_out, nnz), device=dev)
    vals = torch.rand(n_out, nnz, device=dev) / nnz
    y = torch.randn(n_out, device=dev)
    rows = torch.arange(n_out, device=dev).repeat_interleave(nnz)
    lift = torch.sparse_coo_tensor(torch.stack([rows, idx.reshape(-1)]), vals.reshape(-1), (n_out, n_in)).coalesce()
    with torch.no_grad():  # exact float64 latent-space Woodbury, by hand (dense n_in x n_in)
        lam, q = torch.linalg.eigh(rbf_1d(g.double(), ls.double()))
        r1 = q * lam.clamp_min(0).sqrt()
        r = torch.kron(torch.kron(r1, r1), r1)
        l64 = lift.double()
        ltl = torch.sparse.mm(l64.t(), torch.sparse.mm(l64, torch.eye(n_in, dtype=torch.float64, device=dev)))
        s = sig.double()
        cap = torch.linalg.cholesky(torch.eye(n_in, dtype=torch.float64, device=dev) + r.T @ ltl @ r / s)
        yd = y.double()
        u = r.T @ torch.sparse.mm(l64.t(), yd[:, None])[:, 0] / s
        inv_quad = (yd**2).sum() / s - u @ torch.cholesky_solve(u[:, None], cap)[:, 0]
        exact = float(gauss_ll(inv_quad, 2 * cap.diagonal().log().sum() + n_out * s.log(), n_out))
        del r, ltl, cap

    csr = lift.to_sparse_csr()

    def structgp_fn():
        k1 = rbf_1d(g, ls)
        return backward(sg_ll(SparseLifted(csr, Kronecker(k1, k1, k1)) + ScaledIdentity(sig, n_out), y))

    def anchor_fn():
        k1 = rbf_1d(g, ls)
        base = KroneckerProductLinearOperator(k1, k1, k1)
        cov = InterpolatedLinearOperator(base, idx, vals, idx, vals) + ConstantDiagLinearOperator(sig.reshape(1), n_out)
        return backward(lo_ll(cov, y))

    name = f"SparseLifted N={n_out:.0e} n={n_in} nnz/row={nnz}"
    return name, exact, {"structgp": structgp_fn, "linear_operator": anchor_fn}


def bilinear_lift(x: torch.Tensor, m: int) -> torch.Tensor:
    """Bilinear interpolation weights of points ``x`` ``(n, 2)`` in ``[0, 1]^2`` on an ``m x m`` grid: a sparse
    COO ``(n, m^2)`` with 4 nonzeros a row (SKI's lift, linear instead of cubic)."""
    t = x * (m - 1)
    lo = t.floor().clamp(max=m - 2).long()
    f = t - lo
    rows, cols, vals = [], [], []
    for di in (0, 1):
        for dj in (0, 1):
            rows.append(torch.arange(x.shape[0], device=x.device))
            cols.append((lo[:, 0] + di) * m + lo[:, 1] + dj)
            vals.append((f[:, 0] if di else 1 - f[:, 0]) * (f[:, 1] if dj else 1 - f[:, 1]))
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (x.shape[0], m * m)).coalesce()


def case_ski_smooth(n_out: int, m: int, dev: torch.device):
    """SKI with a smooth kernel: bilinear weights onto an ``m x m`` grid, RBF lengthscale 0.3 (each factor is
    singular in float64, so a Cholesky root would need jitter; structgp uses the truncated spectral root)."""
    from linear_operator.operators import (
        ConstantDiagLinearOperator,
        InterpolatedLinearOperator,
        KroneckerProductLinearOperator,
    )

    from structgp.covariance import SparseLifted

    g = torch.linspace(0, 1, m, device=dev)
    ls = torch.tensor(0.3, device=dev, requires_grad=True)
    sig = torch.tensor(0.05, device=dev, requires_grad=True)
    lift = bilinear_lift(torch.rand(n_out, 2, device=dev), m)
    y = torch.randn(n_out, device=dev)
    with torch.no_grad():  # exact float64 latent-space Woodbury on the eigen root (eigenvalues below 1e-15 of
        lam, q = torch.linalg.eigh(rbf_1d(g.double(), ls.double()))  # the largest, float64 noise, left out)
        keep = lam > 1e-15 * lam.max()
        r1 = q[:, keep] * lam[keep].sqrt()
        r = torch.kron(r1, r1)
        l64 = lift.double()
        lr = torch.sparse.mm(l64, r)  # (n_out, m^2)
        s = sig.double()
        cap = torch.linalg.cholesky(torch.eye(r.shape[1], dtype=torch.float64, device=dev) + lr.T @ lr / s)
        yd = y.double()
        u = lr.T @ yd / s
        inv_quad = (yd**2).sum() / s - u @ torch.cholesky_solve(u[:, None], cap)[:, 0]
        exact = float(gauss_ll(inv_quad, 2 * cap.diagonal().log().sum() + n_out * s.log(), n_out))
        del r, lr, cap

    csr = lift.to_sparse_csr()
    idx = lift.indices()[1].reshape(n_out, 4)
    vals = lift.values().reshape(n_out, 4)

    def structgp_fn():
        k1 = rbf_1d(g, ls)
        return backward(sg_ll(SparseLifted(csr, Kronecker(k1, k1)) + ScaledIdentity(sig, n_out), y))

    def anchor_fn():
        k1 = rbf_1d(g, ls)
        base = KroneckerProductLinearOperator(k1, k1)
        cov = InterpolatedLinearOperator(base, idx, vals, idx, vals) + ConstantDiagLinearOperator(sig.reshape(1), n_out)
        return backward(lo_ll(cov, y))

    return f"SKI smooth N={n_out:.0e} grid {m}x{m}", exact, {"structgp": structgp_fn, "linear_operator": anchor_fn}


def case_block(b: int, m: int, dev: torch.device):
    from linear_operator.operators import BlockDiagLinearOperator, DenseLinearOperator

    from structgp.covariance import BlockDiag

    a = torch.randn(b, m, m, device=dev) / math.sqrt(m)
    blocks = (a @ a.mT + torch.eye(m, device=dev)).requires_grad_()
    y = torch.randn(b * m, device=dev)
    with torch.no_grad():
        chol = torch.linalg.cholesky(blocks.double())
        z = torch.linalg.solve_triangular(chol, y.double().reshape(b, m, 1), upper=False)
        exact = float(gauss_ll(z.square().sum(), 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(), b * m))

    def raw():
        chol = torch.linalg.cholesky(blocks)
        z = torch.linalg.solve_triangular(chol, y.reshape(b, m, 1), upper=False)
        return backward(gauss_ll(z.square().sum(), 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(), b * m))

    return f"BlockDiag {b} x {m}", exact, {
        "structgp": lambda: backward(sg_ll(BlockDiag(blocks), y)),
        "linear_operator": lambda: backward(lo_ll(BlockDiagLinearOperator(DenseLinearOperator(blocks)), y)),
        "batched cholesky": raw,
    }


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated subset of: lowrank,kron,lifted,block,ski,hetero")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    size = SIZES[args.size]
    torch.manual_seed(0)
    builders = {
        "lowrank": lambda: case_low_rank(size["lr_n"], size["lr_k"], dev),
        "kron": lambda: case_kronecker(size["kron_m"], dev),
        "lifted": lambda: case_lifted(size["lift_n"], size["lift_m"], dev),
        "block": lambda: case_block(size["block_b"], size["block_m"], dev),
        "ski": lambda: case_ski_smooth(size["ski_n"], size["ski_m"], dev),
        "hetero": lambda: case_kronecker_hetero(size["hetero_m"], dev),
    }
    chosen = [c for c in args.only.split(",") if c] or list(builders)
    results = []
    for key in chosen:
        name, exact, impls = builders[key]()
        for impl, fn in impls.items():
            results.append(run_case(name, impl, fn, exact, dev, args.reps))
            print(f"  {name}: {impl} done", file=sys.stderr, flush=True)
            if impl == "structgp":
                print(f"    plan: {sg.last_report()}", file=sys.stderr, flush=True)
    meta = environment(dev)
    print(f"float32 forward+backward of the Gaussian log-likelihood on {meta['device']} (torch {meta['torch']})")
    print_table(results, anchor="linear_operator")
    if args.json:
        write_json(args.json, results, meta)
    return results


if __name__ == "__main__":
    main()
