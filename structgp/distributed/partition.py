"""Which contiguous rows of an ``n``-row operator each rank owns."""

from __future__ import annotations

from structgp.distributed import process_group


def partition(n: int, world: int, unit: int = 1) -> tuple[tuple[int, int], ...]:
    """Every rank's ``(start, stop)`` rows of ``n``: contiguous, in rank order, made of whole ``unit``-row
    blocks (the last block of the operator may be shorter), the first ranks one block more when the blocks
    do not divide evenly.

    With ``unit`` the height of an operator's row blocks, each rank computes exactly the blocks one process
    would, so the gathered product is bitwise the one-process product. When there are fewer blocks than
    ranks the rows are split evenly instead (``unit = 1``). Raises ``ValueError`` when ``world > n``."""
    for name, value in (("n", n), ("world", world), ("unit", unit)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if world > n:
        raise ValueError(
            f"world: {world} processes for an operator of {n} rows; each rank needs at least one row "
            f"(launch at most {n} processes)"
        )
    blocks = -(-n // unit)
    if blocks < world:
        blocks, unit = n, 1
    size, extra = divmod(blocks, world)
    bounds, start = [], 0
    for r in range(world):
        stop = min(n, start + (size + (1 if r < extra else 0)) * unit)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def rows_of(n: int, rank: int, world: int, unit: int = 1) -> tuple[int, int]:
    """``(start, stop)``: rank ``rank``'s rows of ``n`` (see :func:`partition`)."""
    if isinstance(world, int) and world >= 1 and not (isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"rank: expected an int in [0, {world}), got {rank!r}")
    return partition(n, world, unit)[rank]


def row_range(n: int, unit: int = 1) -> tuple[tuple[int, int], ...] | None:
    """Every rank's rows of ``n`` under an active process group (:func:`partition`), else ``None``."""
    if not process_group.is_active():
        return None
    return partition(n, process_group.world(), unit)
