"""Expected wall time of an engine: its work by kind, divided by throughputs measured on this kind of device.

Flops alone do not rank a dense Cholesky against conjugate gradients: a Cholesky factorisation, its
backward (two triangular solves with ``n`` right-hand sides) and a product with a few dozen columns run
at different rates, and passes over memory (materialising a dense matrix, its gradient) are bound by
bandwidth. An engine's :meth:`~structgp.inference.plan.Engine.cost` therefore states its work by kind
and :func:`seconds` turns it into the expected time of the call, from constants measured once per device
kind and dtype. The call is one value, and its gradient when it will be differentiated
(:func:`differentiated`: grad mode is on and a tensor of the operator requires grad; a training step, where
the backward of a dense Cholesky costs six times its factorisation). Planning stays free of numerical
work: the constants are numbers in this file, and nothing is timed or read from a tensor's values here.

Measured constants (``python benchmarks/bench_planner.py --calibrate``: the CPU of the development
machine, 2 cores, ``torch.get_num_threads() == 2``, torch 2.13, shared with other jobs):

- ``factor``: ``n^3 / 3`` over the time of ``torch.linalg.cholesky`` of an ``n x n`` SPD matrix;
- ``factor_backward``: ``2 n^3`` (two ``n x n`` triangular solves) over the time autograd adds when the
  log-determinant and a quadratic form are differentiated through that factor;
- ``product``: ``2 n^2 c`` over the time of ``(n, n) @ (n, c)`` with ``c = 33`` (CG's columns: one
  right-hand side and 32 probes), on this CPU about half the square-product rate;
- ``stream``: bytes over the time of ``a * 2.0`` into a fresh ``n x n`` tensor (read + write).

Each the fastest of interleaved rounds at ``n = 2000`` and ``4000`` (load from other jobs shows up as slow
rounds). float32, 7 rounds: factor 143 / 158 GF/s, backward 76 / 80, product 108 / 107; float64, 3 rounds
in a quiet moment: factor 70 / 74, backward 45 / 35, product 45 / 40. The stream rate ranged from 2 to
100 GB/s (a new allocation's page faults against a reused buffer); 5 GB/s is the page-faulting figure, as
an engine's fresh ``n x n`` tensors are, and it weighs little next to the factorisation. Devices without
measured rates (CUDA: not measured yet) get ``None``: the planner then chooses by exactness and memory.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Rates:
    """Throughputs of one device kind and dtype: flop/s of each kind of work, bytes/s of memory passes."""

    factor: float
    factor_backward: float
    product: float
    stream: float


@dataclasses.dataclass(frozen=True)
class Work:
    """An engine's work for one call, by kind (flops, and bytes moved by memory-bound passes)."""

    factor: float = 0.0  # Cholesky factorisation flops (n^3 / 3 each)
    factor_backward: float = 0.0  # flops of the factorisation's backward (2 n^3 each)
    product: float = 0.0  # products, elementwise work and everything else counted in flops
    stream: float = 0.0  # bytes read and written by memory-bound passes


# (device type, bytes per element) -> measured rates; see the module docstring for how
RATES: dict[tuple[str, int], Rates] = {
    ("cpu", 4): Rates(factor=150e9, factor_backward=78e9, product=107e9, stream=5e9),
    ("cpu", 8): Rates(factor=72e9, factor_backward=38e9, product=42e9, stream=5e9),
}


def rates(device: torch.device, dtype: torch.dtype) -> Rates | None:
    """The measured rates of ``device``'s kind for ``dtype`` (half precisions use the float32 figures), or
    None where none were measured."""
    size = 8 if dtype.itemsize >= 8 else 4
    return RATES.get((device.type, size))


def seconds(work: Work, device: torch.device, dtype: torch.dtype) -> float | None:
    """Expected seconds of ``work`` on ``device`` in ``dtype``, or None without measured rates there."""
    r = rates(device, dtype)
    if r is None:
        return None
    return (
        work.factor / r.factor
        + work.factor_backward / r.factor_backward
        + work.product / r.product
        + work.stream / r.stream
    )


def differentiated(op) -> bool:
    """Whether a call on the operator ``op`` will be differentiated: grad mode is on and one of its tensors
    requires grad (metadata only; gradients with respect to a right-hand side alone are cheap)."""
    if not torch.is_grad_enabled():
        return False
    for t in op._tensors():  # a loop: this runs on every plan
        if t.requires_grad:
            return True
    return False


# an engine that states no time of its own: its flops at the product rate, its backward twice its forward
DEFAULT_BACKWARD_FACTOR = 2.0


def default_seconds(flops: float, device: torch.device, dtype: torch.dtype, gradient: bool) -> float | None:
    """Expected seconds of an engine that gives only its forward ``flops`` (``gradient``: with the backward)."""
    factor = 1 + DEFAULT_BACKWARD_FACTOR if gradient else 1.0
    return seconds(Work(product=factor * flops), device, dtype)
