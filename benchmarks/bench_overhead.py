"""Small-call overhead: ``MultivariateNormal(mu, S).log_prob(y)`` + backward on a small dense SPD ``S``.

BoTorch's acquisition optimisation makes thousands of such calls, where the Python around the Cholesky
factorisation costs as much as the factorisation itself. Four contenders compute the same value from a
fresh graph each call (``S`` requires grad; the backward fills ``S.grad``):

    structgp        structgp.distributions.MultivariateNormal(mu, Dense(S)) (argument validation on)
    torch           torch.distributions.MultivariateNormal(mu, covariance_matrix=S)
    gpytorch        gpytorch.distributions.MultivariateNormal(mu, S)
    raw             L = cholesky(S); z = L^{-1} (y - mu); -1/2 (|z|^2 + 2 sum log diag L + n log 2 pi)

One thread, one process, the contenders interleaved call by call (in a shuffled order each round) so that
noise from other processes falls on all of them alike; times are medians of many calls.

    python benchmarks/bench_overhead.py                   # n = 16, 64, 256; float64 then float32
    python benchmarks/bench_overhead.py --n 16 --reps 5000 --dtypes float64 --json overhead.json
    python benchmarks/bench_overhead.py --device cuda           # GPU: each call ends with a synchronisation

Columns: median times, the ratios structgp / torch.distributions and structgp / raw, and the differences of
structgp's value and of its gradient dS from torch.distributions'.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import Result, environment, write_json  # noqa: E402

import structgp.distributions as sgd  # noqa: E402
from structgp.covariance import Dense  # noqa: E402

IMPLS = ("structgp", "torch", "gpytorch", "raw")
_LOG_2PI = math.log(2 * math.pi)


def problem(
    n: int, dtype: torch.dtype, device: torch.device | str = "cpu", matrix: str = "exact", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(S, mu, y)``: an SPD RBF kernel matrix plus noise ``(n, n)`` (a leaf that requires grad), two ``(n,)``.

    ``matrix="exact"``: ``S`` equals its transpose entry for entry; ``"product"``: the squared distances come
    from the matrix-product formula ``|x|^2 + |y|^2 - 2 x y^T`` (as gpytorch's kernels compute them), which
    leaves ``S`` symmetric only to rounding."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, generator=g, dtype=torch.float64).to(dtype)
    sq = x.square().sum(-1)
    dist2 = (sq[:, None] + sq[None, :] - 2 * x @ x.mT).clamp_min(0)
    s = torch.exp(-0.5 * dist2 / 0.5**2) + 0.1 * torch.eye(n, dtype=dtype)
    if matrix == "exact":
        s = (s + s.mT) / 2
    s = s.to(device).requires_grad_(True)
    mu = torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype)
    y = torch.randn(n, generator=g, dtype=torch.float64).to(device, dtype)
    if matrix == "product" and torch.equal(s, s.mT):
        warnings.warn(f"n={n}: the matrix-product formula happened to give an exactly symmetric S", stacklevel=2)
    return s, mu, y


def contenders(s: torch.Tensor, mu: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """One closure per implementation: log_prob + backward from a fresh graph; returns the value."""
    import gpytorch

    sync = torch.cuda.synchronize if s.device.type == "cuda" else (lambda: None)

    def run(log_prob: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            s.grad = None
            out = log_prob()
            out.backward()
            sync()  # on a GPU: the time until the gradient is there
            return out.detach()

        return call

    def raw() -> torch.Tensor:
        factor = torch.linalg.cholesky(s)
        z = torch.linalg.solve_triangular(factor, (y - mu)[..., None], upper=False)
        logdet = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        return -0.5 * (z.square().sum((-2, -1)) + logdet + s.shape[-1] * _LOG_2PI)

    return {
        "structgp": run(lambda: sgd.MultivariateNormal(mu, Dense(s)).log_prob(y)),
        "torch": run(lambda: torch.distributions.MultivariateNormal(mu, covariance_matrix=s).log_prob(y)),
        "gpytorch": run(lambda: gpytorch.distributions.MultivariateNormal(mu, s).log_prob(y)),
        "raw": run(raw),
    }


def interleaved(fns: dict[str, Callable[[], torch.Tensor]], reps: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of each closure over ``reps`` rounds; each round calls every closure once, in a
    shuffled order (the garbage collector is paused so that its pauses do not land on one contender)."""
    names = list(fns)
    times: dict[str, list[float]] = {k: [] for k in names}
    order = random.Random(seed)
    for fn in fns.values():  # warm-up: first-call costs (lazy imports, caches) are not measured
        for _ in range(5):
            fn()
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            order.shuffle(names)
            for k in names:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def values(fns: dict[str, Callable[[], torch.Tensor]], s: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """Each contender's value and the largest difference of its gradient ``dS`` from torch.distributions'."""
    vals, grads = {}, {}
    for k, fn in fns.items():
        vals[k] = float(fn())
        grads[k] = s.grad.clone()
    return vals, {k: float((g - grads["torch"]).abs().max()) for k, g in grads.items()}


def default_reps(n: int) -> int:
    return {16: 3000, 64: 2000}.get(n, 600)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="16,64,256", help="comma-separated matrix sizes")
    parser.add_argument("--dtypes", default="float64,float32", help="comma-separated: float64,float32")
    parser.add_argument("--reps", type=int, default=0, help="rounds per size (0: 3000 / 2000 / 600 by size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--matrix", choices=["exact", "product"], default="exact",
                        help="S exactly symmetric, or symmetric to rounding (a kernel from a matrix product)")
    parser.add_argument("--json", default="", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # gpytorch's float32 numerical warnings would flood the table
            results = [r for d in filter(None, args.dtypes.split(",")) for r in table(args, getattr(torch, d))]
    finally:
        torch.set_num_threads(threads)  # run_all goes on with the next suite in this process
    if args.json:
        write_json(args.json, results, {**environment(torch.device(args.device)), "threads": args.threads})
    return results


def table(args: argparse.Namespace, dtype: torch.dtype) -> list[Result]:
    """Measure and print one block (one dtype, every size)."""
    name = str(dtype).replace("torch.", "")
    print(f"\n{name} on {args.device}, {args.threads} thread(s), S exactly symmetric"
          if args.matrix == "exact" else
          f"\n{name} on {args.device}, {args.threads} thread(s), S symmetric to rounding (matrix-product kernel)")
    print("log_prob + backward, median microseconds")
    head = (f"{'n':>5} {'structgp':>9} {'torch':>9} {'gpytorch':>9} {'raw':>9} "
            f"{'sg/torch':>9} {'sg/raw':>8} {'|sg-torch|':>11} {'|dS diff|':>10}")
    print(head)
    print("-" * len(head))
    results = []
    for n in [int(s) for s in args.n.split(",") if s]:
        s, mu, y = problem(n, dtype, args.device, args.matrix)
        fns = contenders(s, mu, y)
        got, grad_err = values(fns, s)
        err = abs(got["structgp"] - got["torch"])
        tol = 1e-10 if dtype == torch.float64 else 1e-4 * max(1.0, abs(got["torch"]))
        med = interleaved(fns, args.reps or default_reps(n))
        us = {k: 1e6 * v for k, v in med.items()}
        flag = "" if err <= tol else "  MISMATCH"
        print(f"{n:>5} {us['structgp']:9.1f} {us['torch']:9.1f} {us['gpytorch']:9.1f} {us['raw']:9.1f} "
              f"{us['structgp'] / us['torch']:8.2f}x {us['structgp'] / us['raw']:7.2f}x {err:11.1e} "
              f"{grad_err['structgp']:10.1e}{flag}", flush=True)
        for k in IMPLS:
            rel = abs(got[k] - got["torch"]) / abs(got["torch"])
            results.append(Result(f"n={n} {name}", k, round(1e3 * med[k], 5), None, got[k], rel))
    return results

if __name__ == "__main__":
    main()
