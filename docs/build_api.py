"""Build the API reference (HTML, from the docstrings) with pdoc: ``python docs/build_api.py [OUT_DIR]``.

CI runs this through ``tests/test_docs.py``; the integrations for botorch are documented only where botorch
is installed (importing structgp never imports it).
"""

from __future__ import annotations

import sys
from pathlib import Path

MODULES = ["structgp", "!structgp.integrations.botorch.*", "!structgp.integrations.botorch"]  # pdoc recurses


def build(out: Path) -> list[Path]:
    import pdoc

    out.mkdir(parents=True, exist_ok=True)
    pdoc.pdoc(*MODULES, output_directory=out)
    return sorted(out.rglob("*.html"))


if __name__ == "__main__":
    pages = build(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/api"))
    print(f"{len(pages)} pages written")
