"""structgp.distributed: 2 gloo processes (torch.multiprocessing, 127.0.0.1) against one process.

One spawned session runs every scenario that needs a healthy process group (value, gradients, predictions,
a 5-iteration fit, the rank-mismatch error, a world larger than the rows) and ends with a rank that dies;
a second session has a rank that never arrives at a collective (a short timeout); a third runs the example
under ``torchrun``. The parent compares with the same computations in this (single) process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import gpytorch
import pytest
import torch

import structgp as sg
from structgp.covariance import KernelOperator
from structgp.distributed import DistributedError, rows_of
from structgp.kernels import MatrixFreeKernel
from structgp.models import ExactGP
from tests.distributed.spawn import join, spawn

ROOT = Path(__file__).resolve().parent.parent
N, D = 203, 2
BLOCK = 16  # kernel tiles of BLOCK x BLOCK in float64 (the budget below): 13 row tiles, 7 on rank 0, 6 on rank 1
SETTINGS = {  # a low preconditioner rank: 35 CG steps to 1e-10; solved to 1e-12 (two correct solves differ by about
    # the solver tolerance, and the ranks sum over rows in another order than one process)
    "method": "cg", "precond_rank": 20, "num_probes": 8, "cg_tol": 1e-12, "memory_budget": 32 * BLOCK * BLOCK * 8,
}
FIT_ITERATIONS = 5
SHORT_TIMEOUT = 3.0  # seconds a rank waits for one that never arrives


# -- the problem (the same in every process) --------------------------------------------------------------


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(N, D, generator=gen, dtype=torch.float64) * 4
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)
    xs = torch.rand(17, D, generator=gen, dtype=torch.float64) * 4
    return x, y, xs


def model(x: torch.Tensor, y: torch.Tensor) -> ExactGP:
    kernel = MatrixFreeKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()))
    gp = ExactGP(x, y, kernel).double()
    gp.likelihood.noise = 0.05
    return gp


def evaluate() -> dict[str, torch.Tensor]:
    """Value, gradients, predictions and a short fit's hyperparameters (in one process or on each rank)."""
    x, y, xs = data()
    gp = model(x, y)
    with sg.settings(**SETTINGS):
        loss = gp.loss()
        grads = torch.autograd.grad(loss, list(gp.parameters()))
        mean, var = gp.predict(xs)
        fitted = model(x, y)
        fitted.fit("adam", iterations=FIT_ITERATIONS, lr=0.05, progress=False)
    out = {"loss": loss.detach(), "mean": mean, "var": var}
    out.update({f"grad {i}": g for i, g in enumerate(grads)})
    out.update({f"fit {name}": p.detach().clone() for name, p in fitted.named_parameters()})
    return out


def evaluate_float32() -> dict[str, torch.Tensor]:
    """The loss and its gradients in float32 (same data, rounded)."""
    x, y, _ = data()
    gp = model(x.float(), y.float()).float()
    with sg.settings(**SETTINGS, check_values=False):
        loss = gp.loss()
        grads = torch.autograd.grad(loss, list(gp.parameters()))
    return {"loss32": loss.detach(), **{f"grad32 {i}": g for i, g in enumerate(grads)}}


def product_gradcheck() -> bool:
    """gradcheck of ``K(x, x) @ v`` in x, v and the lengthscale (7 rows: the ranks own 4 and 3)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(7, 2, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(7, 3, generator=gen, dtype=torch.float64).requires_grad_()
    kernel = gpytorch.kernels.RBFKernel().double()
    raw = kernel.raw_lengthscale.detach().clone().requires_grad_()
    return torch.autograd.gradcheck(lambda x, v, raw: KernelOperator(kernel, x, [raw]) @ v, (x, v, raw))


def batched_product() -> torch.Tensor:
    """``K(x, x) @ v`` for a batch of 2 input sets and a batch of lengthscales ``(2, 9, 3)``, its value and
    the gradient of a weighted sum in ``x`` (concatenated)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 9, 2, generator=gen, dtype=torch.float64).requires_grad_()
    v = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64)
    kernel = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2])).double()
    kernel.lengthscale = torch.tensor([[[0.3]], [[0.7]]], dtype=torch.float64)
    out = KernelOperator(kernel, x) @ v
    (grad,) = torch.autograd.grad((out * v).sum(), x)
    return torch.cat([out.detach().flatten(), grad.flatten()])


