"""Load an entry-point script (``scripts/...py``; ``scripts/`` is not a package) as a module for the tests.

Several methods have scripts of the same name (``sample.py``, ``train.py``, ``evaluate.py``), so each script gets a
module name derived from its path, and is executed once per test process.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent


def load_script(relative_path: str):
    """``load_script("scripts/codiff/generate.py")`` -> that script's module (cached in ``sys.modules``)."""
    path = REPO / relative_path
    name = "_dlab_script_" + "_".join(Path(relative_path).with_suffix("").parts)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
