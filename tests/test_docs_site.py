"""The documentation: docs/ builds as a site in strict mode, and every public name has a docstring.

`mkdocs build --strict` (mkdocs.yml) fails on a broken link or anchor between pages, a page left out
of the navigation, a snippet of the README that is gone, or a docstring mkdocstrings cannot parse.
The API reference (docs/reference.md) is generated from the docstrings of the modules it names, so
the tests here also check that it lists every name in those modules' ``__all__`` and that none of
them, nor anything public in the modules that define them, lacks a docstring.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for this module; the build's output is shown when it fails."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _reference_modules() -> list[str]:
    """The modules whose ``__all__`` docs/reference.md documents (its ``::: name`` lines naming a module)."""
    names = re.findall(r"^::: ([\w.]+)\s*$", (DOCS / "reference.md").read_text(), flags=re.M)
    modules = []
    for name in names:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue  # a single object, e.g. a function that a submodule of the same name hides
        if hasattr(mod, "__all__"):
            modules.append(name)
    return modules


def _html_ids(page: Path) -> set[str]:
    return set(re.findall(r'\sid="([^"]+)"', page.read_text()))


def _page_html(site: Path, md: Path) -> Path:
    rel = md.relative_to(DOCS).with_suffix("")
    return site / ("index.html" if rel.name == "index" else rel / "index.html")


def test_the_docs_build_strictly_and_every_page_is_in_it(site):
    pages = sorted(DOCS.rglob("*.md"))
    assert pages
    missing = [str(p.relative_to(DOCS)) for p in pages if not _page_html(site, p).exists()]
    assert not missing, f"docs pages missing from the site: {missing}"


def test_the_reference_lists_every_public_name(site):
    ids = _html_ids(_page_html(site, DOCS / "reference.md"))
    modules = _reference_modules()
    assert "deltatune" in modules, modules
    exported = {}  # id(object) -> every "module.name" it is documented under
    for m in modules:
        mod = importlib.import_module(m)
        for name in mod.__all__:
            exported.setdefault(id(getattr(mod, name)), set()).add(f"{m}.{name}")
    missing = []
    for m in modules:
        mod = importlib.import_module(m)
        for name in mod.__all__:
            obj = getattr(mod, name)
            places = exported[id(obj)] | {f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"}
            if not places & ids:
                missing.append(f"{m}.{name}")
    assert not missing, f"names in __all__ that the API reference does not show: {missing}"


def test_readme_links_point_at_pages_and_headings_that_exist(site):
    readme = (ROOT / "README.md").read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", readme):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            continue  # a heading of the README itself
        file = ROOT / path
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and DOCS in file.parents:
            if anchor not in _html_ids(_page_html(site, file)):
                bad.append(f"{target}: no heading with that anchor")
    assert not bad, "broken links in README.md:\n" + "\n".join(bad)


def _public_members(cls: type) -> dict[str, object]:
    """Functions and properties a deltatune class defines itself, by public name."""
    out = {}
    for name, raw in vars(cls).items():
        if name.startswith("_"):
            continue
        func = raw.fget if isinstance(raw, property) else getattr(raw, "__func__", raw)
        if inspect.isfunction(func):
            out[name] = raw
    return out


def _has_doc(cls: type, name: str, raw: object) -> bool:
    """A docstring of its own, or the one of the method it overrides (``forward``, ``extra_repr``)."""
    if isinstance(raw, property):
        return bool((raw.__doc__ or "").strip())
    return bool((inspect.getdoc(getattr(cls, name)) or "").strip())


def test_every_public_name_has_a_docstring():
    """Every name in the documented modules' ``__all__``, every public function and class of the modules
    that define them, and the public methods and properties of those classes."""
    modules = _reference_modules()
    defining = set(modules)
    for m in modules:
        mod = importlib.import_module(m)
        for name in mod.__all__:
            obj = getattr(mod, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                defining.add(obj.__module__)
    missing, seen = [], set()
    for m in sorted(defining):
        mod = importlib.import_module(m)
        if not (mod.__doc__ or "").strip():
            missing.append(m)
        public = getattr(mod, "__all__", None) if m in modules else None
        for name, obj in vars(mod).items():
            if name.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if (obj.__module__ != m and not (public and name in public)) or id(obj) in seen:
                continue
            seen.add(id(obj))
            if not (obj.__doc__ or "").strip():
                missing.append(f"{m}.{name}")
            if inspect.isclass(obj):
                missing += [f"{m}.{name}.{attr}" for attr, raw in _public_members(obj).items()
                            if not _has_doc(obj, attr, raw)]
    assert not missing, f"{len(missing)} public names without a docstring:\n" + "\n".join(sorted(set(missing)))


def _text_units(text: str) -> list[str]:
    """Paragraphs, list items and table rows of a Markdown page; code blocks and headings left out."""
    out, buf, fence = [], [], False
    for line in text.split("\n"):
        if re.match(r"^\s*(```|~~~)", line):
            fence = not fence
            continue
        if fence or line.startswith("#"):
            continue
        if not line.strip() or re.match(r"^\s*(\||[-*] |\d+\. )", line):
            if buf:
                out.append(" ".join(buf))
            buf = []
        if line.strip():
            buf.append(line.strip())
    if buf:
        out.append(" ".join(buf))
    return out


def test_no_paragraph_is_copied_between_pages():
    """docs/ is the single source: a paragraph, list item or table row of 15 words or more shares at most
    half of its 6-word runs with one on another page (or the README). Link to the one place instead."""
    k, shingles, where = 6, {}, {}
    for page in [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]:
        for i, unit in enumerate(_text_units(page.read_text())):
            words = re.findall(r"[\w.²³·×≈≤≥/+-]+", re.sub(r"\]\([^)]*\)", "]", unit.lower()))
            if len(words) >= 15:
                runs = {" ".join(words[j:j + k]) for j in range(len(words) - k + 1)}
                shingles[(page, i)] = (runs, unit)
                for run in runs:
                    where.setdefault(run, set()).add((page, i))
    shared: dict[tuple, int] = {}
    for keys in where.values():
        for a in keys:
            for b in keys:
                if a[0] != b[0] and str(a) < str(b):
                    shared[(a, b)] = shared.get((a, b), 0) + 1
    copies = [
        f"{a[0].relative_to(ROOT)}: {shingles[a][1][:100]}\n  {b[0].relative_to(ROOT)}: {shingles[b][1][:100]}"
        for (a, b), n in shared.items()
        if n / min(len(shingles[a][0]), len(shingles[b][0])) >= 0.5
    ]
    assert not copies, "text copied between pages (keep it in one place and link to it):\n" + "\n".join(copies)
