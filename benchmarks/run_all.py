"""The benchmark suite behind ``python -m structgp bench``: every table side by side with gpytorch /
linear_operator in one process, JSON of every result, and scaling plots (time and peak memory vs N for each
structure).

    python -m structgp bench                       # CPU sizes
    python -m structgp bench --device cuda --size full --out bench_out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_covariance  # noqa: E402
from _harness import Result, environment, run_case  # noqa: E402

SCALING = {
    "small": {
        "LowRank+Diag (k=64)": ("lowrank", [10_000, 30_000, 100_000, 300_000]),
        "Kronecker m^3 + sI": ("kron", [12, 16, 24, 32]),
        "SparseLifted (n_in=1728)": ("lifted", [5_000, 15_000, 50_000]),
        "BlockDiag (m=64)": ("block", [250, 1_000, 4_000]),
    },
    "full": {
        "LowRank+Diag (k=64)": ("lowrank", [100_000, 300_000, 1_000_000, 3_000_000]),
        "Kronecker m^3 + sI": ("kron", [32, 48, 64, 80]),
        "SparseLifted (n_in=4096)": ("lifted", [50_000, 100_000, 200_000, 400_000]),
        "BlockDiag (m=64)": ("block", [1_000, 4_000, 10_000, 20_000]),
    },
}


def _case(kind: str, size: int, full: bool, dev: torch.device):
    if kind == "lowrank":
        return bench_covariance.case_low_rank(size, 64, dev), size
    if kind == "kron":
        return bench_covariance.case_kronecker(size, dev), size**3
    if kind == "lifted":
        return bench_covariance.case_lifted(size, 16 if full else 12, dev), size
    return bench_covariance.case_block(size, 64, dev), size * 64


def scaling(size: str, dev: torch.device, reps: int) -> dict[str, list[dict]]:
    """For each structure, structgp and linear_operator time/memory at growing N."""
    out: dict[str, list[dict]] = {}
    for label, (kind, sizes) in SCALING[size].items():
        rows = []
        for s in sizes:
            (name, exact, impls), n = _case(kind, s, size == "full", dev)
            for impl in ("structgp", "linear_operator"):
                r: Result = run_case(name, impl, impls[impl], exact, dev, reps)
                rows.append({"N": n, "impl": impl, "ms": r.ms, "peak_gib": r.peak_gib, "rel_err": r.rel_err,
                             "note": r.note})
            print(f"  scaling {label}: N={n} done", file=sys.stderr, flush=True)
        out[label] = rows
    return out


def plot_scaling(data: dict[str, list[dict]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, len(data), figsize=(4.2 * len(data), 7), squeeze=False)
    for col, (label, rows) in enumerate(data.items()):
        for impl, style in (("structgp", "o-"), ("linear_operator", "s--")):
            pts = [r for r in rows if r["impl"] == impl and r["ms"] is not None]
            axes[0, col].loglog([r["N"] for r in pts], [r["ms"] for r in pts], style, label=impl)
            axes[1, col].loglog([r["N"] for r in pts], [max(r["peak_gib"], 1e-4) for r in pts], style, label=impl)
        axes[0, col].set_title(label)
        axes[0, col].set_ylabel("forward + backward (ms)")
        axes[1, col].set_ylabel("peak memory (GiB)")
        axes[1, col].set_xlabel("N")
        axes[0, col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m structgp bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", choices=["small", "full"], default="small")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated subset of: covariance,iterative,models,"
                        "scaling,overhead,lifted,matrix_free")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    common = ["--device", args.device, "--reps", str(args.reps)]
    if "covariance" not in skip:
        print("\n== covariance structures (issue: exact structured algebra)")
        bench_covariance.main([*common, "--size", args.size, "--json", str(out / "covariance.json")])
    if "iterative" not in skip:
        import bench_iterative

        print("\n== iterative engine (CG / SLQ)")
        sizes = ["--n", "20000", "--kron-m", "32", "--ref-limit", "40000"] if args.size == "full" else []
        bench_iterative.main([*common, *sizes, "--json", str(out / "iterative.json"),
                              "--plot", str(out / "iterative_convergence.png")])
    if "models" not in skip:
        import bench_models

        print("\n== GP models")
        bench_models.main(["--device", args.device, "--size", args.size, "--json", str(out / "models.json")])
    if "overhead" not in skip:
        import bench_overhead

        print("\n== small-call overhead (MultivariateNormal log_prob + backward on a small dense covariance)")
        bench_overhead.main(["--device", args.device, "--json", str(out / "overhead.json")])
    if "lifted" not in skip:
        import bench_lifted_scale

        print("\n== lifted covariances at the seeds' scale (seed 002, identity lift, masked grid, general lift)")
        cases = ["all"] if args.size == "full" else ["identity", "masked"]
        for case in cases:
            bench_lifted_scale.main(["--case", case, "--reps", "1"])
    if "matrix_free" not in skip:
        import bench_matrix_free

        print("\n== matrix-free exact GP (KernelOperator) against dense float64 Cholesky and gpytorch")
        sizes = ["--n", "12000", "--dtype", "float64"] if args.size == "full" else ["--n", "3000", "--dtype", "float64"]
        bench_matrix_free.main([*sizes, "--device", args.device])
    if "scaling" not in skip:
        print("\n== scaling")
        data = scaling(args.size, dev, args.reps)
        (out / "scaling.json").write_text(json.dumps({**environment(dev), "scaling": data}, indent=1))
        png = plot_scaling(data, out / "scaling.png")
        for label, rows in data.items():
            cells = ", ".join(f"N={r['N']}: {r['impl'][:3]} {r['ms']} ms" for r in rows)
            print(f"  {label}: {cells}")
        if png:
            print(f"scaling plot: {png}")
    print(f"\nJSON and plots in {out}/")
    return 0


if __name__ == "__main__":
    main()
