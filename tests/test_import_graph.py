"""deltatune's import graph (tools/import_graph.py, read from the source): no module-level import cycle,
and the cycles that function-local imports hide do not grow (a ratchet: lower the numbers when a cycle
goes, never raise them)."""
import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "import_graph.py"

# What is left (see docs/ARCHITECTURE.md, "Layers"): config.from_pretrained reads a file through
# io.config_io, which finds the config class in the method registry; methods (hooks that attach
# themselves) call surgery; adalora's training side and the adapter call each other.
ALLOWED_PACKAGE_CYCLES = [["deltatune.config", "deltatune.io", "deltatune.methods", "deltatune.surgery"]]
MAX_MODULE_CYCLES_WITH_LOCAL_IMPORTS = 2
MAX_LOCAL_IMPORT_EDGES = 6


def _tool():
    if "import_graph" not in sys.modules:
        spec = importlib.util.spec_from_file_location("import_graph", TOOL)
        module = importlib.util.module_from_spec(spec)
        sys.modules["import_graph"] = module  # before running it: its dataclass looks its module up
        spec.loader.exec_module(module)
    return sys.modules["import_graph"]


@pytest.fixture(scope="module")
def graph():
    return _tool().build()


def test_no_module_level_import_cycle(graph):
    assert graph.module_cycles() == [], "modules that import each other at module level"


def test_package_cycles_through_function_local_imports_do_not_grow(graph):
    cycles = graph.package_cycles()
    for cycle in cycles:
        assert any(set(cycle) <= set(allowed) for allowed in ALLOWED_PACKAGE_CYCLES), (
            f"new package cycle {cycle} (counting function-local imports); import only downwards, see "
            "docs/ARCHITECTURE.md"
        )


def test_module_cycles_and_local_imports_do_not_grow(graph):
    cycles = graph.module_cycles(include_local=True)
    assert len(cycles) <= MAX_MODULE_CYCLES_WITH_LOCAL_IMPORTS, cycles
    local = sum(map(len, graph.local.values()))
    assert local <= MAX_LOCAL_IMPORT_EDGES, f"{local} function-local imports of our own modules (was {MAX_LOCAL_IMPORT_EDGES})"


def test_the_tool_sees_a_cycle(tmp_path):
    """The check is not vacuous: two modules importing each other at module level are found."""
    module = _tool()
    pkg = tmp_path / "toy"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from toy import b\n")
    (pkg / "b.py").write_text("def f():\n    from toy.a import x\n")
    toy = module.build(tmp_path, "toy")
    assert toy.module_cycles() == [] and toy.module_cycles(include_local=True) == [["toy.a", "toy.b"]]
    (pkg / "b.py").write_text("import toy.a\n")
    assert module.build(tmp_path, "toy").module_cycles() == [["toy.a", "toy.b"]]
