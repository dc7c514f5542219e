"""Spawning a gloo process group of a few ranks (torch.multiprocessing, 127.0.0.1) for the distributed tests."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

import structgp as sg


def join(rank: int, world: int, port: int, folder: str, timeout: float) -> None:
    """Form the group: every rank waits at a file barrier first (imports take uneven time on a loaded
    machine, and the rendezvous shares the collectives' timeout)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    Path(folder, f"ready{rank}").touch()
    while not all(Path(folder, f"ready{r}").exists() for r in range(world)):
        time.sleep(0.01)
    assert sg.distributed.init(timeout=timeout) == world


def spawn(session: Callable[[int, int, int, str], None], folder: Path, world: int = 2) -> list[dict | None]:
    """Run ``session(rank, world, port, folder)`` on ``world`` spawned ranks; what each saved as
    ``folder/rank{r}.pt`` (None where a rank saved nothing)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(session, args=(world, port, str(folder)), nprocs=world, join=True, start_method="spawn")
    return [torch.load(folder / f"rank{r}.pt") if (folder / f"rank{r}.pt").exists() else None for r in range(world)]
