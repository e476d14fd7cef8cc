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
