"""deltatune's import graph (tools/import_graph.py, read from the source): no import cycle, not even one that
a function-local import hides; no function-local import of our own modules except those that keep an optional
heavy dependency out of ``import deltatune``; and every import goes down the layers of docs/ARCHITECTURE.md."""
import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "import_graph.py"
ARCHITECTURE = Path(__file__).resolve().parent.parent / "docs" / "ARCHITECTURE.md"

# The function-local imports of our own modules that may stay, each loading a slow or optional dependency
# only when it is used: transformers' Trainer (AdaLoRA's callback), Triton (CUDA serving kernels).
LAZY_FOR_A_HEAVY_DEPENDENCY = {
    ("deltatune.methods.adalora", "deltatune.methods.adalora_callback"),
    ("deltatune.serving.kernels", "deltatune.serving.triton_lora"),
}

# docs/ARCHITECTURE.md, "Layers": a package imports only packages of its own layer or of the layers before.
LAYERS = [
    ["deltatune._version", "deltatune.atomic", "deltatune.config_types", "deltatune.lora_options", "deltatune.config", "deltatune.registry", "deltatune.models"],
    ["deltatune.native", "deltatune.quant", "deltatune.data"],
    ["deltatune.surgery"],
    ["deltatune.io"],
    ["deltatune.methods"],
    ["deltatune.serving", "deltatune.combine"],
    ["deltatune.forward_signature", "deltatune.tuner", "deltatune.model_files", "deltatune.model", "deltatune.tasks",
     "deltatune.status", "deltatune.auto", "deltatune.helpers", "deltatune.mixed_model"],
    ["deltatune.integrations", "deltatune.inspect", "deltatune.train", "deltatune.plan", "deltatune.tune",
     "deltatune.cli", "deltatune.optimizers", "deltatune.serve", "deltatune.export", "deltatune"],
]


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


def test_no_import_cycle(graph):
    assert graph.module_cycles() == [], "modules that import each other at module level"
    assert graph.module_cycles(include_local=True) == [], "a cycle that function-local imports hide"
    assert graph.package_cycles() == [], "packages that import each other"


def test_function_local_imports_only_for_heavy_dependencies(graph):
    local = {(m, t) for m, targets in graph.local.items() for t in targets}
    assert local <= LAZY_FOR_A_HEAVY_DEPENDENCY, (
        f"function-local imports of our own modules: {sorted(local - LAZY_FOR_A_HEAVY_DEPENDENCY)}; import at the top "
        "of the module (a cycle means a function is in the wrong layer, see docs/ARCHITECTURE.md)"
    )


def test_imports_go_down_the_layers(graph):
    layer = {package: i for i, packages in enumerate(LAYERS) for package in packages}
    packages = {_package(m) for m in graph.modules}
    assert packages <= set(layer), f"packages in no layer (add them to LAYERS and docs/ARCHITECTURE.md): {packages - set(layer)}"
    upward = sorted((a, b) for a, targets in graph.package_graph().items() for b in targets if layer[b] > layer[a])
    assert upward == [], f"imports that go up the layers: {upward}"


def test_the_architecture_page_draws_these_layers():
    text = ARCHITECTURE.read_text()
    for packages in LAYERS:
        for package in packages:
            name = package.removeprefix("deltatune.").removeprefix("deltatune") or "__init__.py"
            assert f"`{name}" in text, f"docs/ARCHITECTURE.md's layers do not mention {name}"


def _package(module: str) -> str:
    return _tool().package(module)


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
