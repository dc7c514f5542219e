"""Lifted covariances ``L K L^T + sigma I`` at the seeds' own scale (issue: large latent grids).

Cases (each: structgp and the anchor in one process where the anchor can run, relative error against an exact
float64 reference written here by hand, independent of both libraries):

- seed 002 as its author wrote it: an identity lift of a 50^3 RBF grid (lengthscale 0.69 on [-5, 5]) plus
  sigma I, float32, one log-likelihood + gradient, and two Adam steps of a fit. The anchor is
  ``shared/anchors/anchor_seed002.py`` (gpytorch + linear_operator) run in a subprocess with a memory cap,
  because it asks for an N x N capacitance.
- an identity lift of a 30^3 grid, float64 (exact).
- a masked grid: 70% of a 24^3 grid observed (a selection lift), RBF + sigma I, float64, against dense
  Cholesky of the observed covariance; and 70% of a 64^3 grid (183 500 observations; no dense reference).
- a general lift: 2e5 rows of 8 random cells of a 40^3 grid (n_in = 64 000), RBF + sigma I, float32, against
  a float64 latent Woodbury written here by hand; ``general1e6``: 1e6 rows onto 64^3 (its reference with
  ``--reference-1e6``).
The large rows run structgp in a fresh subprocess and report its peak RSS (``VmHWM`` of its own address space:
``ru_maxrss`` would include the parent's resident set at the fork, e.g. the float64 reference's).

    python benchmarks/bench_lifted_scale.py                 # all cases (a few minutes on 2 cores)
    python benchmarks/bench_lifted_scale.py --case seed002 --anchor-cap-gib 16
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Result, backward, gauss_ll, print_table, rbf_1d, run_case, sg_ll  # noqa: E402

import structgp as sg  # noqa: E402
from structgp.covariance import Kronecker, ScaledIdentity, SparseLifted  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT.parent / "shared" / "anchors" / "anchor_seed002.py"


def identity_lift(n: int, dtype: torch.dtype) -> torch.Tensor:
    idx = torch.arange(n)
    return torch.sparse_coo_tensor(torch.stack([idx, idx]), torch.ones(n, dtype=dtype), (n, n))


def exact_kron_ll(factors: list[torch.Tensor], noise: float, y: torch.Tensor) -> float:
    """log N(y | 0, K_1 (x) K_2 (x) K_3 + noise I) in float64 by the eigen formula, by hand."""
    lams, qs = zip(*(torch.linalg.eigh(f.double()) for f in factors))
    m = [f.shape[0] for f in factors]
    lam = (lams[0][:, None, None] * lams[1][None, :, None] * lams[2][None, None, :]).reshape(-1) + noise
    z = torch.einsum("ia,jb,kc,ijk->abc", qs[0], qs[1], qs[2], y.double().reshape(*m)).reshape(-1)
    return float(gauss_ll((z**2 / lam).sum(), lam.log().sum(), y.numel()))


def seed002(m: int, dtype: torch.dtype):
    """The seed-002 model: identity lift of an m^3 RBF grid on [-5, 5], noise as gpytorch's default (0.6931
    after softplus), a constant mean; value + gradient of the log-likelihood in lengthscale, noise, mean."""
    g = torch.linspace(-5, 5, m, dtype=dtype)
    n = m**3
    y = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(dtype)
    lift = identity_lift(n, dtype)
    start = {"ls": 0.6931, "noise": 0.6931, "mean": 0.0}
    raw = {k: torch.tensor(v, dtype=dtype, requires_grad=True) for k, v in start.items()}

    def loss():
        k = rbf_1d(g, raw["ls"])
        op = SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(raw["noise"], n)
        return sg_ll(op, y - raw["mean"])

    with torch.no_grad():
        k = rbf_1d(g.double(), 0.6931)
        exact = exact_kron_ll([k, k, k], 0.6931, y.double())
    return loss, raw, exact, n


def case_seed002(m: int, reps: int, cap_gib: float) -> list[Result]:
    loss, raw, exact, n = seed002(m, torch.float32)
    name = f"seed 002: identity lift, {m}^3 grid (N={n}) f32"
    results = [run_case(name, "structgp", lambda: backward(loss()), exact, torch.device("cpu"), reps)]
    k = rbf_1d(torch.linspace(-5, 5, m), raw["ls"].detach())
    op = SparseLifted(identity_lift(n, torch.float32), Kronecker(k, k, k)) + ScaledIdentity(raw["noise"].detach(), n)
    print(sg.plan(op))

    def two_adam_steps():
        opt = torch.optim.Adam(list(raw.values()), lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            value = -loss()
            value.backward()
            opt.step()
        return value.detach()

    two_adam_steps()  # warm-up, as run_case does
    t0 = time.perf_counter()
    two_adam_steps()
    results.append(Result(name, "structgp 2 Adam", ms=round(1e3 * (time.perf_counter() - t0), 1)))
    results.append(anchor_seed002(m, name, cap_gib))
    return results


def anchor_seed002(m: int, name: str, cap_gib: float) -> Result:
    """The seed author's gpytorch script in a subprocess under an address-space cap (it asks for N x N)."""
    if not ANCHOR.exists():
        return Result(name, "linear_operator", note=f"anchor script not found at {ANCHOR}")
    cap = int(cap_gib * 2**30)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, str(ANCHOR), str(m)], capture_output=True, text=True, timeout=600,
                             preexec_fn=limit)
        text = (out.stdout.strip().splitlines() or [""])[-1] or out.stderr.strip().splitlines()[-1]
    except subprocess.TimeoutExpired:
        text = "timed out after 600 s"
    return Result(name, "linear_operator", ms=round(1e3 * (time.perf_counter() - t0), 1),
                  note=f"[subprocess, {cap_gib:g} GiB cap] {text[:150]}")


