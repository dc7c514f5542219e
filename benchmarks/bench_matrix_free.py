"""Matrix-free exact GPs on scattered points (issue: 10^5-10^6 points on one machine).

One log-likelihood + gradient (lengthscale, outputscale, noise) of an RBF GP on 2-D scattered inputs:

- structgp ``MatrixFreeKernel`` (``KernelOperator``: products by tiles, never materialised) on the
  iterative engine (PCG + SLQ), at the default settings;
- gpytorch's ``ExactMarginalLogLikelihood`` at its defaults (the dense kernel; CG + Lanczos above 800 points),
  where the dense matrix fits;
- the reference: dense float64 Cholesky written here with torch (independent of both), where it fits.

Each run is its own subprocess, so its peak memory (``ru_maxrss``, minus the interpreter with torch, gpytorch
and structgp imported) is its own.

    python benchmarks/bench_matrix_free.py                      # N = 12 000 float64 (all three) and 60 000 float32
    python benchmarks/bench_matrix_free.py --n 200000 --dtype float32 --only structgp
    python benchmarks/bench_matrix_free.py --device cuda --n 1000000 --dtype float32 --only structgp
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

NOISE, LENGTHSCALE, OUTPUTSCALE = 1e-2, 0.2, 1.0


def data(n: int, dtype: torch.dtype, device: str):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    f = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1])
    y = f + NOISE**0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), y.to(device, dtype)


def raw_parameters(dtype, device):
    """(log lengthscale, log outputscale, log noise), leaves of the gradient."""
    values = [LENGTHSCALE, OUTPUTSCALE, NOISE]
    return [torch.tensor(v, dtype=dtype, device=device).log().requires_grad_() for v in values]


def run_reference(x, y):
    """Dense float64 Cholesky by hand: log N(y | 0, s k_rbf + noise I) and its gradient."""
    x, y = x.double(), y.double()
    params = raw_parameters(torch.float64, x.device)
    ls, os, noise = (p.exp() for p in params)
    k = os * torch.exp(-0.5 * torch.cdist(x / ls, x / ls).square())
    k.diagonal().add_(noise)
    chol = torch.linalg.cholesky(k)
    alpha = torch.cholesky_solve(y[:, None], chol)
    ll = -0.5 * (y[:, None] * alpha).sum() - chol.diagonal().log().sum() - 0.5 * len(y) * torch.log(
        torch.tensor(2 * torch.pi, dtype=torch.float64)
    )
    ll.backward()
    return float(ll), [float(p.grad) for p in params], {}


def run_structgp(x, y):
    import gpytorch

    import structgp as sg
    from structgp.covariance import KernelOperator, ScaledIdentity

    params = raw_parameters(x.dtype, x.device)
    ls, os, noise = (p.exp() for p in params)
    base = gpytorch.kernels.RBFKernel().to(x.device, x.dtype)
    # the raw parameter of gpytorch's lengthscale is softplus^-1(ls): give the kernel ls through it
    raw_ls = torch.log(torch.expm1(ls)).reshape(1, 1)
    op = KernelOperator(base, x, [raw_ls], scale=os) + ScaledIdentity(noise, len(y))
    with sg.settings(method="cg"):
        plan = sg.plan(op)
        dist = sg.distributions.MultivariateNormal(torch.zeros_like(y), op)
        ll = dist.log_prob(y)
        report = sg.last_report()
    ll.backward()
    extra = {"plan": plan.engine.name, "iterations": getattr(report, "iterations", None),
             "notes": list(getattr(report, "notes", []))}
    return float(ll), [float(p.grad) for p in params], extra


def run_gpytorch(x, y):
    """gpytorch at its defaults: the dense kernel matrix, CG + Lanczos (above 800 points) in linear_operator."""
    import gpytorch
    from linear_operator import to_linear_operator
    from linear_operator.operators import DiagLinearOperator

    params = raw_parameters(x.dtype, x.device)
    ls, os, noise = (p.exp() for p in params)
    base = gpytorch.kernels.RBFKernel().to(x.device, x.dtype)
    raw_ls = torch.log(torch.expm1(ls)).reshape(1, 1)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        kx = torch.func.functional_call(base, {"raw_lengthscale": raw_ls}, (x, x))
    cov = to_linear_operator(kx).mul(os) + DiagLinearOperator(noise.expand(len(y)))
    ll = gpytorch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)
    ll.backward()
    return float(ll), [float(p.grad) for p in params], {}


def run_gpytorch_keops(x, y):
    """gpytorch's KeOps RBF kernel (matrix-free, CG + Lanczos in linear_operator). Its lengthscale is set and
    differentiated through the module's own parameter (through ``functional_call`` the KeOps kernel's
    gradient does not reach the raw lengthscale: ``grad`` stays None), and linear_operator's preconditioner
    is off (``max_preconditioner_size(0)``): with it, the KeOps kernel's diagonal raises ("LazyTensor cannot
    be made into a Tensor")."""
    import gpytorch
    from linear_operator.operators import DiagLinearOperator

    params = raw_parameters(x.dtype, x.device)
    ls, os, noise = (p.exp() for p in params)
    kernel = gpytorch.kernels.keops.RBFKernel().to(x.device, x.dtype)
    kernel.lengthscale = ls.detach()
    with gpytorch.settings.max_cholesky_size(0), gpytorch.settings.max_preconditioner_size(0):
        cov = kernel(x, x).mul(os) + DiagLinearOperator(noise.expand(len(y)))
        ll = gpytorch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y)
        ll.backward()
    # d/d log ls = ls * d/d ls, and d/d ls = d/d raw / softplus'(raw) (the raw parameter is softplus^-1(ls))
    raw = kernel.raw_lengthscale
    d_log_ls = float(kernel.raw_lengthscale.grad.sum() / torch.sigmoid(raw).sum() * ls)
    return float(ll), [d_log_ls, float(params[1].grad), float(params[2].grad)], {}


