"""The documentation site and the README stay whole: every page under docs/ is in mkdocs.yml's nav,
the README's quick-start commands are the ones CI runs and the getting-started page shows, the
README's links resolve and its Python lines are those of the example test_api.py runs, and (where
mkdocs is installed) `mkdocs build --strict` passes."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def _nav_pages(node) -> list[str]:
    """Every page file named in a mkdocs nav (a list of pages, {title: page} and sections)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [page for item in node for page in _nav_pages(item)]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    raise TypeError(f"unexpected nav entry {node!r}")


def _fenced_block(text: str, heading: str, language: str) -> str:
    """The first ```language block after the line `heading`."""
    lines = text.splitlines(keepends=True)
    section = "".join(lines[lines.index(f"{heading}\n") :])
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block after {heading!r}"
    return match.group(1)


def _commands(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_every_docs_page_is_in_the_nav_and_every_nav_page_exists():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"a page is in the nav twice: {sorted(nav)}"
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert pages - set(nav) == set(), "docs pages missing from mkdocs.yml's nav"
    assert set(nav) - pages == set(), "mkdocs.yml's nav names pages that do not exist"


def test_readme_quick_start_is_what_ci_runs_and_what_getting_started_shows():
    readme = (ROOT / "README.md").read_text()
    block = _fenced_block(readme, "## Quick start", "bash")
    install_and_run, install_and_test = _commands(block)
    assert install_and_run.endswith("&& python -m saetrain")
    assert install_and_test.endswith("&& pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci, ".ci/run no longer runs the README's test command verbatim"
    page = (DOCS / "getting_started.md").read_text()
    assert _fenced_block(page, "# Getting started", "bash") == block


def test_readme_links_resolve():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
    assert len(relative) > 20  # the tour links every guide
    missing = [link for link in relative if not (ROOT / link).exists()]
    assert missing == []


def test_readme_python_lines_are_those_of_the_tested_example():
    """The README's snippet is lines of docs/python_api.md's block, which test_api.py runs."""
    readme = _fenced_block((ROOT / "README.md").read_text(), "## A short tour", "python")
    page = _fenced_block((DOCS / "python_api.md").read_text(), "# Python API", "python")
    page_lines = set(page.splitlines())
    assert [line for line in readme.splitlines() if line and line not in page_lines] == []


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs not installed")
def test_site_builds_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "getting_started" / "index.html").is_file()
