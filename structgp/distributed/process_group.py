"""The process group: set up from torchrun's environment, and who this process is in it.

Nothing is kept here beyond ``torch.distributed``'s own state: :func:`init` forms the default process group,
:func:`world` and :func:`rank` read it, :func:`is_active` says whether products are partitioned.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from structgp.distributed.errors import DistributedError

BACKENDS = ("gloo", "nccl")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # what torchrun (and the env:// method) sets


def init(timeout: float = 600.0, backend: str | None = None) -> int:
    """Form the default process group from torchrun's environment; returns the world size.

    timeout: seconds a collective (and the initial rendezvous) may wait for the other ranks before every
    waiting rank raises a :class:`DistributedError` instead of hanging; backend: ``"nccl"`` when CUDA is
    available, else ``"gloo"`` (each NCCL rank uses the GPU ``LOCAL_RANK``; NCCL reports a timeout from its
    watchdog thread, which ends the process, rather than as an exception). Without torchrun's variables
    (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) this is a single process: nothing is set
    up and 1 is returned, so the same script runs under ``python`` and ``torchrun``. Calling it again
    returns the current world size.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        return 1
    if not dist.is_available():
        raise DistributedError("torch.distributed is not available in this PyTorch build")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    rank_, world_ = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as err:  # DistStoreError (rendezvous timeout) is a RuntimeError
        raise DistributedError(
            f"rank {rank_} of {world_}: the process group did not form within {timeout:g} s "
            f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
            f"a rank never arrived: check that all {world_} processes started and reach "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        ) from err
    return world_


def shutdown() -> None:
    """Destroy the default process group (if any); afterwards everything is single-process again."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def world() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_active() -> bool:
    """Whether products are partitioned: a process group is initialised and has more than one process."""
    return world() > 1


def device() -> torch.device:
    """Where this rank's collective buffers live: its GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