# -- the spawned ranks ------------------------------------------------------------------------------------


def _healthy_session(rank: int, world: int, port: int, folder: str) -> None:
    join(rank, world, port, folder, timeout=60.0)
    out: dict[str, object] = {**evaluate(), **evaluate_float32(), "gradcheck": product_gradcheck(),
                               "batched": batched_product()}
    out["world"], out["rank"], out["active"] = sg.distributed.world(), sg.distributed.rank(), sg.distributed.is_active()
    x, y, _ = data()
    with sg.settings(**SETTINGS):
        out["part"] = model(x, y).train_covariance().base._spec()[3]  # every rank's rows
    y_rank = y.clone()
    if rank == 1:
        y_rank[7] += 1e-3
    try:
        model(x, y_rank)
    except DistributedError as err:
        out["mismatch"] = str(err)
    op = KernelOperator(gpytorch.kernels.RBFKernel().double(), x[:1])
    try:
        op @ torch.ones(1, 1, dtype=torch.float64)
    except ValueError as err:
        out["too many ranks"] = str(err)
    torch.save(out, Path(folder, f"rank{rank}.pt"))
    gp = model(x, y)  # collective (the fingerprint check): both ranks
    if rank == 1:  # this rank dies: rank 0's next collective must fail with a clear error, not hang
        os._exit(0)  # abruptly (no process-group teardown racing rank 0's first message)
    out["dead rank"], out["dead rank seconds"] = _failing_loss(gp)
    torch.save(out, Path(folder, f"rank{rank}.pt"))


