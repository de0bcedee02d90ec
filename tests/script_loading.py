"""Run an entry-point script's code for an end-to-end test, without importing the script as a library module.

Scripts (``scripts/...py``) are entry points, not modules: nothing imports them. A test that drives one through its
command line calls ``load_script(path).main(argv)``, which executes the file with :func:`runpy.run_path` (under a
name that is not ``__main__``, so the script does not run on load) and exposes its top-level names. Several methods
have scripts of the same name (``sample.py``, ``train.py``), so each path is run once per test process and cached
by path; nothing is added to ``sys.modules``.
"""

from __future__ import annotations

import runpy
import types
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
_LOADED: dict[Path, types.SimpleNamespace] = {}


def load_script(relative_path: str) -> types.SimpleNamespace:
    """``load_script("scripts/codiff/generate.py").main(argv)``: the script's top-level names (cached per path)."""
    path = (REPO / relative_path).resolve()
    if path not in _LOADED:
        name = "_dlab_script_" + "_".join(Path(relative_path).with_suffix("").parts)
        _LOADED[path] = types.SimpleNamespace(**runpy.run_path(str(path), run_name=name))
    return _LOADED[path]


def run_main(main, argv, capsys):
    """``(exit code, non-empty stderr lines)`` of a script's ``main`` run in-process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "it/s" not in line
           and "%|" not in line]
    return code, err