RUNNERS = {"reference": run_reference, "structgp": run_structgp, "gpytorch": run_gpytorch,
           "gpytorch_keops": run_gpytorch_keops}


def one(who: str, n: int, dtype: str, device: str) -> dict:
    x, y = data(n, getattr(torch, dtype), device)
    import gpytorch  # noqa: F401  (in the baseline memory)

    import structgp  # noqa: F401
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    value, grads, extra = RUNNERS[who](x, y)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"who": who, "n": n, "dtype": dtype, "value": value, "grads": grads, "seconds": seconds, "cpu_seconds": cpu,
           "peak_gib": peak / 2**20, "added_gib": (peak - base_rss) / 2**20, **extra}
    if device == "cuda":
        out["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def spawn(who: str, n: int, dtype: str, device: str, timeout: float) -> dict | None:
    cmd = [sys.executable, __file__, "--one", who, "--n", str(n), "--dtype", dtype, "--device", device]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"who": who, "n": n, "dtype": dtype, "error": f"over {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"who": who, "n": n, "dtype": dtype, "error": proc.stderr.strip().splitlines()[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> None:
    ref = {r["n"]: r for r in rows if r["who"] == "reference" and "error" not in r}
    print("| N | dtype | who | time s (CPU s) | peak GiB (added) | value rel. err | grad rel. err (ls, os, noise) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['n']} | {r['dtype']} | {r['who']} | - | - | {r['error']} | |")
            continue
        exact = ref.get(r["n"])
        err = grads = "-"
        if exact is not None and r["who"] != "reference":
            err = f"{abs(r['value'] - exact['value']) / abs(exact['value']):.1e}"
            grads = ", ".join(f"{abs(a - b) / abs(b):.1e}" for a, b in zip(r["grads"], exact["grads"]))
        print(f"| {r['n']} | {r['dtype']} | {r['who']} | {r['seconds']:.1f} ({r['cpu_seconds']:.0f}) "
              f"| {r['peak_gib']:.2f} ({r['added_gib']:.2f}) | {err} | {grads} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--one", choices=sorted(RUNNERS))
    parser.add_argument("--n", type=int, nargs="*")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one(args.one, args.n[0], args.dtype or "float64", args.device)))
        return
    cases = [(n, args.dtype or "float32") for n in args.n] if args.n else [(12_000, "float64"), (60_000, "float32")]
    rows = []
    for n, dtype in cases:
        dense_fits = n <= 20_000
        who = args.only or (["reference", "structgp", "gpytorch"] if dense_fits else ["structgp"])
        for w in who:
            rows.append(spawn(w, n, dtype, args.device, args.timeout))
            print(json.dumps(rows[-1]), flush=True)
    table(rows)


if __name__ == "__main__":
    main()