def case_identity(m: int, reps: int) -> list[Result]:
    n = m**3
    g = torch.linspace(0, 1, m, dtype=torch.float64)
    ls = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    lift = identity_lift(n, torch.float64)
    with torch.no_grad():
        k = rbf_1d(g, 0.2)
        exact = exact_kron_ll([k, k, k], 0.1, y)

    def fn():
        k = rbf_1d(g, ls)
        return backward(sg_ll(SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(noise, n), y))

    return [run_case(f"identity lift {m}^3 (N={n}) f64", "structgp", fn, exact, torch.device("cpu"), reps)]


def masked_problem(m: int, frac: float):
    """``frac`` of an ``m^3`` grid observed (a selection lift), RBF (lengthscale 0.2 on [0, 1]) + 0.1 I, float64."""
    n_in = m**3
    gen = torch.Generator().manual_seed(2)
    cols = torch.randperm(n_in, generator=gen)[: int(frac * n_in)].sort().values
    n = cols.numel()
    rows = torch.arange(n)
    lift = torch.sparse_coo_tensor(torch.stack([rows, cols]), torch.ones(n, dtype=torch.float64), (n, n_in))
    g = torch.linspace(0, 1, m, dtype=torch.float64)
    y = torch.randn(n, dtype=torch.float64, generator=gen)
    return lift, cols, g, y


def dense_masked_ll(g, cols, y, ls, noise) -> torch.Tensor:
    """The masked grid's log-likelihood by dense Cholesky of the observed covariance, by hand."""
    n = cols.numel()
    k = rbf_1d(g, ls)
    a = torch.kron(torch.kron(k, k), k)[cols][:, cols] + noise * torch.eye(n, dtype=torch.float64)
    chol = torch.linalg.cholesky(a)
    z = torch.linalg.solve_triangular(chol, y[:, None], upper=False)
    return gauss_ll(z.square().sum(), 2 * chol.diagonal().log().sum(), n)


def case_masked(m: int, frac: float, reps: int, dense: bool = True) -> list[Result]:
    lift, cols, g, y = masked_problem(m, frac)
    n = cols.numel()
    ls = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    exact = None
    if dense:
        with torch.no_grad():
            exact = float(dense_masked_ll(g, cols, y, 0.2, 0.1))

    def structgp_fn():
        k = rbf_1d(g, ls)
        return backward(sg_ll(SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(noise, n), y))

    name = f"masked grid {frac:.0%} of {m}^3 (N={n}) f64"
    dev = torch.device("cpu")
    k = rbf_1d(g, 0.2)
    print(sg.plan(SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(torch.tensor(0.1, dtype=torch.float64), n)))
    out = []
    if dense:
        out.append(run_case(name, "torch dense", lambda: backward(dense_masked_ll(g, cols, y, ls, noise)), exact,
                            dev, reps))
    out.append(run_case(name, "structgp", structgp_fn, exact, dev, reps))
    if not dense:
        out[-1].note = "no dense reference (it would need " + f"{8 * n * n / 2**30:.0f} GiB)"
    return out


