"""The structural rule tables (``functools.singledispatch``) are complete whatever is imported first.

Every rule lives in the module that defines its table, so importing that one module gives the whole table.
The fresh-process checks import a table's module with the package ``__init__`` files replaced by empty
stubs: the ``__init__`` files import every module, and would hide a rule registered anywhere else.
"""

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import structgp

PACKAGE_PARENT = Path(structgp.__file__).resolve().parent.parent

# the module of each table, and structures whose rules were once registered in other modules
EXPECTED = {
    "structgp.inference.roots": {"root": {"BlockDiag", "SparseLifted", "Permuted", "Kronecker", "AddedDiagonal"}},
    "structgp.covariance.indexing": {
        "batch_getitem": {"BlockDiag", "SparseLifted", "Permuted", "Kronecker", "Sum"},
        "principal": {"BlockDiag", "SparseLifted", "Permuted", "Kronecker", "Sum"},
        "submatrix": {"SparseLifted", "Permuted", "LowRank"},
        "entries": {"BlockDiag", "SparseLifted", "Permuted", "Kronecker", "Sum"},
    },
    "structgp.inference.eigsh": {
        "eigvalsh": {"BlockDiag", "Permuted", "Kronecker", "AddedDiagonal"},
        "structured_eigsh": {"Permuted", "Kronecker", "AddedDiagonal"},
    },
    "structgp.inference.matrix_functions": {"structured_function": {"Permuted", "Kronecker", "AddedDiagonal"}},
}

# imports one table module (argv[2]) under stubbed packages; prints {table: [types with a rule]}
_ALONE = """
import importlib, json, sys, types
from pathlib import Path

parent = Path(sys.argv[1])
for name in ("structgp", "structgp.covariance", "structgp.inference"):
    stub = types.ModuleType(name)
    stub.__path__ = [str(parent.joinpath(*name.split(".")))]
    sys.modules[name] = stub
module = importlib.import_module(sys.argv[2])
assert not hasattr(sys.modules["structgp.inference"], "__file__"), "a package __init__ ran"
tables = json.loads(sys.argv[3])
print(json.dumps({t: sorted(cls.__name__ for cls in getattr(module, t).registry) for t in tables}))
"""


def rules_when_imported_alone(module: str, tables: list[str], package_parent: Path = PACKAGE_PARENT) -> dict:
    """``{table: names of the types with a rule}`` after importing only ``module`` in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_ALONE), str(package_parent), module, json.dumps(tables)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return {t: set(names) for t, names in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("module", list(EXPECTED))
def test_a_table_is_complete_when_only_its_module_is_imported(module):
    found = rules_when_imported_alone(module, list(EXPECTED[module]))
    for table, wanted in EXPECTED[module].items():
        assert wanted <= found[table], f"{module}.{table} lacks rules for {sorted(wanted - found[table])}"


TABLES = [
    ("structgp.inference.roots", "root"),
    ("structgp.covariance.indexing", "getitem"),
    ("structgp.covariance.indexing", "batch_getitem"),
    ("structgp.covariance.indexing", "principal"),
    ("structgp.covariance.indexing", "submatrix"),
    ("structgp.covariance.indexing", "entries"),
    ("structgp.covariance.torch_function", "sum_batch"),
    ("structgp.inference.eigsh", "eigvalsh"),
    ("structgp.inference.eigsh", "structured_eigsh"),
    ("structgp.inference.matrix_functions", "structured_function"),
    ("structgp.inference.pivoted_cholesky", "column"),
    ("structgp.inference.iterative", "matvec_flops"),
]


@pytest.mark.parametrize(("module", "table"), TABLES)
def test_every_rule_is_defined_in_its_tables_module(module, table):
    fn = getattr(importlib.import_module(module), table)
    elsewhere = {cls.__name__: rule.__module__ for cls, rule in fn.registry.items() if rule.__module__ != module}
    assert not elsewhere, f"rules of {module}.{table} defined in other modules: {elsewhere}"
