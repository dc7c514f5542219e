"""DistributedError: a collective that did not complete, or ranks that do not run the same computation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class DistributedError(RuntimeError):
    """Raised on every rank that notices: a rank that died or never arrived (after the process group's
    timeout), or ranks whose data, settings or intermediate results differ."""


@contextlib.contextmanager
def explained(what: str, rank: int, world: int) -> Iterator[None]:
    """Re-raise a failed collective (a timeout, a peer that closed its connection) as a
    :class:`DistributedError` that says which rank saw it, what it was doing and what to check."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, ValueError) as err:  # torch.distributed's DistError family derives from RuntimeError
        raise DistributedError(
            f"rank {rank} of {world}: {what} did not complete ({type(err).__name__}: {_first_line(err)}); "
            "another rank died, never arrived within the process group's timeout (see "
            "structgp.distributed.init(timeout=...)), or is running a different computation: every rank must "
            "run the same code on the same data and settings"
        ) from err


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""