def general_problem(n_out: int, m: int, dtype: torch.dtype):
    """``n_out`` rows of 8 random cells of an ``m^3`` grid (weights U(0, 1/8)), targets; CSR in ``dtype``."""
    gen = torch.Generator().manual_seed(3)
    n_in = m**3
    cols = torch.randint(0, n_in, (n_out, 8), generator=gen)
    vals = torch.rand(n_out, 8, generator=gen, dtype=torch.float64) / 8
    rows = torch.arange(n_out).repeat_interleave(8)
    lift = torch.sparse_coo_tensor(torch.stack([rows, cols.reshape(-1)]), vals.reshape(-1), (n_out, n_in))
    y = torch.randn(n_out, generator=gen, dtype=torch.float64)
    return lift.coalesce().to(dtype).to_sparse_csr(), torch.linspace(0, 1, m, dtype=dtype), y.to(dtype)


def general_reference(lift, g, y, ls: float = 0.2, noise: float = 0.1, chunk: int = 1000) -> float:
    """log N(y | 0, L K L^T + noise I) in float64 by hand: K's eigenpairs above 1e-13 of the largest (per-factor
    eigh; what is left out moves the value by < 1e-13 relative), C = I + R^T L^T L R / noise accumulated over
    row chunks of F = L R (the rows of R each chunk touches built from the factor eigenvectors), Cholesky."""
    lam1, q1 = torch.linalg.eigh(rbf_1d(g.double(), ls))
    lam = (lam1[:, None, None] * lam1[None, :, None] * lam1[None, None, :]).reshape(-1)
    keep = (lam > 1e-13 * lam.max()).nonzero().squeeze(-1)
    m = g.numel()
    i, j, k = keep // (m * m), (keep // m) % m, keep % m
    scale = lam[keep].sqrt()
    l64 = lift.to_sparse_coo().double().coalesce()
    rows, cols = l64.indices()
    vals = l64.values()
    y64 = y.double()
    n_out = y.numel()
    bounds = torch.searchsorted(rows, torch.arange(0, n_out + chunk, chunk)).tolist()
    cap = torch.eye(keep.numel(), dtype=torch.float64)
    u = torch.zeros(keep.numel(), dtype=torch.float64)
    for a, s0 in enumerate(range(0, n_out, chunk)):
        s1 = min(s0 + chunk, n_out)
        sel = slice(bounds[a], bounds[a + 1])
        c = cols[sel]
        r_rows = q1[c // (m * m)][:, i] * q1[(c // m) % m][:, j] * q1[c % m][:, k] * scale  # rows of R (nnz, keep)
        f = torch.zeros(s1 - s0, keep.numel(), dtype=torch.float64)
        f.index_add_(0, rows[sel] - s0, vals[sel, None] * r_rows)
        cap += f.T @ f / noise
        u += f.T @ y64[s0:s1] / noise
    chol = torch.linalg.cholesky(cap)
    w = torch.cholesky_solve(u[:, None], chol)[:, 0]
    inv_quad = (y64 @ y64) / noise - u @ w
    logdet = 2 * chol.diagonal().log().sum() + n_out * math.log(noise)
    return float(gauss_ll(inv_quad, logdet, n_out))


def _structgp_general(n_out: int, m: int, method: str = "auto"):
    lift, g, y = general_problem(n_out, m, torch.float32)
    ls = torch.tensor(0.2, requires_grad=True)
    noise = torch.tensor(0.1, requires_grad=True)

    def fn():
        k = rbf_1d(g, ls)
        with sg.settings(method=method):
            return backward(sg_ll(SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(noise, n_out), y))

    return fn


def _structgp_masked(m: int, frac: float):
    lift, cols, g, y = masked_problem(m, frac)
    ls = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    noise = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def fn():
        k = rbf_1d(g, ls)
        return backward(sg_ll(SparseLifted(lift, Kronecker(k, k, k)) + ScaledIdentity(noise, cols.numel()), y))

    return fn


WORKERS = {"general": _structgp_general, "masked": _structgp_masked}


def worker(spec: str, reps: int) -> None:
    """Run one structgp case in this process (``name:arg:arg``): one warm-up, ``reps`` timed value + gradient
    calls; print a JSON line with the median ms, the value, the process's peak RSS and the last report."""
    name, *raw = spec.split(":")
    fn = WORKERS[name](*(a if a.isalpha() else float(a) if "." in a else int(a) for a in raw))
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        value = fn()
        times.append(1e3 * (time.perf_counter() - t0))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"ms": sorted(times)[len(times) // 2], "value": float(value),
                      "peak_gib": peak_rss_gib(), "cpu_s": usage.ru_utime + usage.ru_stime,
                      "calls": reps + 1, "report": str(sg.last_report())}))