def _absent_session(rank: int, world: int, port: int, folder: str) -> None:
    join(rank, world, port, folder, timeout=SHORT_TIMEOUT)
    x, y, _ = data()
    gp = model(x, y)  # collective (the fingerprint check): both ranks
    if rank == 1:  # alive, but never arrives at the collective: it waits until rank 0 has given up
        deadline = time.monotonic() + SHORT_TIMEOUT + 30
        while not Path(folder, "rank0.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os._exit(0)  # without tearing down a process group whose peer gave up
    error, seconds = _failing_loss(gp)
    torch.save({"error": error, "seconds": seconds}, Path(folder, f"rank{rank}.pt"))


def _failing_loss(gp: ExactGP) -> tuple[str | None, float]:
    """The ``DistributedError`` message of a loss whose collectives the other rank never joins, and how
    long it took to appear."""
    start = time.perf_counter()
    try:
        with sg.settings(**SETTINGS):
            gp.loss()
    except DistributedError as err:
        return str(err), time.perf_counter() - start
    return None, time.perf_counter() - start


@pytest.fixture(scope="module")
def healthy(tmp_path_factory) -> list[dict]:
    return spawn(_healthy_session, tmp_path_factory.mktemp("healthy"))


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    assert not sg.distributed.is_active()
    return evaluate()


# -- tests ------------------------------------------------------------------------------------------------


def test_two_processes_equal_one_process(healthy, reference):
    for out in healthy:
        assert (out["world"], out["active"]) == (2, True)
        assert out["part"] == ((0, 7 * BLOCK), (7 * BLOCK, N))  # whole row tiles
        # the same pivots, probes and recursion on each rank's rows; only the order of the sums over rows differs
        for key in ("loss", "mean", "var", *(k for k in reference if k.startswith("grad"))):
            torch.testing.assert_close(out[key], reference[key], rtol=1e-10, atol=1e-10, msg=key)
    # the gradient is not trivially zero, and the predictions are a fit (a test that can fail)
    assert any(reference[k].abs().max() > 1e-3 for k in reference if k.startswith("grad"))


def test_float32_two_processes_match_one_process(healthy):
    reference = evaluate_float32()
    for out in healthy:
        for key, value in reference.items():
            torch.testing.assert_close(out[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_batched_partitioned_product_and_its_gradient_equal_one_process(healthy):
    reference = batched_product()
    for out in healthy:
        torch.testing.assert_close(out["batched"], reference, rtol=1e-12, atol=1e-12)


def test_partitioned_product_passes_gradcheck(healthy):
    assert healthy[0]["gradcheck"] and healthy[1]["gradcheck"]


def test_ranks_hold_bitwise_identical_results(healthy):
    for key, value in healthy[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, healthy[1][key]), key


def test_a_short_fit_leaves_identical_hyperparameters_on_every_rank(healthy, reference):
    keys = [k for k in reference if k.startswith("fit")]
    assert keys
    x, y, _ = data()
    start = dict(model(x, y).named_parameters())
    for key in keys:
        assert torch.equal(healthy[0][key], healthy[1][key]), key
        torch.testing.assert_close(healthy[0][key], reference[key], rtol=1e-8, atol=1e-10)
    assert any(not torch.equal(reference[k], start[k[4:]]) for k in keys)  # the fit moved


def test_a_rank_with_other_data_is_named_on_every_rank(healthy):
    for out in healthy:
        assert "rank 1's train_y differs from rank 0's" in out["mismatch"]


def test_more_ranks_than_rows_is_an_error(healthy):
    for out in healthy:
        assert "world: 2 processes for an operator of 1 rows" in out["too many ranks"]
    with pytest.raises(ValueError, match="world: 3 processes"):
        rows_of(2, 0, 3)


def test_a_dead_rank_gives_a_clear_error(healthy):
    message = healthy[0]["dead rank"]
    # the first collective of a loss: the partitioned pivoted Cholesky preconditioner's first pivot
    assert "rank 0 of 2: gathering the largest diagonal did not complete" in message
    assert "another rank died" in message
    assert healthy[0]["dead rank seconds"] < 30


def test_a_rank_that_never_arrives_times_out_with_a_clear_error(tmp_path):
    out = spawn(_absent_session, tmp_path)[0]
    assert "rank 0 of 2: gathering the largest diagonal did not complete" in out["error"]
    assert "Timed out" in out["error"] and "never arrived within the process group's timeout" in out["error"]
    assert SHORT_TIMEOUT * 0.9 <= out["seconds"] < SHORT_TIMEOUT + 10


def test_rows_cover_the_operator_once_in_order_by_whole_blocks():
    for n, world, unit in [(1, 1, 1), (7, 3, 1), (203, 2, 1), (8, 8, 1), (203, 2, 16), (203, 3, 16), (10, 4, 3),
                           (5, 3, 4)]:
        parts = [rows_of(n, r, world, unit) for r in range(world)]
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(parts, parts[1:]))
        aligned = -(-n // unit) >= world  # enough blocks: every rank starts at a block boundary
        step = unit if aligned else 1
        assert all(a % step == 0 for a, _ in parts)
        sizes = [-(-(b - a) // step) for a, b in parts]
        assert max(sizes) - min(sizes) <= 1
    assert rows_of(203, 1, 2, 16) == (112, 203)
    for bad in [dict(n=0, rank=0, world=1), dict(n=3, rank=1, world=1), dict(n=3, rank=0, world=0)]:
        with pytest.raises(ValueError, match=next(k for k in ("n", "rank", "world") if k in str(bad))):
            rows_of(**bad)


def test_without_init_everything_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert sg.distributed.init(timeout=5) == 1  # no torchrun environment: nothing to set up
    assert (sg.distributed.world(), sg.distributed.rank(), sg.distributed.is_active()) == (1, 0, False)
    assert sg.distributed.row_range(10) is None
    sg.distributed.check_consistent(x=torch.ones(3))  # a no-op
    x, _, _ = data()
    op = KernelOperator(gpytorch.kernels.RBFKernel().double(), x)
    v = torch.randn(N, 2, dtype=torch.float64)
    torch.testing.assert_close(op @ v, gpytorch.kernels.RBFKernel().double()(x, x).to_dense() @ v)


def test_init_validates_its_arguments():
    with pytest.raises(ValueError, match="timeout"):
        sg.distributed.init(timeout=0)
    with pytest.raises(ValueError, match="backend"):
        sg.distributed.init(backend="mpi")


@pytest.mark.parametrize("model", ["kernel", "lifted"])
def test_torchrun_runs_the_example(model):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "examples" / "distributed_exact_gp.py"), "--model", model, "--points", "300", "--grid", "4",
           "--iterations", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"world size 2, {model} model" in done.stdout and "s / iteration" in done.stdout
    assert done.stdout.count("peak memory") == 2  # one line a rank
