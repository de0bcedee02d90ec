"""The repository explains itself and its packages stay libraries.

- Docs and comments point only at things a reader has: files in this repository (``METHOD.md``, ``ARCHITECTURE.md``)
  and public sources (papers, released code), never at private notes or at the tickets the code was written for.
- Packages (``common`` and the five methods) never touch ``sys.path`` or load a script by its file path, and no
  module imports another module's private (underscore) names.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "contextdiff", "shifted", "codiff", "sdg", "versatile")
SKIP_DIRS = {".git", ".venv", "__pycache__", "data", "outputs", "node_modules", ".pytest_cache", ".ruff_cache"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".sh"}
# Written in pieces so that this file does not match itself.
OUTSIDE_REFERENCE = re.compile("|".join([r"spec" + r" §", r"design" + r" note", r"[Ii]ssue" + r" [0-9]+"]))


def _files(roots, suffixes):
    for root in roots:
        for path in sorted((REPO / root).rglob("*") if (REPO / root).is_dir() else [REPO / root]):
            if path.is_file() and path.suffix in suffixes and not SKIP_DIRS.intersection(path.relative_to(REPO).parts):
                yield path


def test_docs_and_comments_do_not_point_outside_the_repository():
    roots = [p.name for p in REPO.iterdir() if p.name not in SKIP_DIRS]
    hits = []
    for path in _files(roots, TEXT_SUFFIXES | {""}):
        if path == Path(__file__).resolve():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not hits, "say the fact or cite METHOD.md / the paper instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("package", PACKAGES)
def test_packages_neither_edit_sys_path_nor_load_scripts_by_path(package):
    bad = []
    for path in _files([package], {".py"}):
        text = path.read_text(encoding="utf-8")
        for needle in ("sys.path.insert", "sys.path.append", "spec_from_file_location", "run_path("):
            if needle in text:
                bad.append(f"{path.relative_to(REPO)}: {needle}")
    assert not bad, "import packages by name; scripts are entry points, not libraries:\n" + "\n".join(bad)


def test_no_module_imports_another_modules_private_names():
    bad = []
    for path in _files([*PACKAGES, "scripts", "bench"], {".py"}):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {private}")
    assert not bad, "make the name public in its module (or move it to common/):\n" + "\n".join(bad)


def test_the_checks_above_can_fail():
    """The patterns match what they are meant to catch (so an empty result means something)."""
    assert OUTSIDE_REFERENCE.search("as the " + "spec" + " §2.4 says")
    assert OUTSIDE_REFERENCE.search("(" + "issue" + " 7)")
    assert not OUTSIDE_REFERENCE.search("Eq. 7 of the ContextDiff paper; METHOD.md, 'loss'")
    tree = ast.parse("from contextdiff.pipeline import _setup")
    node = tree.body[0]
    assert isinstance(node, ast.ImportFrom) and node.names[0].name.startswith("_")


@pytest.mark.parametrize("method", ["versatile", "codiff"])
def test_scripts_import_the_packages_not_their_namesake_script_folders(method, tmp_path):
    """``python scripts/sample.py`` puts scripts/ first on sys.path, where scripts/versatile/ is a folder without
    ``__init__.py``: the installed package must still win (the Makefile installs in editable compat mode)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "sample.py"), "--method", method, "--help"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-1500:]
    assert f"{method} settings" in done.stdout