def peak_rss_gib() -> float:
    """This process's peak resident set (``VmHWM``, GiB): its own address space's high-water mark since ``exec``
    (``ru_maxrss`` keeps the parent's resident set at the fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def in_subprocess(case: str, spec: str, reps: int, exact: float | None, impl: str = "structgp") -> Result:
    """structgp's row from a fresh process (its peak RSS is the whole run's, problem data included)."""
    out = subprocess.run([sys.executable, __file__, "--worker", spec, "--reps", str(reps)], capture_output=True,
                         text=True, timeout=1800)
    lines = out.stdout.strip().splitlines()
    if out.returncode or not lines:
        return Result(case, impl, note=f"failed: {(out.stderr.strip().splitlines() or ['?'])[-1][:150]}")
    got = json.loads(lines[-1])
    rel = abs(got["value"] - exact) / abs(exact) if exact is not None else None
    note = (f"[subprocess, peak = process max RSS; {got['cpu_s']:.0f} CPU s over {got['calls']} calls and the set-up] "
            + got["report"][-160:])
    return Result(case, impl, round(got["ms"], 1), round(got["peak_gib"], 3), got["value"], rel, note)


def case_general(n_out: int, m: int, reps: int, reference: bool) -> list[Result]:
    name = f"general lift {n_out:.0e} x 8 of {m}^3 f32"
    exact = None
    if reference:
        lift, g, y = general_problem(n_out, m, torch.float32)
        exact = general_reference(lift, g, y)
        del lift, g, y
    # "auto" plans with the spectral rank estimated from the 40 x 40 factor spectra; "woodbury" forces the exact
    # path (the same one where the estimate makes it the cheapest)
    return [
        in_subprocess(name, f"general:{n_out}:{m}:auto", reps, exact, "structgp auto"),
        in_subprocess(name, f"general:{n_out}:{m}:woodbury", reps, exact, "structgp woodbury"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["all", "seed002", "identity", "masked", "masked64", "general", "general1e6"],
                        default="all")
    parser.add_argument("--general-n", type=int, default=200_000)
    parser.add_argument("--general-m", type=int, default=40)
    parser.add_argument("--no-reference", action="store_true", help="skip the float64 by-hand reference of 'general'")
    parser.add_argument("--reference-1e6", action="store_true",
                        help="compute the float64 by-hand reference of 'general1e6' (about 30 minutes on 2 cores)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed-m", type=int, default=50)
    parser.add_argument("--anchor-cap-gib", type=float, default=16.0)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.reps)
        return
    results: list[Result] = []
    if args.case in ("all", "seed002"):
        results += case_seed002(args.seed_m, args.reps, args.anchor_cap_gib)
    if args.case in ("all", "identity"):
        results += case_identity(30, args.reps)
    if args.case in ("all", "masked"):
        results += case_masked(24, 0.7, max(1, args.reps // 2))
    if args.case in ("all", "masked64"):
        results.append(in_subprocess("masked grid 70% of 64^3 (N=183500) f64", "masked:64:0.7", 1, None))
    if args.case in ("all", "general"):
        results += case_general(args.general_n, args.general_m, 1, not args.no_reference)
    if args.case == "general1e6":  # not in "all": about 10 minutes (40 more with --reference-1e6)
        results += case_general(1_000_000, 64, 1, reference=args.reference_1e6)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_table(results, anchor="linear_operator")
    for r in results:
        if r.rel_err is not None and not math.isfinite(r.rel_err):
            print(f"non-finite error in {r.case} / {r.impl}")


if __name__ == "__main__":
    main()
