"""One matrix-free kernel product and its backward: time, peak memory and error against dense float64.

``KernelOperator(k, x) @ v`` for a scaled RBF (closed-form tile backward) and a scaled Matern 5/2 (the
generic backward under ``torch.func.vjp``) on N points in 3-D, ``v`` of 9 columns, float64, then
``torch.autograd.grad`` of ``<g, K v>`` in ``x``, ``v`` and the kernel's raw parameters. Each kernel runs in
its own subprocess (peak resident-set growth over the calls is its own), one intra-op thread, the second of
two repetitions timed. The error is against the dense float64 kernel (``k(x, x).to_dense()``, autograd)
where N is at most ``--dense-limit``.

    PYTHONPATH=. python benchmarks/bench_kernel_product.py --n 20000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import _RssPeak  # noqa: E402


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--dense-limit", type=int, default=4000, help="largest N checked against dense")
    parser.add_argument("--kernel", choices=("rbf", "matern"), default=None, help="(internal) run one kernel")
    return parser.parse_args(argv)


def _kernel(name: str):
    import gpytorch

    base = gpytorch.kernels.RBFKernel(ard_num_dims=3) if name == "rbf" else gpytorch.kernels.MaternKernel(nu=2.5)
    return gpytorch.kernels.ScaleKernel(base).double()


def _one(args: argparse.Namespace) -> dict:
    from structgp.covariance import KernelOperator

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, 3, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(args.n, 9, generator=gen, dtype=torch.float64).requires_grad_()
    g = torch.randn(args.n, 9, generator=gen, dtype=torch.float64)
    k = _kernel(args.kernel)
    leaves = [x, v, *k.parameters()]
    with _RssPeak() as rss:
        for _ in range(2):
            start = time.perf_counter()
            out = KernelOperator(k, x) @ v
            middle = time.perf_counter()
            grads = torch.autograd.grad((out * g).sum(), leaves)
            stop = time.perf_counter()
    error = None
    if args.n <= args.dense_limit:
        dense = k(x, x).to_dense() @ v
        ref = torch.autograd.grad((dense * g).sum(), leaves)
        error = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip([out, *grads], [dense, *ref]))
    return {"kernel": args.kernel, "forward": middle - start, "backward": stop - middle,
            "peak_mib": (rss.peak - rss.base) / 2**20, "error": error}


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    if args.kernel is not None:
        print(json.dumps(_one(args)))
        return
    print(f"one product K v (9 columns) + backward, N = {args.n}, d = 3, float64, 1 thread")
    print(f"{'kernel':>8} {'forward s':>10} {'backward s':>11} {'peak MiB':>9} {'error vs dense':>15}")
    for name in ("rbf", "matern"):
        command = [sys.executable, __file__, "--n", str(args.n), "--dense-limit", str(args.dense_limit),
                   "--kernel", name]
        line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        r = json.loads(line)
        error = "-" if r["error"] is None else f"{r['error']:.1e}"
        print(f"{name:>8} {r['forward']:10.2f} {r['backward']:11.2f} {r['peak_mib']:9.0f} {error:>15}")


if __name__ == "__main__":
    main()
