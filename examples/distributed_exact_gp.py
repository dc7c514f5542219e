"""An exact GP on synthetic data whose kernel products are split by rows across processes.

    torchrun --standalone --nproc_per_node=2 examples/distributed_exact_gp.py --points 20000
    python examples/distributed_exact_gp.py --points 20000          # the same run in one process

Every rank builds the same data (a fixed seed) and the same model; ``structgp.distributed.init()`` forms the
process group (gloo on CPU, NCCL with ``--device cuda``), after which each matrix-free kernel product is
computed by rows on every rank and gathered. Prints the plan, the world size, the time per optimiser
iteration (one value and gradient of the marginal likelihood) and the peak memory of each rank.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import gpytorch
import torch

import structgp as sg
from structgp.kernels import MatrixFreeKernel
from structgp.models import ExactGP


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=20000, help="training points")
    parser.add_argument("--d", type=int, default=3, help="input dimensions")
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
    x, y = synthetic(args.points, args.d, getattr(torch, args.dtype), device)
    kernel = MatrixFreeKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=args.d)))
    model = ExactGP(x, y, kernel).to(device, getattr(torch, args.dtype))
    with sg.settings(method="cg"):
        if rank == 0:
            print(f"world size {world}, n = {args.points}, d = {args.d}, {args.dtype} on {args.device}")
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
