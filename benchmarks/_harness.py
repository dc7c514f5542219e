"""Timing, peak-memory and table helpers shared by the benchmark scripts.

Times are medians of repeated calls (CUDA events on a GPU, ``perf_counter`` on the CPU). Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and, on the CPU, the peak resident-set growth over the call
sampled every millisecond from ``/proc/self/statm`` (a coarse but allocator-independent measure).
"""

from __future__ import annotations

import gc
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


@dataclass
class Result:
    case: str
    impl: str
    ms: float | None = None
    peak_gib: float | None = None
    value: float | None = None
    rel_err: float | None = None
    note: str = ""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RssPeak:
    def __init__(self) -> None:
        self.base = _rss_bytes()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.001)

    def __enter__(self) -> _RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def measure(fn: Callable[[], torch.Tensor], device: torch.device, reps: int) -> tuple[float, float, float]:
    """(median ms, peak GiB, value) of ``fn`` (which returns a scalar tensor) after one warm-up call."""
    gc.collect()
    fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    else:
        with _RssPeak() as rss:
            for _ in range(reps):
                t0 = time.perf_counter()
                out = fn()
                times.append(1e3 * (time.perf_counter() - t0))
        peak = (rss.peak - rss.base) / 2**30
    times.sort()
    return times[len(times) // 2], peak, float(out)


def run_case(case: str, impl: str, fn: Callable, exact: float | None, device: torch.device, reps: int) -> Result:
    try:
        ms, peak, value = measure(fn, device, reps)
    except Exception as e:  # a failing implementation is a result, not a crash of the suite
        return Result(case, impl, note=f"{type(e).__name__}: {str(e)[:120]}")
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rel = abs(value - exact) / abs(exact) if exact is not None and math.isfinite(value) else None
    return Result(case, impl, round(ms, 3), round(peak, 3), value, rel)


def print_table(results: list[Result], anchor: str) -> None:
    """One row a case: structgp against the anchor implementation (time ratio = anchor / structgp)."""
    cases = list(dict.fromkeys(r.case for r in results))
    head = f"{'case':44} {'impl':16} {'ms':>10} {'peak GiB':>9} {'rel err':>9} {'speed-up':>9}"
    print(head)
    print("-" * len(head))
    for case in cases:
        rows = [r for r in results if r.case == case]
        ref = next((r for r in rows if r.impl == anchor and r.ms), None)
        for r in rows:
            ms = f"{r.ms:10.2f}" if r.ms is not None else f"{'-':>10}"
            peak = f"{r.peak_gib:9.3f}" if r.peak_gib is not None else f"{'-':>9}"
            err = f"{r.rel_err:9.1e}" if r.rel_err is not None else f"{'-':>9}"
            speed = f"{ref.ms / r.ms:8.2f}x" if (ref and r.ms and r.impl != anchor) else f"{'':>9}"
            print(f"{case[:44]:44} {r.impl[:16]:16} {ms} {peak} {err} {speed} {r.note}")


def write_json(path: str, results: list[Result], meta: dict) -> None:
    with open(path, "w") as f:
        json.dump({**meta, "results": [asdict(r) for r in results]}, f, indent=1)


def environment(device: torch.device) -> dict:
    import gpytorch
    import linear_operator

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    return {
        "device": name,
        "torch": torch.__version__,
        "gpytorch": gpytorch.__version__,
        "linear_operator": linear_operator.__version__,
    }


def gauss_ll(inv_quad: torch.Tensor, logdet: torch.Tensor, n: int) -> torch.Tensor:
    return -0.5 * (inv_quad + logdet + n * math.log(2 * math.pi))


def rbf_1d(g: torch.Tensor, lengthscale) -> torch.Tensor:
    """An RBF kernel matrix on the 1-D points ``g`` ``(m,)``."""
    return torch.exp(-0.5 * (g[:, None] - g[None, :]).square() / lengthscale**2)


def lo_ll(cov, y: torch.Tensor) -> torch.Tensor:
    """Gaussian log-likelihood through a linear_operator ``LinearOperator``."""
    inv_quad, logdet = cov.inv_quad_logdet(inv_quad_rhs=y.unsqueeze(-1), logdet=True)
    return gauss_ll(inv_quad, logdet, y.shape[-1])


def sg_ll(cov, y: torch.Tensor) -> torch.Tensor:
    """Gaussian log-likelihood through a structgp operator."""
    inv_quad, logdet = cov.inv_quad_logdet(y)
    return gauss_ll(inv_quad, logdet, y.shape[-1])


def backward(value: torch.Tensor) -> torch.Tensor:
    value.backward()
    return value.detach()
