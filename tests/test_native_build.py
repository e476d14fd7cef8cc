"""The one build of deltatune's compiled CPU code (deltatune/native/build.py): cached by what it compiles."""
import shutil

import pytest

from deltatune.native import build
from deltatune.native import dropout as native_dropout

needs_compiler = pytest.mark.skipif(build.compiler() is None, reason="needs a C compiler")


@needs_compiler
def test_an_edited_header_rebuilds_the_sources_next_to_it(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "src"
    src.mkdir()
    for name in ("dropout.c", "dt_bf16.h"):
        shutil.copy(native_dropout.SOURCE.with_name(name), src / name)
    first = build.build(build.compiler(), src / "dropout.c", build.BASE_FLAGS)
    assert build.build(build.compiler(), src / "dropout.c", build.BASE_FLAGS) == first  # cached
    with open(src / "dt_bf16.h", "a") as header:
        header.write("\n/* edited */\n")
    second = build.build(build.compiler(), src / "dropout.c", build.BASE_FLAGS)
    assert second != first and second.exists() and first.exists()


@pytest.mark.skipif(build.platform_problem() is not None or build.compiler() is None,
                    reason="needs x86-64 Linux with AVX2, libgomp and a C compiler")
def test_a_library_whose_declare_refuses_it_is_not_used(tmp_path, monkeypatch):
    # serving's kernels refuse a build whose compiled-in largest rank differs from the Python side's
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    lib = build.Library(native_dropout.SOURCE, lambda cdll: "dt_keep_mask disagrees")
    assert lib.get() is None and lib.unavailable_reason() == "dt_keep_mask disagrees"
    ok = build.Library(native_dropout.SOURCE, lambda cdll: None)
    assert ok.get() is not None and ok.unavailable_reason() is None
    with ok.switched(False):
        assert ok.get() is None and "switched off" in ok.unavailable_reason()


def test_a_problem_of_the_librarys_own_stops_it_before_building(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTATUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "platform_problem", lambda: None)
    lib = build.Library(native_dropout.SOURCE, lambda cdll: None, problem=lambda: "needs AVX512-BF16")
    assert lib.get() is None and lib.unavailable_reason() == "needs AVX512-BF16"
    assert not (tmp_path / "kernels").exists()  # nothing was compiled
