"""The documentation site builds cleanly, and the Python snippets in its pages run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# Pages whose ```python blocks are executed, in order, in one namespace per page.
# (method.md has no Python; nn.md, models.md, benchmarks.md belong to their modules.)
RUNNABLE = ["index.md", "modes.md", "vijp_rules.md", "training.md", "faq.md", "libraries.md"]


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_mkdocs_build_strict(tmp_path):
    """No warnings: broken links, bad docstrings, pages missing from the nav (mkdocs.yml)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    pytest.importorskip("mkdocstrings")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").exists()
    pages = sorted(p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md"))
    assert len(pages) >= 15, pages
    for page in pages:  # every page is built (and, by --strict, in the nav)
        built = site / ("index.html" if page == "index" else f"{page}/index.html")
        assert built.exists(), page
    html = lambda page: (site / page / "index.html").read_text()
    # the API reference is generated from the docstrings
    assert "moonwalk_grad" in html("api/moonjax") and "register_vijp" in html("api/moonjax")
    assert "make_train_step" in html("api/train") and "TrainConfig" in html("api/train")
    assert "RevNetClassifier" in html("api/models") and "AdditiveCoupling" in html("api/nn")
    assert 'class="mermaid"' in html("method")  # the method's diagram
    assert "jax.distributed.initialize" in html("training")  # multi-host


@pytest.mark.parametrize("page", RUNNABLE)
def test_python_snippets_run(page, tmp_path, monkeypatch):
    from moonjax._src.rules import vijp_rules

    if page == "training.md":
        pytest.importorskip("sklearn")  # train.fit on digits
    blocks = python_blocks(DOCS / page)
    assert blocks, f"{page} has no python blocks"
    monkeypatch.chdir(tmp_path)  # snippets may write files
    saved = dict(vijp_rules)
    # a module of its own, so that the snippets' classes (dataclasses, eqx.Module) can
    # find it in sys.modules
    module = types.ModuleType(f"docs_{page[:-3]}")
    monkeypatch.setitem(sys.modules, module.__name__, module)
    namespace = module.__dict__
    try:
        for i, block in enumerate(blocks):
            try:
                exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{page}, python block {i} failed:\n{block}") from e
    finally:  # snippets may register rules: leave the registry as it was
        vijp_rules.clear()
        vijp_rules.update(saved)


def test_api_reference_lists_every_public_name():
    import moonjax

    page = (DOCS / "api" / "moonjax.md").read_text()
    listed = set(re.findall(r"^\s+- (\w+)$", page, re.M))
    missing = sorted(set(moonjax.__all__) - listed)
    assert not missing, f"docs/api/moonjax.md does not list {missing}"
