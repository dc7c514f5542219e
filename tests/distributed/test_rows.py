"""``structgp.distributed.rows.Rows``'s sums over ranks on 2 gloo ranks: in rank order, the same on every rank,
and a large tensor's sum gathered a chunk at a time equal to the sum gathered whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import structgp as sg
from structgp.distributed import rows
from structgp.distributed.rows import Rows
from tests.distributed.spawn import join, spawn

SHAPE = (5, 11)  # 55 entries: 8 chunks of 7 when SUM_CHUNK is 7


def rank_tensor(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randn(SHAPE, generator=gen, dtype=torch.float64) * 10.0 ** torch.arange(SHAPE[1])


def _session(rank: int, world: int, port: int, folder: str) -> None:
    join(rank, world, port, folder, timeout=60.0)
    part = Rows.of(10)
    t = rank_tensor(rank)
    out = {"whole": part.sum(t), "stack": part.stack(t, "a test tensor"), "scalar": part.sum(t[0, 0])}
    rows.SUM_CHUNK = 7
    out["chunked"] = part.sum(t)
    torch.save(out, Path(folder, f"rank{rank}.pt"))
    sg.distributed.shutdown()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn(_session, tmp_path_factory.mktemp("rows"))


def test_sums_are_in_rank_order_and_bitwise_the_same_on_every_rank(ranks):
    expected = rank_tensor(0) + rank_tensor(1)
    for out in ranks:
        assert torch.equal(out["stack"], torch.stack([rank_tensor(0), rank_tensor(1)]))
        assert torch.equal(out["whole"], expected)
        assert torch.equal(out["chunked"], expected)  # gathered 7 entries at a time
        assert out["scalar"].shape == () and torch.equal(out["scalar"], expected[0, 0])
