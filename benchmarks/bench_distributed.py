"""Strong scaling of an exact GP across processes (structgp.distributed, gloo on CPU / NCCL on GPU).

One value + gradient of the marginal likelihood of an ``ExactGP`` (``settings(method="cg")``, float64), with
1, 2, ... processes of one intra-op thread each (and one process with as many threads as the largest world,
the fair comparison on the same cores), for one of two models:

    kernel   a matrix-free RBF kernel (``MatrixFreeKernel``) on N points in d dimensions: each rank computes
             its whole row tiles of every kernel product
    lifted   the seed 002 model with a general lift: an m^3 RBF grid lifted to N observations by a random
             sparse lift of ``--per-row`` cells a row (``AggregationKernel``, ``SparseLifted``): each rank
             applies its rows of the lift (one all-reduce of the latent vectors, one all-gather of the rows)

Each configuration runs in fresh processes spawned by ``torch.multiprocessing``:

    seconds wall time of one value + gradient (the slowest rank), after ``--warmup`` untimed calls
    cpu     each rank's CPU seconds over that call (robust to other jobs on a shared machine)
    peak    each rank's resident-set growth over the timed call (CPU; torch's peak on a GPU)
    live    with --live-tensors: each rank's peak live tensor memory over that call (storage from creation to
            release, counted by a dispatch mode: the allocator's and the runtime's own memory left out)
    rows    rank 0's rows of the operator (kernel: with the tile, rows x columns, its products evaluate)

    PYTHONPATH=. python benchmarks/bench_distributed.py --n 30000 --worlds 1 2
    PYTHONPATH=. python benchmarks/bench_distributed.py --n 30000 --num-probes 32 --precond-rank 256 --warmup 0 \
        --mmap-threshold 1048576 --live-tensors   # the library's defaults; peak memory that follows live memory
    PYTHONPATH=. python benchmarks/bench_distributed.py --model lifted --n 200000 --m 16
    python benchmarks/bench_distributed.py --device cuda --n 200000 --worlds 1 2 4 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _harness import _RssPeak  # noqa: E402

from tests.memory_guard import LivePeak  # noqa: E402


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("kernel", "lifted"), default="kernel")
    parser.add_argument("--n", type=int, default=30000, help="observations")
    parser.add_argument("--d", type=int, default=3, help="input dimensions (kernel)")
    parser.add_argument("--m", type=int, default=16, help="grid points a dimension of the 3-d latent grid (lifted)")
    parser.add_argument("--per-row", type=int, default=4, help="grid cells a row of the lift (lifted)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--num-probes", type=int, default=8)
    parser.add_argument("--precond-rank", type=int, default=32, help="pivoted Cholesky rank (library default 256)")
    parser.add_argument("--max-iter", type=int, default=20, help="CG iterations cap (the same for every world)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (0 for long runs)")
    parser.add_argument(
        "--live-tensors", action="store_true",
        help="also count each rank's peak live tensor memory (every tensor's storage from creation to release, "
        "by a dispatch mode: tests/memory_guard.LivePeak; slows the call a little)",
    )
    parser.add_argument("--json", type=str, default=None)
    parser.add_argument(
        "--mmap-threshold", type=int, default=None,
        help="bytes: glibc's MALLOC_MMAP_THRESHOLD_ for the workers (e.g. 1048576), so that freed large blocks "
        "return to the OS and the resident set follows live memory (glibc's default keeps freed blocks under "
        "its dynamic threshold, up to 32 MiB, in the heap)",
    )
    return parser.parse_args(argv)


def _worker(rank: int, world: int, threads: int, port: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(threads)
    import structgp as sg

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        if args.device == "cuda":
            os.environ["LOCAL_RANK"] = str(rank)
        sg.distributed.init(timeout=1800)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    model = (_kernel_model if args.model == "kernel" else _lifted_model)(args).to(device, torch.float64)
    params = list(model.parameters())
    # a fixed iteration count (cg_tol unreachable): every configuration does the same work
    options = dict(method="cg", num_probes=args.num_probes, max_iter=args.max_iter, cg_tol=1e-30,
                   precond_rank=args.precond_rank)

    def value_and_gradient() -> float:
        loss = model.loss()
        torch.autograd.grad(loss, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return float(loss)

    with sg.settings(**options), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CG iteration cap is reached on purpose
        for _ in range(args.warmup):
            value_and_gradient()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        live = LivePeak() if args.live_tensors else contextlib.nullcontext()
        with _RssPeak() as rss, live:
            start, cpu = time.perf_counter(), time.process_time()
            value = value_and_gradient()
            seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        op = model.train_covariance().base
        tile = op.tile() if args.model == "kernel" else None
        parts = sg.distributed.row_range(op.n, 1 if tile is None else tile[0])
        rows = op.n if parts is None else parts[0][1] - parts[0][0]
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak - rss.base
    result = {"rank": rank, "seconds": seconds, "cpu": cpu, "peak_mib": peak / 2**20, "value": value, "rows": rows,
              "tile": tile, "live_mib": live.peak / 2**20 if args.live_tensors else None}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    sg.distributed.shutdown()


def _kernel_model(args: argparse.Namespace):
    """An ExactGP on a matrix-free RBF kernel, N points in d dimensions."""
    import gpytorch

    from structgp.kernels import MatrixFreeKernel
    from structgp.models import ExactGP

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.n, args.d, generator=gen, dtype=torch.float64) * 4
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(args.n, generator=gen, dtype=torch.float64)
    return ExactGP(x, y, MatrixFreeKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())))


def _lifted_model(args: argparse.Namespace):
    """The example's seed 002 model (``examples/distributed_exact_gp.lifted_model``): an m^3 RBF grid on
    [-5, 5]^3, N rows of ``per_row`` random cells with random positive weights."""
    from distributed_exact_gp import lifted_model

    return lifted_model(argparse.Namespace(points=args.n, grid=args.m, per_row=args.per_row), torch.float64, "cpu")


def run(world: int, threads: int, args: argparse.Namespace, folder: Path) -> list[dict]:
    for old in folder.glob("rank*.json"):
        old.unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, threads, port, args, str(folder)), nprocs=world, start_method="spawn")
    return [json.loads(Path(folder, f"rank{r}.json").read_text()) for r in range(world)]


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_distributed_{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    if args.mmap_threshold is not None:  # read by glibc when each spawned worker starts
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    configs = [(w, 1) for w in args.worlds]
    if args.device == "cpu" and max(args.worlds) > 1:
        configs.append((1, max(args.worlds)))
    rows = []
    for world, threads in configs:
        ranks = run(world, threads, args, folder)
        rows.append({"world": world, "threads": threads, "ranks": ranks,
                     "seconds": max(r["seconds"] for r in ranks)})
        print(f"  done: {world} process(es) x {threads} thread(s): {rows[-1]['seconds']:.2f} s", flush=True)
    base = rows[0]["seconds"]
    what = f"N = {args.n}, d = {args.d}" if args.model == "kernel" else (
        f"N = {args.n} rows of {args.per_row} cells of a {args.m}^3 grid")
    print(f"\nstrong scaling, {args.model}: {what}, float64, {args.device}, {args.num_probes} probes, "
          f"preconditioner rank {args.precond_rank}, {args.max_iter} CG iterations (one value + gradient)"
          + ("" if args.mmap_threshold is None else f", MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}"))
    head = (f"{'processes':>9} {'threads':>7} {'seconds':>9} {'vs 1x1':>7} {'cpu s / rank':>16} "
            f"{'peak MiB / rank':>16} {'live MiB / rank':>16} {'rows (tile)':>18} {'loss':>14}")
    print(head)
    print("-" * len(head))
    for row in rows:
        peaks = " ".join(f"{r['peak_mib']:.0f}" for r in row["ranks"])
        cpus = " ".join(f"{r['cpu']:.1f}" for r in row["ranks"])
        lives = " ".join("-" if r["live_mib"] is None else f"{r['live_mib']:.1f}" for r in row["ranks"])
        first = row["ranks"][0]
        part = f"{first['rows']}" + ("" if first["tile"] is None else " ({} x {})".format(*first["tile"]))
        print(f"{row['world']:9d} {row['threads']:7d} {row['seconds']:9.2f} {row['seconds'] / base:6.2f}x "
              f"{cpus:>16} {peaks:>16} {lives:>16} {part:>18} {first['value']:14.10f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
