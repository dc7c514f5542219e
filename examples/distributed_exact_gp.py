"""An exact GP on synthetic data whose products and CG vectors are split by rows across processes.

    torchrun --standalone --nproc_per_node=2 examples/distributed_exact_gp.py --points 20000
    python examples/distributed_exact_gp.py --points 20000          # the same run in one process
    torchrun --standalone --nproc_per_node=2 examples/distributed_exact_gp.py --model lifted --points 200000

Every rank builds the same data (a fixed seed) and the same model; ``structgp.distributed.init()`` forms the
process group (gloo on CPU, NCCL with ``--device cuda``), after which the iterative engine keeps each rank's
rows of its vectors. ``--model kernel``: a matrix-free RBF kernel on scattered points, each rank computing
its rows of every kernel product. ``--model lifted``: the seed 002 model, an ``m^3`` RBF grid lifted to the
observations by a random sparse lift of 4 cells a row (``AggregationKernel``), each rank applying its rows
of the lift. Prints the plan, the world size, the time per optimiser iteration (one value and gradient of
the marginal likelihood) and the peak memory of each rank.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import warnings

import gpytorch
import torch

import structgp as sg
from structgp.kernels import AggregationKernel, MatrixFreeKernel
from structgp.models import ExactGP


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("kernel", "lifted"), default="kernel")
    parser.add_argument("--points", type=int, default=20000, help="training points")
    parser.add_argument("--d", type=int, default=3, help="input dimensions (kernel)")
    parser.add_argument("--grid", type=int, default=16, help="grid points a dimension of the latent grid (lifted)")
    parser.add_argument("--per-row", type=int, default=4, help="grid cells a row of the lift (lifted)")
    parser.add_argument("--iterations", type=int, default=5, help="Adam iterations")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a rank waits for the others")
    return parser.parse_args(argv)


def synthetic(n: int, d: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The same ``(x (n, d), y (n,))`` on every rank: a seeded generator on the CPU."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, d, generator=gen, dtype=torch.float64) * 4
    y = torch.sin(x.sum(-1)) + torch.cos(2 * x[:, 0]) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), y.to(device, dtype)


def kernel_model(args: argparse.Namespace, dtype: torch.dtype, device: str) -> ExactGP:
    """A matrix-free RBF GP on ``--points`` scattered points in ``--d`` dimensions."""
    x, y = synthetic(args.points, args.d, dtype, device)
    kernel = MatrixFreeKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=args.d)))
    return ExactGP(x, y, kernel)


def lifted_model(args: argparse.Namespace, dtype: torch.dtype, device: str) -> ExactGP:
    """The seed 002 model: a ``--grid``^3 RBF grid on [-5, 5]^3 lifted to ``--points`` rows of ``--per-row``
    random cells with random positive weights (the same on every rank: a seeded generator on the CPU)."""
    gen = torch.Generator().manual_seed(0)
    n, cells = args.points, args.grid**3
    cols = torch.randint(cells, (n, args.per_row), generator=gen).sort(-1).values
    keep = torch.ones_like(cols, dtype=torch.bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]  # a cell drawn twice in a row is kept once
    rows = torch.arange(n).unsqueeze(-1).expand_as(cols)
    values = torch.rand(n, args.per_row, generator=gen, dtype=torch.float64) + 0.2
    indices = torch.stack([rows[keep], cols[keep]])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        lift = torch.sparse_coo_tensor(indices, values[keep], (n, cells), check_invariants=True)
        lift = lift.coalesce().to_sparse_csr()
    latent = torch.sin(torch.linspace(0, 6, cells, dtype=torch.float64))
    y = lift @ latent + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    axis = torch.linspace(-5, 5, args.grid, dtype=torch.float64)
    rbf = gpytorch.kernels.RBFKernel()
    model = ExactGP(lift.to(dtype), y.to(dtype), AggregationKernel([rbf, rbf, rbf], [axis, axis, axis]))
    return model.to(device, dtype)


def peak_memory_mib(device: str) -> float:
    """This process's peak memory: GPU memory allocated by torch, else the resident set size."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    world = sg.distributed.init(timeout=args.timeout, backend="nccl" if args.device == "cuda" else "gloo")
    rank = sg.distributed.rank()
    device = f"cuda:{torch.cuda.current_device()}" if args.device == "cuda" else "cpu"
    dtype = getattr(torch, args.dtype)
    model = (kernel_model if args.model == "kernel" else lifted_model)(args, dtype, device)
    what = f"d = {args.d}" if args.model == "kernel" else f"a {args.grid}^3 latent grid"
    with sg.settings(method="cg"):
        if rank == 0:
            print(f"world size {world}, {args.model} model, n = {args.points}, {what}, {args.dtype} on {args.device}")
            print(sg.plan(model.train_covariance()))
        start = time.perf_counter()
        history = model.fit("adam", iterations=args.iterations, lr=0.05, progress=False)
        seconds = (time.perf_counter() - start) / max(1, args.iterations)
    if rank == 0:
        print(f"loss {history[0]:.6f} -> {history[-1]:.6f}; {seconds:.3f} s / iteration (value + gradient)")
    for r in range(world):  # one line a rank, in rank order
        if r == rank:
            print(f"rank {rank}: peak memory {peak_memory_mib(args.device):.0f} MiB", flush=True)
        if world > 1:
            torch.distributed.barrier()
    sg.distributed.shutdown()


if __name__ == "__main__":
    main()
