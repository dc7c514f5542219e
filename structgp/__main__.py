"""``python -m structgp demo`` (the main job) and ``python -m structgp bench`` (the benchmark suite)."""

from __future__ import annotations

import sys


def _bench(argv: list[str]) -> int:
    import runpy
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "benchmarks"
    script = folder / "run_all.py"
    if not script.exists():
        print("python -m structgp bench: the benchmarks/ folder of a structgp checkout is needed "
              "(install with `pip install -e .` from the repository)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m structgp {demo,bench} [options]   (each takes --help)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from structgp.demo import main as demo

        return demo(rest)
    if command == "bench":
        return _bench(rest)
    print(f"python -m structgp: unknown command {command!r}; expected demo or bench", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
