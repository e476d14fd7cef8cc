"""The set-up: the committed lock and the main job's independence from the test-only oracles.

The lock (requirements/*.txt, written by `make lock` with pip-compile) is what `make train`, `make
test` and CI install. These checks read it as text; they need no network.
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
ORACLES = ("peft", "bitsandbytes", "trl")


def _pins(path: Path) -> dict[str, str]:
    """``{name: version}`` of a pip-compile output (or data.txt), every line pinned with ``==``."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _requirement_lines(path: Path) -> list[str]:
    """The requirement entries (a line that starts a requirement, continuation lines joined)."""
    text = path.read_text().replace("\\\n", " ")
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", ["main.txt", "test.txt", "data.txt"])
def test_every_locked_package_is_pinned_exactly_with_a_hash(name):
    lines = _requirement_lines(REQ / name)
    assert lines, f"{name} is empty"
    for line in lines:
        assert re.match(r"^[A-Za-z0-9._-]+==\S+ ", line), f"not an exact pin in {name}: {line}"
        assert "--hash=sha256:" in line, f"no hash in {name}: {line}"


def test_main_lock_has_no_test_oracles_and_the_same_versions_as_the_test_lock():
    main, test = _pins(REQ / "main.txt"), _pins(REQ / "test.txt")
    assert not set(ORACLES) & set(main), "the main job's lock must not install test-only oracles"
    assert set(ORACLES) <= set(test)
    assert {k: test.get(k) for k in main} == main, "main.txt and test.txt must pin the same versions"


def test_torch_is_the_cpu_wheel_and_no_cuda_package_is_locked():
    for name in ("main.txt", "test.txt"):
        pins = _pins(REQ / name)
        assert pins["torch"].endswith("+cpu"), f"{name} pins torch {pins['torch']}, not the CPU wheel"
        assert not [p for p in pins if p.startswith(("nvidia-", "triton", "cuda-"))], f"{name} pulls CUDA packages"


def test_lower_bounds_in_pyproject_are_not_above_the_lock():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + sum(project["optional-dependencies"].values(), [])]
    pins = _pins(REQ / "test.txt")
    for req in reqs:
        locked = Version(pins[req.name.lower()])
        assert req.specifier.contains(locked, prereleases=True), f"the lock's {req.name} {locked} is outside {req}"


def test_the_library_imports_no_test_oracle():
    """Every deltatune module imports with peft, bitsandbytes and trl made unimportable (they are
    installed here, as test oracles), so the main job never needs them and never prints their warnings."""
    code = f"""
import importlib, pkgutil, sys
for name in {ORACLES!r}:
    sys.modules[name] = None  # an import of it raises ImportError
import deltatune
failed = []
for mod in pkgutil.walk_packages(deltatune.__path__, "deltatune."):
    try:
        importlib.import_module(mod.name)
    except ImportError as e:
        failed.append(f"{{mod.name}}: {{e}}")
import transformers
from transformers import Trainer  # the main job's trainer, with the oracles absent
print("\\n".join(failed) or "ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok", out.stdout
